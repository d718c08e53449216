"""Stage 1 end to end on 2 real CPU ranks (deepspeed launcher), tiny random models."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import REPO, launch_worker, save_tiny_model, tensorboard_scalars, train_tiny_teacher, write_corpus, write_run_config
from safetensors import safe_open
from transformers import AutoModelForMaskedLM

from codir_ds.runs.universal import convert_to_universal

pytestmark = pytest.mark.multirank
WORKER = REPO / "tests/workers/pretrain_worker.py"


def launch(config, out, *extra, ranks=2):
    return launch_worker(WORKER, config, out, *extra, ranks=ranks)


def test_zero2_run_lowers_loss_keeps_teacher_frozen_and_sharded_and_logs_everything(tmp_path):
    corpus = write_corpus(tmp_path / "corpus.txt")
    teacher = train_tiny_teacher(tmp_path / "teacher", corpus)  # its MLM head knows the corpus: KD has something to teach
    config = write_run_config(
        tmp_path,
        teacher,
        corpus,
        train={"max_steps": 40},
        checkpoint={"every": 0},
        loss={"kd": 0.5},
        data={"num_workers": 0},
        teacher={"zero3": True},
    )
    rank0, rank1 = launch(config, tmp_path)

    # Each rank reads its own samples and masks them independently (the mask is a function of the sample index).
    assert len(rank0["samples"]) == len(rank1["samples"]) == 40
    assert not {i for batch in rank0["samples"] for i in batch} & {i for batch in rank1["samples"] for i in batch}
    mask0, mask1 = np.array(rank0["first_mask"]), np.array(rank1["first_mask"])
    assert (mask0 & mask1).sum() / mask1.sum() < 0.5  # independent masks share ~15% of positions; identical ones 100%

    total = [step["total"] for step in rank0["losses"]]
    assert np.mean(total[-5:]) < 0.8 * np.mean(total[3:8]), total  # queue full from step 3 on
    codir = [step["codir"] for step in rank0["losses"]]
    assert np.mean(codir[-5:]) < 0.7 * np.mean(codir[3:8]), codir
    kd = [step["kd"] for step in rank0["losses"]]  # at masked positions only: test_families checks that against a reference
    assert np.isfinite(kd).all(), kd
    assert np.mean(kd[-8:]) < 0.8 * np.mean(kd[:8]), kd

    # Teacher: frozen, unchanged, and each rank holds half of it (ZeRO-3 partitions).
    for facts in (rank0, rank1):
        assert facts["teacher_drift"] == 0.0
        assert not facts["teacher_trainable"]
        assert not facts["teacher_training_mode"]
        assert facts["teacher_here"] == pytest.approx(facts["teacher_total"] / 2, rel=0.02)
    # Held-out evaluation at the end, with the ZeRO-3 teacher: the same figures on every rank.
    assert [e["step"] for e in rank0["evals"]] == [40]
    assert rank0["evals"] == rank1["evals"]
    # Every rank holds the identical, full negative queue.
    assert rank0["queue_sum"] == rank1["queue_sum"]
    assert rank0["queue_filled"] == 24

    scalars = tensorboard_scalars(tmp_path / "out/tensorboard")
    for tag in (
        "loss/total",
        "loss/mlm",
        "loss/kd",
        "loss/codir",
        "lr",
        "throughput/tokens_per_s",
        "throughput/samples_per_s",
        "codir/queue_fill",
        "codir/positive_similarity",
        "codir/negative_similarity",
        "codir/top1_accuracy",
        "data/epoch",
        "data/consumed_samples",
    ):
        assert len(scalars[tag]) == 40, tag
    assert scalars["codir/queue_fill"][0] == pytest.approx(8 / 24)
    assert scalars["codir/queue_fill"][-1] == 1.0
    assert max(scalars["lr"]) == pytest.approx(0.002)
    assert (tmp_path / "out/student/model.safetensors").is_file()


def test_zero3_student_resume_equals_uninterrupted_and_export_reloads_without_codir_ds(tmp_path, tiny_teacher):
    corpus = write_corpus(tmp_path / "corpus.txt")
    zero3 = {"deepspeed_config": "ds_configs/cpu_zero3.json", "max_steps": 6}
    probe = json.dumps([[2, 5, 9, 11, 7, 3], [2, 12, 13, 14, 4, 3]])

    whole = tmp_path / "whole"
    whole.mkdir()
    uninterrupted, _ = launch(write_run_config(whole, tiny_teacher, corpus, train=zero3), whole, f"--probe={probe}")

    parts = tmp_path / "parts"
    parts.mkdir()
    config = write_run_config(parts, tiny_teacher, corpus, train=zero3)
    first, _ = launch(config, parts, "--stop_after=3", f"--probe={probe}")
    assert not (parts / "out/student").exists()  # stopped early: checkpoint, no export
    # 2 -> 1 ranks from this ZeRO-3 step_3, through the universal conversion: the weights come back exactly
    (elastic,) = launch(config, parts, "--stop_after=3", f"--probe={probe}", "--train.gradient_accumulation_steps=2", ranks=1)
    assert elastic["losses"] == []
    assert (parts / "out/checkpoints/step_3_universal/codir_source.txt").is_file()
    torch.testing.assert_close(torch.tensor(elastic["probe_logits"]), torch.tensor(first["probe_logits"]), rtol=0, atol=1e-6)
    resumed, _ = launch(config, parts, f"--probe={probe}")

    assert len(first["losses"]) == 3
    assert len(resumed["losses"]) == 3
    assert first["losses"] + resumed["losses"] == uninterrupted["losses"]  # step for step, bit for bit

    # The export is a plain transformers model: load it in a process where codir_ds cannot be imported.
    script = (
        "import sys, json, torch; sys.modules['codir_ds'] = None\n"
        "from transformers import AutoModelForMaskedLM, AutoModel, AutoTokenizer\n"
        f"m = AutoModelForMaskedLM.from_pretrained('{parts / 'out/student'}').eval()\n"
        f"AutoModel.from_pretrained('{parts / 'out/student'}'); AutoTokenizer.from_pretrained('{parts / 'out/student'}')\n"
        f"print(json.dumps(m(input_ids=torch.tensor({probe})).logits.tolist()))\n"
    )
    loaded = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "PATH": ""})
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    exported = torch.tensor(json.loads(loaded.stdout.strip().splitlines()[-1]))
    torch.testing.assert_close(exported, torch.tensor(resumed["probe_logits"]), rtol=1e-5, atol=1e-5)
    exported_names = safe_open(str(parts / "out/student/model.safetensors"), "pt").keys()
    assert exported_names
    assert all(name.startswith(("bert.", "cls.")) for name in exported_names)

    # A tag saved again (step_3 now holding step_6's files) is converted again, not served from the old conversion.
    checkpoints = whole / "out/checkpoints"
    convert_to_universal(checkpoints, "step_3")
    before = universal_weights(checkpoints / "step_3_universal")
    for source in (checkpoints / "step_6").glob("*_states.pt"):
        shutil.copy2(source, checkpoints / "step_3" / source.name)
    convert_to_universal(checkpoints, "step_3")
    convert_to_universal(checkpoints, "step_6")
    after, step6 = universal_weights(checkpoints / "step_3_universal"), universal_weights(checkpoints / "step_6_universal")
    assert after.keys() == step6.keys() == before.keys()
    assert all(torch.equal(after[name], step6[name]) for name in after)
    assert not all(torch.equal(after[name], before[name]) for name in after)


def universal_weights(folder) -> dict:
    """The fp32 weights of a universal checkpoint, by parameter."""
    return {path.parent.name: torch.load(path, weights_only=True) for path in (folder / "zero").glob("*/fp32.pt")}


def step_samples(facts_per_rank: list[dict], accumulation: int) -> list[set[int]]:
    """The global sample ids each optimizer step trained on, from what every rank loaded."""
    steps = len(facts_per_rank[0]["samples"]) // accumulation
    return [
        {i for facts in facts_per_rank for batch in facts["samples"][s * accumulation : (s + 1) * accumulation] for i in batch} for s in range(steps)
    ]


def test_elastic_resume_2_to_1_and_1_to_2_ranks_sees_the_same_samples_and_losses(tmp_path):
    """Same global batch (4 x 1 x 2 ranks = 4 x 2 x 1 rank): every step trains on the same samples with the
    same masks, so losses match the uninterrupted run (CoDIR off: its in-batch negatives are the world's micro-batches)."""
    teacher = save_tiny_model(tmp_path / "teacher", dropout=0.0)
    corpus = write_corpus(tmp_path / "corpus.txt")
    sections = {
        "train": {"max_steps": 6, "deepspeed_config": "ds_configs/cpu_small.json"},
        "loss": {"codir": 0.0, "kd": 0.5},
        "data": {"num_workers": 0},
    }

    whole = tmp_path / "whole"
    whole.mkdir()
    reference_config = write_run_config(whole, teacher, corpus, **sections)
    probe = [[2, 5, 9, 11, 7, 3], [2, 12, 13, 14, 4, 3]]
    reference = launch(reference_config, whole, f"--probe={json.dumps(probe)}")
    expected_samples, expected_losses = step_samples(reference, 1), reference[0]["losses"]
    assert reference[0]["teacher_here"] == reference[0]["teacher_total"]  # teacher.zero3 auto: a small teacher is replicated
    assert len(expected_samples) == 6
    assert all(len(samples) == 8 for samples in expected_samples)

    # 2 -> 1: the reference's own ZeRO-2 step_3 (written by 2 ranks), resumed on 1 rank with twice the accumulation,
    # through the universal conversion; 1 -> 2: a ZeRO-0 run of 1 rank stopped after step 3, resumed on 2 ranks as it is.
    for first_ranks, second_ranks in ((2, 1), (1, 2)):
        accumulation = {2: 1, 1: 2}
        if first_ranks == 2:
            folder, config = whole, reference_config
            first = [{**facts, "samples": facts["samples"][:3], "losses": facts["losses"][:3]} for facts in reference]
            resume = ("--checkpoint.resume=step_3",)
            shutil.rmtree(folder / "out/student")  # the resumed run must write its own
        else:
            folder = tmp_path / "1to2"
            folder.mkdir()
            zero0 = {**sections, "train": {**sections["train"], "deepspeed_config": "ds_configs/cpu_zero0.json"}}
            config, resume = write_run_config(folder, teacher, corpus, **zero0), ()
            first = launch(config, folder, "--stop_after=3", "--train.gradient_accumulation_steps=2", ranks=1)
        resumed = launch(config, folder, *resume, f"--train.gradient_accumulation_steps={accumulation[second_ranks]}", ranks=second_ranks)
        samples = step_samples(first, accumulation[first_ranks]) + step_samples(resumed, accumulation[second_ranks])
        assert samples == expected_samples, (first_ranks, second_ranks)
        losses = first[0]["losses"] + resumed[0]["losses"]
        trained = ("total", "mlm", "kd")  # the CoDIR term (weight 0 here) is logged too, against world-sized negatives
        for got, want in zip(losses, expected_losses, strict=True):
            # rel 1e-5, and 1e-7 absolute for KD values near 1e-3: the two world sizes sum in another order
            assert {k: got[k] for k in trained} == pytest.approx({k: want[k] for k in trained}, rel=1e-5, abs=1e-7), (first_ranks, second_ranks)
        # held-out evaluation of the same model: the same figures on 1 and 2 ranks
        assert resumed[0]["evals"][-1]["metrics"] == pytest.approx(reference[0]["evals"][-1]["metrics"], rel=1e-5, abs=1e-7)
        converted = (folder / "out/checkpoints/step_3_universal/codir_source.txt").is_file()
        assert converted == (first_ranks == 2)  # ZeRO-2 state is converted for the other world size; ZeRO-0's whole state is not
        exported = AutoModelForMaskedLM.from_pretrained(folder / "out/student").eval()
        with torch.no_grad():
            logits = exported(input_ids=torch.tensor(probe)).logits
        torch.testing.assert_close(logits, torch.tensor(reference[0]["probe_logits"]), rtol=1e-4, atol=1e-4)
