"""Prepared corpus -> masked micro-batches: a pure function of (corpus, seed, global sample index)."""

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from codir_ds.pretrain.data import MicroBatches, PreparedCorpus, mask_blocks, micro_batch_loader, sample_blocks
from codir_ds.runtime.errors import CodirError

SPECIAL = {"cls": 2, "sep": 3, "mask": 4, "pad": 0, "unk": 1}
VOCAB = 1000


def write_part(
    folder: Path, blocks: int, block_length: int, part: int = 0, parts: int = 1, tokens: np.ndarray | None = None, tokenizer_hash: str = "h"
) -> Path:
    """A prepared part written directly; `tokens` None makes a sparse all-zero tokens.bin."""
    path = folder / f"part-{part:05d}-of-{parts:05d}"
    path.mkdir(parents=True)
    with (path / "tokens.bin").open("wb") as handle:
        if tokens is None:
            handle.truncate(blocks * block_length * 2)
        else:
            tokens.astype(np.uint16).tofile(handle)
    meta = {
        "format": 1,
        "tokenizer": "test",
        "tokenizer_hash": tokenizer_hash,
        "vocab_size": VOCAB,
        "dtype": "uint16",
        "block_length": block_length,
        "special_ids": SPECIAL,
        "counts": {"documents": 1, "blocks": blocks},
        "sources": [{"path": "x", "bytes": 1}],
        "shard": f"{part}/{parts}",
    }
    (path / "meta.json").write_text(json.dumps(meta))
    return folder


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> PreparedCorpus:
    """Two parts, 50 + 47 blocks of 14 random tokens with document separators."""
    rng = np.random.default_rng(0)
    folder = tmp_path_factory.mktemp("prepared")
    for part, blocks in enumerate([50, 47]):
        tokens = rng.integers(5, VOCAB, size=(blocks, 14))
        tokens[rng.random(tokens.shape) < 0.05] = SPECIAL["sep"]
        write_part(folder, blocks, 14, part, 2, tokens)
    return PreparedCorpus(str(folder))


@pytest.mark.parametrize("n", [1, 2, 7, 1000, 2**16 + 3])
def test_block_order_is_a_bijection_per_epoch(n):
    first = sample_blocks(np.arange(n), n, seed=0)
    assert np.array_equal(np.sort(first), np.arange(n))
    second = sample_blocks(np.arange(n, 2 * n), n, seed=0)
    assert np.array_equal(np.sort(second), np.arange(n))
    if n >= 7:
        assert not np.array_equal(first, second)
        assert not np.array_equal(first, sample_blocks(np.arange(n), n, seed=1))
        assert not np.array_equal(first, np.arange(n))


def test_blocks_read_across_parts(corpus):
    assert len(corpus) == 97
    assert corpus.meta["counts"] == {"documents": 2, "blocks": 97}
    first = np.fromfile(corpus.parts[0] / "tokens.bin", dtype=np.uint16).reshape(-1, 14)
    second = np.fromfile(corpus.parts[1] / "tokens.bin", dtype=np.uint16).reshape(-1, 14)
    assert np.array_equal(corpus.blocks(np.array([96, 0, 50, 49])), np.stack([second[46], first[0], second[0], first[49]]))


def test_same_sample_same_mask_for_any_world_size_or_accumulation(corpus):
    two_ranks = MicroBatches(corpus, micro_batch_size=4, gradient_accumulation_steps=1, world_size=2, rank=1, seed=5)
    one_rank = MicroBatches(corpus, micro_batch_size=4, gradient_accumulation_steps=2, world_size=1, rank=0, seed=5)
    for j in range(16):  # 128 samples: into the second epoch of 97 blocks
        a, b = two_ranks[j], one_rank[2 * j + 1]
        assert all(torch.equal(a[k], b[k]) for k in a)
    fresh = MicroBatches(corpus, 4, 1, 2, 1, seed=5)[3]
    assert all(torch.equal(fresh[k], two_ranks[3][k]) for k in fresh)
    assert not torch.equal(two_ranks[3]["labels"], MicroBatches(corpus, 4, 1, 2, 1, seed=6)[3]["labels"])


def test_each_step_holds_the_same_samples_for_equal_global_batch(corpus):
    layouts = [(8, 1, 1), (4, 1, 2), (2, 2, 2), (1, 2, 4), (2, 4, 1)]  # (b, a, w): G = 8
    for step in range(3):
        per_layout = []
        for b, a, w in layouts:
            ranks = [np.concatenate([MicroBatches(corpus, b, a, w, r).sample_indices(step * a + m) for m in range(a)]) for r in range(w)]
            assert sum(len(x) for x in ranks) == len(np.unique(np.concatenate(ranks))) == 8  # disjoint ranks
            per_layout.append(set(np.concatenate(ranks).tolist()))
        assert all(s == set(range(8 * step, 8 * step + 8)) for s in per_layout)
    batches = MicroBatches(corpus, micro_batch_size=3, seed=2)
    ids = np.concatenate([batches[j]["sample_index"].numpy() for j in range(33)])[: len(corpus)]
    assert np.array_equal(np.sort(sample_blocks(ids, len(corpus), seed=2)), np.arange(len(corpus)))  # epoch 0: each block once


