"""The bench's same-work floor does what codir-ds's stage-1 micro-step does: on one batch, with dropout off and
the same initial weights, equal loss terms (MLM, KD, CoDIR, total) and equal student and head gradients (fp32)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from helpers import REPO, save_tiny_model

sys.path.insert(0, str(REPO / "bench"))
from floor import floor_terms, masked_batch  # noqa: E402
from step_speed import codir_ds_step, floor_step  # noqa: E402


def test_floor_matches_codir_ds_micro_step(tmp_path: Path):
    teacher = save_tiny_model(tmp_path / "teacher", layers=4, hidden=32, mlm_head=True, dropout=0.0)
    batch_size, seq = 4, 16
    codir = codir_ds_step(
        {"train.deepspeed_config": str(REPO / "ds_configs/cpu_zero0.json"), "teacher.zero3": False, "codir.queue_length": 10},
        teacher,
        batch_size,
        seq,
    )
    assert codir.settings.kd > 0  # the teacher has an MLM head: KD is on in both
    floor = floor_step(codir, teacher, torch.device("cpu"))
    batch = masked_batch(batch_size, seq, codir.student.config.vocab_size, torch.Generator().manual_seed(0))

    trained = {f"student.{n}": p for n, p in codir.student.named_parameters()} | {f"heads.{n}": p for n, p in codir.heads.named_parameters()}
    grads = {}  # codir-ds's gradients as backward accumulates them (before clipping and the optimizer step clear them)
    hooks = [p.register_post_accumulate_grad_hook(lambda p, n=n: grads.__setitem__(n, p.grad.clone())) for n, p in trained.items()]
    ours = codir.step(batch)
    for hook in hooks:
        hook.remove()

    theirs, _ = floor_terms(floor.teacher, floor.student, floor.heads, batch, floor.queue.features, floor.settings)
    theirs["total"].backward()
    for name in ("mlm", "kd", "codir", "total"):
        torch.testing.assert_close(ours[name], theirs[name].detach(), rtol=1e-5, atol=1e-5, msg=name)
    floor_params = {f"student.{n}": p for n, p in floor.student.named_parameters()} | {f"heads.{n}": p for n, p in floor.heads.named_parameters()}
    assert set(grads) == set(floor_params)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, floor_params[name].grad, rtol=1e-5, atol=1e-5, msg=name)
