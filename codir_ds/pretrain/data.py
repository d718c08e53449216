"""Stage-1 training data from a prepared folder (see `prepare.py`): masked micro-batches as a pure function of
(corpus, seed, global sample index).

Global sample g is block `perm_{seed, e}(g % N)` of epoch e = g // N, where perm is a keyed Feistel bijection
computed per index, and its mask comes from a hash of (seed, g, position). So any micro-batch is computed in
O(1) from its number: resuming, or changing world size / accumulation at equal global batch, sees exactly the
samples of the uninterrupted run.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..runtime.distributed import rank0_first
from ..runtime.errors import CodirError
from .config import DataConfig
from .prepare import prepare_corpus, tokenizer_hash

_PART = re.compile(r"part-(\d{5})-of-(\d{5})")
_M64 = 0xFFFFFFFFFFFFFFFF
_GAMMA, _MUL1, _MUL2 = 0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
_U64 = [np.uint64(c) for c in (_GAMMA, _MUL1, _MUL2, 30, 27, 31)]  # as numpy scalars, made once
_FEISTEL_ROUNDS = 4
_CHUNK = 64  # micro-batches whose block ids are computed together
_PERMUTATION_DOMAIN, _MASK_DOMAIN = 0x5045524D, 0x4D41534B  # keep the block order and the masks independent
_HOLD_OUT_DOMAIN = 0x484F4C44  # the split into held-out and training blocks: one fixed order per corpus size


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser of x + golden gamma, elementwise on a uint64 array (wrapping arithmetic)."""
    z = x + _U64[0]
    z ^= z >> _U64[3]
    z *= _U64[1]
    z ^= z >> _U64[4]
    z *= _U64[2]
    z ^= z >> _U64[5]
    return z


def hash64(*parts: int) -> int:
    """splitmix64 (as in `splitmix64`, on Python ints) folded over `parts`: a 64-bit key."""
    h = 0
    for part in parts:
        z = (h ^ part) + _GAMMA & _M64
        z = (z ^ (z >> 30)) * _MUL1 & _M64
        z = (z ^ (z >> 27)) * _MUL2 & _M64
        h = z ^ (z >> 31)
    return h


def feistel_permute(positions: np.ndarray, n: int, keys: list[int]) -> np.ndarray:
    """perm_keys(positions): a pseudo-random bijection of [0, n), evaluated per element in O(1).

    A Feistel network (one round per key) on the bits of the next power of two >= n, its halves of
    unequal width when the bit count is odd; results >= n are permuted again (cycle walking) until they
    land in [0, n). An even number of keys brings the halves back to their starting widths.
    """
    bits = max(1, (n - 1).bit_length())
    left_width, right_width = bits - bits // 2, bits // 2
    rounds = [(np.uint64(key), np.uint64((1 << (left_width, right_width)[i % 2]) - 1)) for i, key in enumerate(keys)]
    shift, low = np.uint64(right_width), np.uint64((1 << right_width) - 1)

    def permute(x: np.ndarray) -> np.ndarray:
        left, right = x >> shift, x & low
        for key, mask in rounds:  # the halves swap widths each round
            left, right = right, left ^ (splitmix64(right ^ key) & mask)
        return (left << shift) | right

    x = permute(np.asarray(positions, dtype=np.uint64))
    while len(outside := np.flatnonzero(x >= np.uint64(n))):
        x[outside] = permute(x[outside])
    return x.astype(np.int64)


def sample_blocks(indices: np.ndarray, num_blocks: int, seed: int) -> np.ndarray:
    """The block id of each global sample index: epoch-wise keyed permutations of [0, num_blocks)."""
    epochs, positions = np.divmod(np.asarray(indices, dtype=np.int64), num_blocks)
    out = np.empty(len(positions), dtype=np.int64)
    for epoch in np.unique(epochs):  # usually one
        rows = epochs == epoch
        keys = [hash64(_PERMUTATION_DOMAIN, seed, int(epoch), r) for r in range(_FEISTEL_ROUNDS)]
        out[rows] = feistel_permute(positions[rows], num_blocks, keys)
    return out


def split_order(positions: np.ndarray, num_blocks: int) -> np.ndarray:
    """The block at each position of a fixed, seed-independent order of [0, num_blocks): its first n positions are
    the n held-out blocks, the rest the training blocks, so the two never meet on any world size or in any epoch."""
    keys = [hash64(_HOLD_OUT_DOMAIN, r) for r in range(_FEISTEL_ROUNDS)]
    return feistel_permute(positions, num_blocks, keys)


