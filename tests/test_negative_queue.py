"""The queue's FIFO behaviour on one process; tests/test_multirank_queue.py covers 2 ranks."""

import pytest
import torch

from codir_ds.method.negatives import NegativeQueue
from codir_ds.runtime.errors import CodirError


def rows(start, count, dim=3):
    return torch.arange(start, start + count, dtype=torch.float32).unsqueeze(1).repeat(1, dim)


def test_fifo_order_and_wraparound_with_uneven_batches():
    queue = NegativeQueue(length=5, dim=3)
    assert queue.contents()[0].shape == (0, 3)
    assert queue.fill_fraction == 0
    queue.enqueue(rows(0, 3))
    assert queue.contents()[0][:, 0].tolist() == [0, 1, 2]
    assert queue.fill_fraction == 0.6
    queue.enqueue(rows(3, 4))  # wraps: 0 and 1 are dropped
    assert queue.contents()[0][:, 0].tolist() == [2, 3, 4, 5, 6]
    queue.enqueue(rows(7, 1))
    assert queue.contents()[0][:, 0].tolist() == [3, 4, 5, 6, 7]
    queue.enqueue(rows(8, 7))  # more than K at once keeps the newest K
    assert queue.contents()[0][:, 0].tolist() == [10, 11, 12, 13, 14]
    assert sorted(queue.stored()[0][:, 0].tolist()) == [10, 11, 12, 13, 14]


def test_labels_and_example_ids_travel_with_features():
    queue = NegativeQueue(length=4, dim=3)
    queue.enqueue(rows(0, 3), torch.tensor([7, 8, 9]), torch.tensor([30, 31, 32]))
    queue.enqueue(rows(3, 2), torch.tensor([1, 2]))
    features, labels, ids = queue.contents()
    assert features[:, 0].tolist() == [1, 2, 3, 4]
    assert labels.tolist() == [8, 9, 1, 2]
    assert ids.tolist() == [31, 32, -1, -1]


def test_state_round_trip_and_shape_check():
    queue = NegativeQueue(length=4, dim=3)
    queue.enqueue(rows(0, 6))
    restored = NegativeQueue(length=4, dim=3)
    restored.load_state_dict(queue.state_dict())
    torch.testing.assert_close(restored.contents()[0], queue.contents()[0])
    restored.enqueue(rows(6, 1))
    queue.enqueue(rows(6, 1))
    torch.testing.assert_close(restored.contents()[0], queue.contents()[0])
    with pytest.raises(CodirError, match="queue_length"):
        NegativeQueue(length=8, dim=3).load_state_dict(queue.state_dict())


def test_zero_length_queue_holds_nothing_and_negative_length_is_rejected():
    queue = NegativeQueue(length=0, dim=3)
    queue.enqueue(rows(0, 4))
    assert queue.contents()[0].shape == (0, 3)
    with pytest.raises(CodirError, match="queue length -1"):
        NegativeQueue(length=-1, dim=3)
