"""The memory bank: label-aware sampling, exact teacher outputs, and even sharding over ranks."""

import pytest
import torch
from helpers import save_task_teacher
from transformers import AutoModelForSequenceClassification

from codir_ds.finetune.data import padded_shards
from codir_ds.finetune.modules import TeacherTaskOutputs
from codir_ds.method.memory_bank import MemoryBank, fill_memory_bank
from codir_ds.runtime.errors import CodirError


def bank_with(labels, regression=False):
    labels = torch.tensor(labels)
    return MemoryBank(torch.randn(len(labels), 4), torch.randn(len(labels), 2), labels, regression)


def test_label_aware_negatives_never_share_the_anchor_label():
    torch.manual_seed(0)
    labels = torch.randint(0, 3, (200,))
    bank = bank_with(labels.tolist())
    idx = torch.arange(0, 200, 3)
    rows = bank.sample_negatives(idx, labels[idx], 50, torch.Generator().manual_seed(1))
    assert rows.shape == (len(idx), 50)
    assert (labels[rows] != labels[idx].unsqueeze(1)).all()
    for label in range(3):  # every other-label row can be drawn: the draw is not a fixed subset
        drawn = set(rows[labels[idx] == label].flatten().tolist())
        assert drawn == set(torch.nonzero(labels != label).flatten().tolist())


def test_regression_negatives_are_random_rows_other_than_the_anchor():
    bank = bank_with([0.5] * 10, regression=True)
    idx = torch.arange(10)
    rows = bank.sample_negatives(idx, torch.zeros(10), 400, torch.Generator().manual_seed(0))
    assert (rows != idx.unsqueeze(1)).all()
    for anchor in range(10):
        assert set(rows[anchor].tolist()) == set(range(10)) - {anchor}


def test_sampling_is_reproducible_from_the_generator_state():
    bank = bank_with([0, 1, 0, 1, 1, 0])
    generator = torch.Generator().manual_seed(3)
    state = generator.get_state()
    first = bank.sample_negatives(torch.tensor([0, 1]), torch.tensor([0, 1]), 5, generator)
    generator.set_state(state)
    assert torch.equal(first, bank.sample_negatives(torch.tensor([0, 1]), torch.tensor([0, 1]), 5, generator))


def test_one_label_training_set_is_refused():
    with pytest.raises(CodirError, match="label-aware negatives need two labels"):
        bank_with([1, 1, 1])


@pytest.mark.parametrize("count, world, batch", [(10, 1, 4), (10, 3, 2), (7, 2, 5), (2, 4, 3)])
def test_padded_shards_cover_every_row_once_with_equal_batch_counts(count, world, batch):
    shards = [list(padded_shards(count, rank, world, batch)) for rank in range(world)]
    assert len({len(s) for s in shards}) == 1  # every rank runs the same number of forwards
    real = [i for s in shards for indices, n in s for i in indices[:n]]
    assert sorted(real) == list(range(count))


def test_bank_holds_exactly_the_teachers_outputs(tmp_path):
    teacher = AutoModelForSequenceClassification.from_pretrained(save_task_teacher(tmp_path / "t", num_labels=3)).eval()
    module = TeacherTaskOutputs(teacher, [2, 4], "mean")
    torch.manual_seed(0)
    ids = torch.randint(5, 30, (11, 9))
    mask = torch.ones_like(ids)
    mask[::2, 6:] = 0  # padded rows

    def batch(indices):
        return {"input_ids": ids[indices], "attention_mask": mask[indices], "idx": torch.tensor(indices)}

    shards = ((batch(indices), real) for indices, real in padded_shards(11, 0, 1, 4))
    with torch.no_grad():
        features, logits = fill_memory_bank(lambda b: module(b["input_ids"], b["attention_mask"])[:2], shards, 11, lambda rows: rows)
        fresh = teacher(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    pooled = [(fresh.hidden_states[layer] * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True) for layer in (2, 4)]
    torch.testing.assert_close(features, torch.cat(pooled, dim=1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits, fresh.logits, rtol=1e-5, atol=1e-6)
