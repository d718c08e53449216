"""Stage 1's held-out evaluation: held-out blocks never train, and its figures match a plain recomputation."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import REPO, tensorboard_scalars, write_corpus, write_run_config
from huggingface_hub import ModelCard
from transformers import AutoModelForMaskedLM

from codir_ds.pretrain.config import PretrainConfig
from codir_ds.pretrain.data import MicroBatches, PreparedCorpus, held_out_blocks, mask_blocks
from codir_ds.pretrain.evaluation import EVAL_MASK_SEED
from codir_ds.pretrain.run import run_pretraining
from codir_ds.runtime.config import load_config


class Blocks:
    """Just the size of a corpus: all that the block order reads."""

    def __len__(self) -> int:
        return 103


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_held_out_blocks_never_train_and_each_epoch_covers_the_rest_once(world_size):
    held_out = set(held_out_blocks(103, 10).tolist())
    assert len(held_out) == 10
    epochs = {}
    for rank in range(world_size):
        data = MicroBatches(Blocks(), 3, 1, world_size, rank, seed=7, held_out=10)
        for j in range(3 * 93 // (3 * world_size) + 1):
            for index, block in zip(data.sample_indices(j), data.block_ids(j)):
                epochs.setdefault(index // 93, []).append(int(block))
    for epoch in (0, 1, 2):
        assert sorted(epochs[epoch]) == sorted(set(range(103)) - held_out), epoch
    assert epochs[0] != epochs[1]  # each epoch its own order


def test_evaluation_matches_a_plain_recomputation_and_reaches_tensorboard_csv_and_the_model_card(tmp_path, tiny_teacher):
    ds_config = json.loads((REPO / "ds_configs/cpu_zero0.json").read_text())
    ds_config["csv_monitor"] = {"enabled": True, "output_path": str(tmp_path / "csv"), "job_name": "run"}
    (tmp_path / "ds.json").write_text(json.dumps(ds_config))
    config = write_run_config(
        tmp_path,
        tiny_teacher,
        write_corpus(tmp_path / "corpus.txt", documents=120),
        train={"max_steps": 4, "deepspeed_config": str(tmp_path / "ds.json")},
        data={"num_workers": 0, "eval_blocks": 12},
        eval={"every": 2, "batch_size": 5},  # 12 blocks in batches of 5: a short last batch
        checkpoint={"every": 0},
        logging={"every": 1, "gradient_ratio": True},
    )
    run = run_pretraining(load_config(PretrainConfig, str(config)))
    assert [e["step"] for e in run.evals] == [2, 4]
    got = run.evals[-1]["metrics"]

    # The same figures from the exported student, the teacher and the heads, written out with plain torch.
    corpus = PreparedCorpus(tmp_path / "out/prepared")
    ids = held_out_blocks(len(corpus), 12)
    input_ids, labels, _ = mask_blocks(corpus.blocks(ids), np.arange(12), EVAL_MASK_SEED, corpus.special_ids, corpus.vocab_size, 0.15)
    student = AutoModelForMaskedLM.from_pretrained(tmp_path / "out/student").eval()
    teacher = AutoModelForMaskedLM.from_pretrained(tiny_teacher).eval()
    with torch.no_grad():
        s, t = student(input_ids, output_hidden_states=True), teacher(input_ids, output_hidden_states=True)
        masked = labels != -100
        mlm = F.cross_entropy(s.logits[masked], labels[masked])
        kl = F.kl_div(F.log_softmax(s.logits[masked] / 2, -1), F.log_softmax(t.logits[masked] / 2, -1), log_target=True, reduction="batchmean")
        layer_map = run.plan.layer_map
        pooled_s = [s.hidden_states[i].mean(1) for i in (1, 2)]
        pooled_t = [t.hidden_states[layer].mean(1) for layer in layer_map]
        heads = run.objective.heads
        anchors = F.normalize(heads.student(torch.cat(pooled_s, 1)), dim=-1)
        candidates = F.normalize(heads.teacher(torch.cat(pooled_t, 1)), dim=-1)
        logits = anchors @ candidates.T / 0.07
    want = {
        "mlm_loss": mlm.item(),
        "perplexity": math.exp(mlm.item()),
        "kd": 4 * kl.item(),
        "codir_loss": F.cross_entropy(logits, torch.arange(12)).item(),
        "codir_top1": (logits.argmax(1) == torch.arange(12)).float().mean().item(),
        **{f"cosine_layer_{i + 1}": F.cosine_similarity(a, b).mean().item() for i, (a, b) in enumerate(zip(pooled_s, pooled_t))},
    }
    assert got == pytest.approx(want, rel=1e-4, abs=1e-6)

    scalars = tensorboard_scalars(tmp_path / "out/tensorboard")
    assert scalars["eval/mlm_loss"] == pytest.approx([e["metrics"]["mlm_loss"] for e in run.evals])
    assert set(want) == {tag.removeprefix("eval/") for tag in scalars if tag.startswith("eval/")}
    assert len(scalars["gradients/intermediate_ratio"]) == 4
    assert all(0 < ratio < math.inf for ratio in scalars["gradients/intermediate_ratio"])
    # DeepSpeed's csv monitor, enabled in its config, receives the same scalars
    for tag in ("loss/total", "codir/queue_fill", "lr", "gradients/intermediate_ratio", "eval/mlm_loss", "eval/codir_top1"):
        rows = list(csv.reader((tmp_path / "csv/run" / f"{tag.replace('/', '_')}.csv").open()))[1:]
        assert [float(value) for _, value in rows] == pytest.approx(scalars[tag]), tag
    card = ModelCard.load(tmp_path / "out/student/README.md")
    results = card.data.eval_results
    assert {r.metric_type: r.metric_value for r in results} == pytest.approx(got)
