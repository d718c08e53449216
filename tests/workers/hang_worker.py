"""Run by the deepspeed launcher: rank 1 hangs; rank 0 waits for it in codir-ds's per-step all-reduce."""

import time

import fire
import torch

from codir_ds.runtime.distributed import any_rank, init_distributed, rank


def main(timeout_minutes: float, local_rank: int = 0) -> None:
    init_distributed(timeout_minutes)
    any_rank(False, torch.device("cpu"))  # both ranks are in the world
    print(f"rank {rank()} joined", flush=True)
    if rank() == 1:
        time.sleep(3600)  # a peer that hangs without dying, as on a stuck node
    any_rank(False, torch.device("cpu"))


if __name__ == "__main__":
    fire.Fire(main)