def held_out_blocks(num_blocks: int, count: int) -> np.ndarray:
    """The ids of the `count` blocks a corpus of `num_blocks` holds out for evaluation."""
    return split_order(np.arange(count), num_blocks)


def mask_blocks(
    blocks: np.ndarray, sample_indices: np.ndarray, seed: int, special_ids: dict, vocab_size: int, mlm_probability: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[CLS] block [SEP] rows, masked BERT-style: (input_ids, labels) int64 [batch, block_length + 2] and the
    masked positions int64 [batch, m], ascending.

    Every row has the same number m = round(mlm_probability * block_length) of selected positions (fixed shapes:
    the step gathers them by index, with no host sync): its m non-special positions of lowest selection hash.
    A selected token becomes [MASK] (80%), a random non-special token (10%) or stays (10%); labels hold the
    original id there, -100 elsewhere. One 64-bit hash of (seed, sample index, position) decides all three:
    bits 0-23 the selection order, bits 24-39 the replacement kind, bits 40-63 the random token. `special_ids`
    maps cls, sep, mask (pad, unk) to ids, as in a prepared corpus's meta.json; special tokens are never selected
    (a row of fewer than m ordinary tokens keeps label -100 at its extra positions).
    """
    specials = sorted({int(i) for i in special_ids.values() if i is not None})
    cls_id, sep_id, mask_id = special_ids["cls"], special_ids["sep"], special_ids["mask"]
    tokens = np.empty((len(blocks), blocks.shape[1] + 2), dtype=np.int64)
    tokens[:, 0], tokens[:, -1], tokens[:, 1:-1] = cls_id, sep_id, blocks
    row_keys = splitmix64(np.asarray(sample_indices, dtype=np.uint64) ^ np.uint64(hash64(_MASK_DOMAIN, seed)))
    h = splitmix64(row_keys[:, None] ^ np.arange(tokens.shape[1], dtype=np.uint64)[None, :])

    is_special, ordinary = _special_table(tuple(specials), vocab_size)
    special = is_special[tokens]
    count = max(1, round(mlm_probability * blocks.shape[1]))
    order = ((h & np.uint64(0xFFFFFF)) << np.uint64(16)) | np.arange(tokens.shape[1], dtype=np.uint64)  # distinct keys
    order[special] = np.iinfo(np.uint64).max  # chosen last (only in a row of fewer than `count` ordinary tokens)
    positions = np.sort(np.argpartition(order, count - 1, axis=1)[:, :count], axis=1)
    rows = np.arange(len(tokens))[:, None]
    selected = (rows * tokens.shape[1] + positions)[~special[rows, positions]]  # flat positions
    kind = (h.ravel()[selected] >> np.uint64(24)) & np.uint64(0xFFFF)
    masked = selected[kind < np.uint64(52429)]  # 80% (0.8 * 2**16): [MASK]
    randomised = selected[(kind >= np.uint64(52429)) & (kind < np.uint64(58982))]  # 10%: a random token
    labels = np.full_like(tokens, -100)
    labels.ravel()[selected] = tokens.ravel()[selected]
    flat = tokens.ravel()  # a view: inputs are built in place
    flat[masked] = mask_id
    flat[randomised] = ordinary[((h.ravel()[randomised] >> np.uint64(40)) * np.uint64(len(ordinary))) >> np.uint64(24)]
    return torch.from_numpy(tokens), torch.from_numpy(labels), torch.from_numpy(positions)


@functools.lru_cache(maxsize=8)
def _special_table(specials: tuple[int, ...], vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """A lookup table id -> is special, and the non-special ids below vocab_size."""
    is_special = np.zeros(max(vocab_size, specials[-1] + 1), dtype=bool)
    is_special[list(specials)] = True
    return is_special, np.flatnonzero(~is_special[:vocab_size])


def training_corpus(cfg: DataConfig, tokenizer, run_folder: Path) -> PreparedCorpus:
    """The prepared corpus a run reads: `data.prepared`, or `data.files` / `data.dataset` prepared into
    `<run_folder>/prepared` (by rank 0, once; a later start reuses it), checked against the teacher's tokenizer."""
    folder = cfg.prepared or str(run_folder / "prepared")
    if not cfg.prepared:  # for small corpora: the other ranks wait for rank 0 (train.comm_timeout_minutes at most)
        sources = cfg.files or [cfg.dataset]
        rank0_first(
            lambda: prepare_corpus(
                sources,
                tokenizer.name_or_path,
                folder,
                cfg.max_seq_length,
                cfg.text_column,
                cfg.prepare_processes,
                dataset_config=cfg.dataset_config,
                split=cfg.split,
            )
        )
    corpus = PreparedCorpus(folder)
    corpus.check_tokenizer(tokenizer)
    check_block_length(corpus, cfg.max_seq_length)
    return corpus


def check_block_length(corpus: PreparedCorpus, max_seq_length: int) -> None:
    """Fail unless `corpus` holds blocks for sequences of `max_seq_length` tokens."""
    if corpus.block_length != max_seq_length - 2:
        raise CodirError(
            f"data.max_seq_length: {max_seq_length}, but {corpus.folder} holds blocks for sequences of "
            f"{corpus.block_length + 2}; set data.max_seq_length={corpus.block_length + 2} or prepare again"
        )


class PreparedCorpus:
    """All parts of a prepared folder as one array of blocks, memory-mapped."""

    def __init__(self, folder: str):
        self.folder = Path(folder)
        parts = sorted(p for p in self.folder.iterdir() if _PART.fullmatch(p.name)) if self.folder.is_dir() else []
        if not parts:
            raise CodirError(f"{folder}: not a prepared corpus, run codir-ds prepare")
        numbers = {int(_PART.fullmatch(p.name)[2]) for p in parts}
        if len(numbers) > 1:
            raise CodirError(f"{folder}: holds parts of several shardings ({sorted(numbers)} parts); keep one")
        count = numbers.pop()
        missing = sorted(set(range(count)) - {int(_PART.fullmatch(p.name)[1]) for p in parts})
        if missing:
            raise CodirError(
                f"{folder}: incomplete prepared corpus, part(s) {missing} of {count} missing "
                "(still being prepared, or failed: run codir-ds prepare for them)"
            )
        self.parts = parts
        self.metas = [json.loads((p / "meta.json").read_text()) for p in parts]
        first = self.metas[0]
        for part, meta in zip(parts[1:], self.metas[1:]):
            for key in ("tokenizer_hash", "block_length", "dtype"):
                if meta[key] != first[key]:
                    raise CodirError(f"{part}: its {key} {meta[key]!r} differs from {parts[0].name}'s {first[key]!r}")
        self.block_length, self.tokenizer_hash = first["block_length"], first["tokenizer_hash"]
        self.special_ids, self.vocab_size, self.dtype = first["special_ids"], first["vocab_size"], np.dtype(first["dtype"])
        self.offsets = np.cumsum([0] + [m["counts"]["blocks"] for m in self.metas])
        content = [(m.get("fingerprint"), m["tokenizer_hash"], m["block_length"], m["counts"]) for m in self.metas]
        self.digest = hashlib.sha256(json.dumps(content).encode()).hexdigest()[:16]  # what was prepared, not where
        self.meta = {
            **first,
            "counts": {k: sum(m["counts"][k] for m in self.metas) for k in first["counts"]},
            "sources": [s for m in self.metas for s in m["sources"]],
            "shard": f"{count} parts",
        }
        self._open()

    def _open(self) -> None:
        self.arrays = []
        for part, meta in zip(self.parts, self.metas):
            path, shape = part / "tokens.bin", (meta["counts"]["blocks"], self.block_length)
            if path.stat().st_size != shape[0] * shape[1] * self.dtype.itemsize:
                raise CodirError(f"{path}: {path.stat().st_size} bytes, expected {shape[0]} blocks of {shape[1]} {self.dtype}")
            self.arrays.append(np.memmap(path, dtype=self.dtype, mode="r", shape=shape))

    def __getstate__(self) -> dict:  # workers reopen the files instead of copying them
        return {k: v for k, v in self.__dict__.items() if k != "arrays"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._open()

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def blocks(self, ids: np.ndarray) -> np.ndarray:
        """The blocks with global ids `ids`, [len(ids), block_length], in the stored dtype."""
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) and (ids.min() < 0 or ids.max() >= len(self)):
            raise IndexError(f"block ids must lie in [0, {len(self)})")
        part = np.searchsorted(self.offsets, ids, side="right") - 1
        out = np.empty((len(ids), self.block_length), dtype=self.dtype)
        for p in np.unique(part):
            rows = part == p
            out[rows] = self.arrays[p][ids[rows] - self.offsets[p]]
        return out

    def check_tokenizer(self, tokenizer) -> None:
        """Fail unless `tokenizer` (the teacher's) is the one the corpus was prepared with."""
        if tokenizer_hash(tokenizer) != self.tokenizer_hash:
            raise CodirError(
                f"{self.folder}: prepared with tokenizer {self.meta['tokenizer']!r}, whose vocabulary differs "
                f"from {tokenizer.name_or_path!r}'s; prepare the corpus again with the teacher's tokenizer"
            )


_WIRE = {"input_ids": np.int32, "labels": np.int32, "masked_positions": np.int32}  # token ids < 2**31


class Batch(dict):
    """A micro-batch (name -> CPU int64 tensor) that a DataLoader worker hands over by value, in one pipe
    write of narrow integers, instead of one shared-memory file descriptor per tensor (about 1 ms each,
    which would dominate)."""

    def __reduce__(self):
        return _batch_from_numpy, ({name: tensor.numpy().astype(_WIRE.get(name, np.int64)) for name, tensor in self.items()},)

    def __copy__(self) -> Batch:  # the DataLoader's default_convert copies it: keep that shallow
        return Batch(self)


def _batch_from_numpy(arrays: dict) -> Batch:
    return Batch({name: torch.from_numpy(array.astype(np.int64)) for name, array in arrays.items()})


class MicroBatches(Dataset):
    """Item j: this rank's j-th micro-batch since the start of training.

    With global batch G = b*a*w, micro-batch j is step s = j // a, micro-step m = j % a, chunk c = m*w + r,
    holding global samples s*G + c*b + arange(b): each step's samples are the same set for any (w, a) with
    equal G. With `held_out` n > 0, samples are drawn from the corpus's training blocks only (`split_order`
    positions n and on).
    """

    def __init__(
        self,
        corpus: PreparedCorpus,
        micro_batch_size: int,
        gradient_accumulation_steps: int = 1,
        world_size: int = 1,
        rank: int = 0,
        seed: int = 0,
        mlm_probability: float = 0.15,
        held_out: int = 0,
    ):
        if not 0 <= rank < world_size:
            raise CodirError(f"rank {rank} is not in [0, {world_size})")
        self.corpus, self.seed, self.mlm_probability, self.held_out = corpus, seed, mlm_probability, held_out
        self.training_blocks = len(corpus) - held_out
        self.micro_batch_size, self.accumulation_steps, self.world_size, self.rank = micro_batch_size, gradient_accumulation_steps, world_size, rank
        self._chunk: tuple[int, np.ndarray] = (-1, np.empty(0))

    def sample_indices(self, j) -> np.ndarray:
        """The global sample indices of micro-batch j, [b] (or [len(j), b] for an array of j)."""
        b, a, w = self.micro_batch_size, self.accumulation_steps, self.world_size
        step, micro = np.divmod(np.asarray(j, dtype=np.int64), a)
        first = step * b * a * w + (micro * w + self.rank) * b
        return first[..., None] + np.arange(b, dtype=np.int64)

    def block_ids(self, j: int) -> np.ndarray:
        """The block ids of micro-batch j. Computed for _CHUNK micro-batches at once: numpy's per-call
        overhead, not the arithmetic, dominates the Feistel network on b indices."""
        chunk, row = divmod(j, _CHUNK)
        if self._chunk[0] != chunk:
            indices = self.sample_indices(np.arange(chunk * _CHUNK, (chunk + 1) * _CHUNK))
            blocks = sample_blocks(indices.ravel(), self.training_blocks, self.seed)
            if self.held_out:
                blocks = split_order(blocks + self.held_out, len(self.corpus))
            self._chunk = (chunk, blocks.reshape(indices.shape))
        return self._chunk[1][row]

    def __getitem__(self, j: int) -> dict[str, torch.Tensor]:
        indices = self.sample_indices(j)
        blocks = self.corpus.blocks(self.block_ids(j))
        input_ids, labels, positions = mask_blocks(blocks, indices, self.seed, self.corpus.special_ids, self.corpus.vocab_size, self.mlm_probability)
        return Batch(input_ids=input_ids, labels=labels, masked_positions=positions, sample_index=torch.from_numpy(indices))


def micro_batch_loader(dataset: MicroBatches, start_micro_batch: int, num_workers: int = 2, pin_memory: bool = False) -> DataLoader:
    """Micro-batches start_micro_batch, start_micro_batch + 1, ... (O(1) to start anywhere). The batches need no
    randomness beyond their indices, so the loader leaves the process's random state alone."""
    return DataLoader(
        dataset,
        batch_size=None,
        sampler=range(start_micro_batch, 2**62),
        num_workers=num_workers,
        pin_memory=pin_memory,
        prefetch_factor=4 if num_workers else None,
        persistent_workers=num_workers > 0,
        generator=torch.Generator(),
    )  # its own: starting it must not draw from the training RNG (dropout)
