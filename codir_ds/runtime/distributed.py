"""Collective helpers on DeepSpeed's communication API (NCCL on GPUs, gloo/shm on CPU)."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from datetime import timedelta

import deepspeed
import deepspeed.comm as dist
import torch
from deepspeed.accelerator import get_accelerator

from .errors import CodirError


def init_distributed(timeout_minutes: float = 30.0) -> None:
    """Join the process group set up by the `deepspeed` launcher; a plain `python` run becomes a world of one.

    A collective that waits longer than `timeout_minutes` (a rank or node died) raises instead of hanging.
    """
    if dist.is_initialized():
        return
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    deepspeed.init_distributed(timeout=timedelta(minutes=timeout_minutes))
    get_accelerator().set_device(int(os.environ["LOCAL_RANK"]))  # collectives before any engine exists use it


def device() -> torch.device:
    """This rank's accelerator device (the CPU under DS_ACCELERATOR=cpu): where collectives' tensors live."""
    return torch.device(get_accelerator().current_device_name())


def rank0_first(work: Callable[[], object]) -> None:
    """Run `work` on rank 0 while the other ranks wait; a `CodirError` (or OSError) there is raised on every rank."""
    failure = None
    if rank() == 0:
        try:
            work()
        except (CodirError, OSError) as err:
            failure = err if isinstance(err, CodirError) else CodirError(f"{type(err).__name__}: {err}")
    if any_rank(failure is not None, device()):
        raise failure or CodirError("rank 0 failed before training started; its log line says why")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


@torch.no_grad()
def local_world_size() -> int:
    """Ranks on this node, as the launcher says (deepspeed: LOCAL_SIZE, torchrun: LOCAL_WORLD_SIZE; 1 without one)."""
    return int(os.environ.get("LOCAL_SIZE") or os.environ.get("LOCAL_WORLD_SIZE") or 1)


def all_gather_rows(local: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Every rank's `local` rows concatenated in rank order (no gradient), and this rank's first row index.

    Ranks may hold different numbers of rows (an uneven last batch).
    """
    if world_size() == 1:
        return local.detach().clone(), 0
    count = torch.tensor([local.shape[0]], dtype=torch.long, device=local.device)
    counts = [torch.zeros_like(count) for _ in range(world_size())]
    dist.all_gather(counts, count)
    counts = [int(c) for c in counts]
    padded = local.new_zeros((max(counts),) + tuple(local.shape[1:]))
    padded[: local.shape[0]] = local
    gathered = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(gathered, padded.contiguous())
    rows = torch.cat([block[:n] for block, n in zip(gathered, counts)])
    return rows, sum(counts[: rank()])


@torch.no_grad()
def sum_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of `values` over all ranks, on the CPU."""
    if world_size() > 1:
        values = values.clone()
        dist.all_reduce(values)
    return values.cpu()


def mean_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """The element-wise mean of `values` over all ranks, on the CPU."""
    return sum_over_ranks(values) / world_size()


@torch.no_grad()
def all_ranks(flags: torch.Tensor) -> torch.Tensor:
    """Element-wise: True where `flags` (a bool tensor) is True on every rank; on the CPU."""
    values = flags.float()
    if world_size() > 1:
        dist.all_reduce(values, op=dist.ReduceOp.MIN)
    return values.cpu().bool()


@torch.no_grad()
def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when `flag` is True on at least one."""
    value = torch.tensor([float(flag)], device=device)
    if world_size() > 1:
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def print0(message: str) -> None:
    """Print on rank 0 only, flushed (log lines of a multi-rank run appear once, in order)."""
    if rank() == 0:
        print(message, flush=True)


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def shutdown() -> None:
    """Wait for every rank, then tear the process group down, so no rank exits while others still talk."""
    if dist.is_initialized():
        barrier()
        torch.distributed.destroy_process_group()
