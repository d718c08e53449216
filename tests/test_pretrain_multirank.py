"""Stage 1 end to end on 2 real CPU ranks (deepspeed launcher), tiny random models."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO, launch_worker
from safetensors import safe_open
from stage1 import tensorboard_scalars, write_corpus, write_run_config

pytestmark = pytest.mark.multirank
WORKER = REPO / "tests/workers/pretrain_worker.py"


def launch(config, out, *extra):
    return launch_worker(WORKER, config, out, *extra)


def test_zero2_run_lowers_loss_keeps_teacher_frozen_and_sharded_and_logs_everything(tmp_path, tiny_teacher):
    corpus = write_corpus(tmp_path / "corpus.txt")
    config = write_run_config(tmp_path, tiny_teacher, corpus, train={"max_steps": 40}, checkpoint={"every": 0},
                              loss={"kd": 0.5})
    rank0, rank1 = launch(config, tmp_path)

    total = [step["total"] for step in rank0["losses"]]
    assert np.mean(total[-5:]) < 0.8 * np.mean(total[3:8]), total  # queue full from step 3 on
    codir = [step["codir"] for step in rank0["losses"]]
    assert np.mean(codir[-5:]) < 0.7 * np.mean(codir[3:8]), codir

    # Teacher: frozen, unchanged, and each rank holds half of it (ZeRO-3 partitions).
    for facts in (rank0, rank1):
        assert facts["teacher_drift"] == 0.0
        assert not facts["teacher_trainable"] and not facts["teacher_training_mode"]
        assert facts["teacher_here"] == pytest.approx(facts["teacher_total"] / 2, rel=0.02)
    # Every rank holds the identical, full negative queue.
    assert rank0["queue_sum"] == rank1["queue_sum"] and rank0["queue_filled"] == 24

    scalars = tensorboard_scalars(tmp_path / "out/tensorboard")
    for tag in ("loss/total", "loss/mlm", "loss/kd", "loss/codir", "lr", "throughput/tokens_per_s",
                "throughput/samples_per_s", "codir/queue_fill", "codir/positive_similarity",
                "codir/negative_similarity", "codir/top1_accuracy", "data/epoch", "data/consumed_samples"):
        assert len(scalars[tag]) == 40, tag
    assert scalars["codir/queue_fill"][0] == pytest.approx(8 / 24) and scalars["codir/queue_fill"][-1] == 1.0
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
    first, _ = launch(config, parts, "--stop_after=3")
    assert not (parts / "out/student").exists()  # stopped early: checkpoint, no export
    resumed, _ = launch(config, parts, f"--probe={probe}")

    assert len(first["losses"]) == 3 and len(resumed["losses"]) == 3
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
    assert exported_names and all(name.startswith(("bert.", "cls.")) for name in exported_names)  # no projection heads
