"""bf16: the contrastive similarities and InfoNCE stay float32 under a bf16 model, a stage-1 run with student and
teacher in bf16 trains, checkpoints, resumes and exports through DeepSpeed on the CPU, and so does stage 2 with
a memory bank or a queue."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from deepspeed.accelerator import get_accelerator
from helpers import save_task_teacher, write_corpus, write_run_config, write_task, write_task_config
from huggingface_hub import ModelCard
from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification

from codir_ds.finetune.config import FinetuneConfig
from codir_ds.finetune.run import run_finetuning
from codir_ds.method.losses import contrastive_logits, info_nce, sampled_contrastive_logits
from codir_ds.method.objective import ProjectionHeads
from codir_ds.models.ds_config import load_ds_config
from codir_ds.pretrain.config import PretrainConfig
from codir_ds.pretrain.run import run_pretraining
from codir_ds.runtime.config import TrainConfig, load_config
from codir_ds.runtime.errors import CodirError


def test_contrastive_logits_and_info_nce_are_float32_under_bf16_heads():
    g = torch.Generator().manual_seed(0)
    heads = ProjectionHeads(24, 40, 16).to(torch.bfloat16)
    student_features = torch.randn(6, 24, generator=g).bfloat16()
    queued = torch.randn(30, 40, generator=g)  # the queue keeps float32 rows
    positives, tau = torch.arange(6), 0.07

    anchors, candidates = heads.project_student(student_features), heads.project_teacher(queued)
    logits = contrastive_logits(anchors, candidates, positives, tau)
    loss = info_nce(logits, positives)
    assert (anchors.dtype, candidates.dtype, logits.dtype, loss.dtype) == (torch.float32,) * 4

    with torch.no_grad():  # float64 from the same bf16 head outputs; bf16 arithmetic is off by far more
        s, t = heads.student(student_features), heads.teacher(queued.bfloat16())
        reference = F.normalize(s.double(), dim=-1) @ F.normalize(t.double(), dim=-1).T / tau
        in_bf16 = F.normalize(s, dim=-1) @ F.normalize(t, dim=-1).T / tau
    torch.testing.assert_close(logits.detach().double(), reference, rtol=0, atol=1e-4)
    assert (in_bf16.double() - reference).abs().max() > 1e-2
    torch.testing.assert_close(loss.detach().double(), F.cross_entropy(reference, positives), rtol=0, atol=1e-5)

    sampled = sampled_contrastive_logits(anchors.bfloat16(), candidates[:6].bfloat16(), candidates[6:].bfloat16().view(6, 4, 16), tau)
    assert sampled.dtype == torch.float32


@pytest.mark.skipif(not get_accelerator().is_bf16_supported(), reason="this DeepSpeed accelerator reports no bf16 support")
def test_stage1_in_bf16_trains_resumes_and_exports(tmp_path, tiny_teacher):
    notes = tmp_path / "notes"
    notes.write_text("keep\n")  # a user's one-word file, named as the stop file: older than the run, it is no request
    config = write_run_config(
        tmp_path,
        tiny_teacher,
        write_corpus(tmp_path / "corpus.txt", documents=60),
        train={"deepspeed_config": "ds_configs/cpu_bf16.json", "max_steps": 3},
        checkpoint={"every": 2, "stop_file": str(notes)},
        data={"num_workers": 0},
        loss={"kd": 0.5},
    )
    whole = run_pretraining(load_config(PretrainConfig, str(config), {}))
    assert whole.student.module.student.dtype == torch.bfloat16
    assert whole.student.module.codir.heads.student.weight.dtype == torch.bfloat16
    assert {p.dtype for p in whole.teacher.parameters()} == {torch.bfloat16}
    assert whole.objective.queue.features.dtype == torch.float32
    assert whole.objective.queue.filled == 12
    assert all(math.isfinite(step[term]) for step in whole.history for term in ("total", "mlm", "kd", "codir")), whole.history
    assert not whole.stopped
    assert notes.read_text() == "keep\n"

    resumed = run_pretraining(load_config(PretrainConfig, str(config), {"checkpoint.resume": "step_2"}))  # step 3 again, then the export
    assert resumed.history == whole.history[2:]  # bit for bit: the bf16 weights and the fp32 master weights came back
    exported = AutoModelForMaskedLM.from_pretrained(tmp_path / "out/student")
    card = ModelCard.load(tmp_path / "out/student/README.md")
    assert (card.data.base_model, card.data.tags, card.data.datasets) == (str(tiny_teacher), ["distillation", "codir", "bert"], ["corpus.txt"])
    for row in (
        "| teacher layers | 4 |",
        "| student layers | 2, initialised from teacher_layers |",
        "| layer map (teacher layer of each student layer) | [2, 4] |",
    ):
        assert row in card.text
    for row in (f"| seen | {3 * 4 * 32:,} tokens |", "| precision | bf16 |", "| ranks | 1 |", "| pooling | mean |"):
        assert row in card.text
    readme, weights = (tmp_path / "out/student" / name for name in ("README.md", "model.safetensors"))
    assert readme.stat().st_mode == weights.stat().st_mode  # the umask's permissions
    assert exported.dtype == torch.float32  # the fp32 master weights, consolidated
    trained = resumed.student.module.student.state_dict()
    for name, value in exported.state_dict().items():  # the bf16 weights are the master weights rounded
        assert torch.equal(value.bfloat16(), trained[name]), name


@pytest.mark.skipif(not get_accelerator().is_bf16_supported(), reason="this DeepSpeed accelerator reports no bf16 support")
@pytest.mark.parametrize("negatives", ["bank", "queue"])
def test_stage2_in_bf16_keeps_its_negatives_float32_and_exports_fp32(tmp_path, negatives):
    teacher = save_task_teacher(tmp_path / "teacher")
    train, dev = write_task(tmp_path / "train.csv", 48), write_task(tmp_path / "dev.csv", 16, seed=1)
    config = write_task_config(
        tmp_path, teacher, train, dev, codir={"negatives": negatives}, train={"deepspeed_config": "ds_configs/cpu_bf16.json", "max_steps": 4}
    )
    run = run_finetuning(load_config(FinetuneConfig, str(config), {"eval.every": 4}))  # one evaluation: the best is the last step
    module = run.student.module
    assert {p.dtype for p in module.parameters()} == {torch.bfloat16}  # student and projection heads
    if negatives == "bank":
        assert (run.bank.features.dtype, run.bank.logits.dtype) == (torch.float32, torch.float32)
    else:
        assert {p.dtype for p in run.teacher.parameters()} == {torch.bfloat16}  # the live teacher
        assert run.objective.queue.features.dtype == torch.float32
        assert run.objective.queue.filled == 32  # 4 steps x 8 rows
    assert all(math.isfinite(step[term]) for step in run.history for term in ("total", "ce", "kd", "codir")), run.history
    assert run.best["step"] == 4
    exported = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out/student")
    assert exported.dtype == torch.float32  # the fp32 master weights, consolidated
    trained = module.student.state_dict()
    for name, value in exported.state_dict().items():
        assert torch.equal(value.bfloat16(), trained[name]), name


@pytest.mark.skipif(bool(get_accelerator().is_fp16_supported()), reason="this accelerator runs fp16")
def test_fp16_on_an_accelerator_without_it_is_one_line():
    with pytest.raises(CodirError, match=r"^train.deepspeed_config: ds_configs/zero2_fp16.json enables fp16, which DeepSpeed's cpu accelerator"):
        load_ds_config(TrainConfig(deepspeed_config="ds_configs/zero2_fp16.json"), world_size=1)
