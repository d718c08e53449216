"""Run by the deepspeed launcher: uneven per-rank batches through all_gather_rows into a NegativeQueue."""

import json

import deepspeed
import fire
import torch
from deepspeed.accelerator import get_accelerator

from codir_ds.method.negatives import NegativeQueue
from codir_ds.runtime.distributed import all_gather_rows, rank, shutdown, world_size


def batch_rows(step: int, rank_id: int) -> int:
    return (step + 2 * rank_id) % 4  # 0..3 rows, different on each rank; sometimes none at all


def main(out_dir: str, length: int = 7, steps: int = 6, local_rank: int = 0) -> None:
    deepspeed.init_distributed()
    device = torch.device(get_accelerator().current_device_name())
    queue = NegativeQueue(length, dim=2, device=device)
    offsets = []
    for step in range(steps):
        n = batch_rows(step, rank())
        # row value encodes (step, rank, index) so the test can rebuild the expected order
        local = torch.tensor([[step * 100 + rank() * 10 + i, -1.0] for i in range(n)], device=device).reshape(n, 2)
        labels = (local[:, 0] % 3).long()
        gathered, offset = all_gather_rows(local)
        gathered_labels, _ = all_gather_rows(labels)
        assert torch.equal(gathered[offset : offset + n], local)
        offsets.append(offset)
        queue.enqueue(gathered, gathered_labels)
    features, labels, _ = queue.contents()
    result = {"world": world_size(), "offsets": offsets, "values": features[:, 0].tolist(), "labels": labels.tolist()}
    with open(f"{out_dir}/rank{rank()}.json", "w") as handle:
        json.dump(result, handle)
    shutdown()


if __name__ == "__main__":
    fire.Fire(main)