def test_masking_rates_and_special_tokens():
    rng = np.random.default_rng(1)
    blocks = rng.integers(5, VOCAB, size=(4000, 126))
    blocks[:, ::9] = SPECIAL["sep"]
    blocks[7], blocks[7, 3] = SPECIAL["sep"], 42  # one row of a single ordinary token: fewer than m to select
    input_ids, labels, positions = mask_blocks(blocks, np.arange(4000), seed=3, special_ids=SPECIAL, vocab_size=VOCAB, mlm_probability=0.15)
    assert input_ids.shape == labels.shape == (4000, 128)
    assert positions.shape == (4000, round(0.15 * 126))  # the same number of masked positions in every row
    assert input_ids.dtype == labels.dtype == positions.dtype == torch.int64
    assert (positions.diff(dim=1) > 0).all()  # ascending, no repeats
    labelled = torch.zeros_like(labels, dtype=torch.bool).scatter_(1, positions, True)
    assert torch.equal(labels.ne(-100), labelled & labels.ne(-100))  # labels only at the listed positions
    assert labels[7].ne(-100).sum() == 1  # the short row: its one ordinary token, the rest of its positions unlabelled
    assert (labels.ne(-100).sum(dim=1) == positions.shape[1]).sum() == 3999
    original = torch.from_numpy(np.pad(blocks, ((0, 0), (1, 1)), constant_values=0))
    original[:, 0], original[:, -1] = SPECIAL["cls"], SPECIAL["sep"]
    special = torch.isin(original, torch.tensor(list(SPECIAL.values())))
    selected = labels.ne(-100)
    assert not (selected & special).any()
    assert torch.equal(input_ids[special], original[special])
    assert torch.equal(labels[selected], original[selected])
    assert torch.equal(input_ids[~selected], original[~selected])
    assert abs(selected.sum().item() / (~special).sum().item() - 19 / (126 - 14)) < 0.005  # m over a row's ordinary tokens
    chosen = input_ids[selected]
    masked, kept = chosen.eq(SPECIAL["mask"]).float().mean(), chosen.eq(original[selected]).float().mean()
    assert abs(masked - 0.8) < 0.01
    assert abs(kept - 0.1) < 0.01
    assert abs(1 - masked - kept - 0.1) < 0.01
    replaced = chosen[chosen.ne(SPECIAL["mask"]) & chosen.ne(original[selected])]
    assert replaced.min() >= 5
    assert replaced.max() < VOCAB
    assert len(replaced.unique()) > 500


def test_workers_and_resume_give_the_same_batches(corpus):
    batches = MicroBatches(corpus, micro_batch_size=4, gradient_accumulation_steps=2, world_size=2, rank=1, seed=7)
    inline = [b for _, b in zip(range(12), micro_batch_loader(batches, 0, num_workers=0))]
    with_workers = [b for _, b in zip(range(12), micro_batch_loader(batches, 0, num_workers=2))]
    resumed = next(iter(micro_batch_loader(batches, 9, num_workers=0)))
    for a, b in zip(inline, with_workers):
        assert all(torch.equal(a[k], b[k]) and b[k].dtype == torch.int64 for k in a)
    assert all(torch.equal(resumed[k], inline[9][k]) for k in resumed)
    assert inline[9]["sample_index"].tolist() == [4 * 16 + 3 * 4 + i for i in range(4)]  # step 4, micro 1, rank 1


def test_resume_at_the_end_of_ten_million_blocks_is_instant(tmp_path):
    write_part(tmp_path, 10_000_000, 6)  # sparse tokens.bin
    start = time.perf_counter()
    corpus = PreparedCorpus(str(tmp_path))
    batches = MicroBatches(corpus, micro_batch_size=32, gradient_accumulation_steps=4, world_size=8, rank=7)
    last = 10_000_000 // (32 * 4 * 8) * 4 - 1  # the last micro-batch of epoch 0 on rank 7
    batch = next(iter(micro_batch_loader(batches, last, num_workers=0)))
    assert time.perf_counter() - start < 1.0
    assert len(corpus) == 10_000_000
    assert batch["input_ids"].shape == (32, 8)
    assert 9_990_000 < batch["sample_index"][-1] < 10_000_000


def test_broken_folders_are_one_clear_line(tmp_path):
    cases = [(tmp_path / "none", "not a prepared corpus, run codir-ds prepare")]
    write_part(tmp_path / "mixed", 3, 6, 0, 2)
    write_part(tmp_path / "mixed", 3, 8, 1, 2)
    cases.append((tmp_path / "mixed", "block_length 8 differs"))
    write_part(tmp_path / "gap", 3, 6, 0, 3)
    write_part(tmp_path / "gap", 3, 6, 2, 3)
    cases.append((tmp_path / "gap", r"part\(s\) \[1\] of 3 missing"))
    write_part(tmp_path / "short", 3, 6)
    with (tmp_path / "short" / "part-00000-of-00001" / "tokens.bin").open("r+b") as handle:
        handle.truncate(10)
    cases.append((tmp_path / "short", "10 bytes, expected 3 blocks of 6 uint16"))
    for folder, message in cases:
        with pytest.raises(CodirError, match=message) as err:
            PreparedCorpus(str(folder))
        assert "\n" not in str(err.value)
