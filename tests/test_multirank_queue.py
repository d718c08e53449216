"""The negative queue on 2 real CPU ranks started by the `deepspeed` launcher."""

import pytest
from helpers import REPO, read_json, run_deepspeed

pytestmark = pytest.mark.multirank


def test_queue_identical_on_both_ranks_with_fifo_order_after_uneven_steps(tmp_path):
    result = run_deepspeed(REPO / "tests/workers/queue_worker.py", [str(tmp_path)], ranks=2)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rank0, rank1 = read_json(tmp_path / "rank0.json"), read_json(tmp_path / "rank1.json")
    assert rank0["world"] == 2
    assert rank0["values"] == rank1["values"]
    assert rank0["labels"] == rank1["labels"]

    # Expected: every step's rows in rank order, appended; the queue keeps the newest 7, oldest first.
    def rows(step, rank):
        return (step + 2 * rank) % 4

    stream = [step * 100 + r * 10 + i for step in range(6) for r in range(2) for i in range(rows(step, r))]
    assert len(stream) > 7  # the queue wrapped around
    assert rank0["values"] == stream[-7:]
    assert rank0["labels"] == [v % 3 for v in stream[-7:]]
    assert rank0["offsets"] == [0] * 6
    assert rank1["offsets"] == [rows(step, 0) for step in range(6)]
