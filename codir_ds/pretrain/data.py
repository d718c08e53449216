"""Stage-1 data: a corpus through `datasets`, this rank's shard, packed into full sequences, masked each step.

The stream cycles over the corpus (a new shuffle each epoch) and its position is a small state dict,
so a resumed run continues where it stopped.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import datasets
import torch
from datasets.distributed import split_dataset_by_node
from transformers import DataCollatorForLanguageModeling, PreTrainedTokenizerBase

from ..errors import CodirError, error_line
from .config import DataConfig

_BUILDERS = {".txt": "text", ".text": "text", ".cor": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
_MAX_CHARS_PER_PIECE = 100_000  # very long documents are tokenised piecewise
_SHUFFLE_BUFFER = 10_000


def load_corpus(cfg: DataConfig, epoch: int, seed: int) -> datasets.IterableDataset:
    """The whole corpus as an iterable dataset, shuffled deterministically for `epoch`."""
    try:
        if cfg.dataset:
            corpus = datasets.load_dataset(cfg.dataset, cfg.dataset_config or None, split=cfg.split, streaming=cfg.streaming)
        else:
            builder = _builder_for(cfg.files)
            extra = {"encoding_errors": "replace"} if builder == "text" else {}
            corpus = datasets.load_dataset(builder, data_files=cfg.files, split="train", streaming=cfg.streaming, **extra)
    except CodirError:
        raise
    except Exception as err:  # datasets/pyarrow raise many types for unreadable files
        source = cfg.dataset or ", ".join(cfg.files)
        raise CodirError(f"data: cannot read {source}: {type(err).__name__}: {error_line(err, limit=200)}") from None
    if cfg.streaming:
        return corpus.shuffle(seed=seed + epoch, buffer_size=_SHUFFLE_BUFFER)
    if cfg.text_column not in corpus.column_names:
        raise CodirError(f"data.text_column: no column {cfg.text_column!r}; the corpus has {corpus.column_names}")
    if len(corpus) == 0:
        raise CodirError(f"data: the corpus {', '.join(cfg.files)} holds no examples")
    return corpus.shuffle(seed=seed + epoch).to_iterable_dataset(num_shards=min(len(corpus), 64))


def _builder_for(files: list[str]) -> str:
    missing = [f for f in files if not Path(f).is_file()]
    if missing:
        raise CodirError(f"data.files: no such file {missing[0]}")
    kinds = {_BUILDERS.get(Path(f).suffix.lower().removesuffix(".gz").removesuffix(".bz2")) for f in files}
    if None in kinds:
        bad = next(f for f in files if Path(f).suffix.lower() not in _BUILDERS)
        raise CodirError(f"data.files: unsupported file type {bad} (use {', '.join(sorted(_BUILDERS))})")
    if len(kinds) > 1:
        raise CodirError(f"data.files: mixed file types {sorted(kinds)}; give files of one type")
    return kinds.pop()


@dataclass
class StreamState:
    """Where this rank's stream stands: epoch, documents read in it, tokens waiting to be packed, counters."""

    epoch: int = 0
    documents_read: int = 0
    pending_tokens: list[int] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=lambda: {"documents": 0, "empty": 0, "undecodable": 0, "long": 0, "sequences": 0})


class PackedMLMStream:
    """Batches of packed, dynamically masked sequences from this rank's shard of the corpus."""

    def __init__(self, cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, batch_size: int, rank: int, world_size: int, seed: int):
        if tokenizer.cls_token_id is None or tokenizer.sep_token_id is None or tokenizer.mask_token_id is None:
            raise CodirError("teacher tokenizer needs CLS/SEP (or BOS/EOS) and MASK tokens for masked-LM packing")
        self.cfg, self.tokenizer, self.batch_size = cfg, tokenizer, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.block = cfg.max_seq_length - 2
        self.collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=cfg.mlm_probability)
        self.state = StreamState()
        self._sequences: Iterator[list[int]] | None = None

    def next_batch(self) -> dict[str, torch.Tensor]:
        """input_ids, attention_mask and MLM labels (-100 where not masked), [batch, max_seq_length]."""
        if self._sequences is None:
            self._sequences = self._packed_sequences()
        rows = [{"input_ids": next(self._sequences)} for _ in range(self.batch_size)]
        return self.collator(rows)

    def state_dict(self) -> dict:
        return {"epoch": self.state.epoch, "documents_read": self.state.documents_read,
                "pending_tokens": list(self.state.pending_tokens), "counts": dict(self.state.counts)}

    def load_state_dict(self, state: dict) -> None:
        self.state = StreamState(state["epoch"], state["documents_read"], list(state["pending_tokens"]), dict(state["counts"]))
        self._sequences = None

    def _packed_sequences(self) -> Iterator[list[int]]:
        cls_id, sep_id = self.tokenizer.cls_token_id, self.tokenizer.sep_token_id
        while True:
            produced = False
            for tokens in self._documents():
                self.state.pending_tokens.extend(tokens + [sep_id])
                while len(self.state.pending_tokens) >= self.block:
                    sequence = self.state.pending_tokens[: self.block]
                    del self.state.pending_tokens[: self.block]
                    self.state.counts["sequences"] += 1
                    produced = True
                    yield [cls_id, *sequence, sep_id]
            if not produced and self.state.epoch > 0 and not self.state.pending_tokens:
                raise CodirError("data: the corpus shard of this rank yields no text to train on")
            self.state.epoch += 1
            self.state.documents_read = 0

    def _documents(self) -> Iterator[list[int]]:
        corpus = split_dataset_by_node(load_corpus(self.cfg, self.state.epoch, self.seed), self.rank, self.world_size)
        for example in itertools.islice(corpus, self.state.documents_read, None):
            self.state.documents_read += 1
            text = example.get(self.cfg.text_column)
            if text is None:
                raise CodirError(f"data.text_column: no column {self.cfg.text_column!r}; examples have {sorted(example)}")
            counts = self.state.counts
            counts["documents"] += 1
            if not isinstance(text, str) or not text.strip():
                counts["empty"] += 1
                continue
            counts["undecodable"] += int("\ufffd" in text)
            pieces = [text[i : i + _MAX_CHARS_PER_PIECE] for i in range(0, len(text), _MAX_CHARS_PER_PIECE)]
            encoded = self.tokenizer(pieces, add_special_tokens=False, verbose=False)["input_ids"]  # packing splits them
            tokens = [t for ids in encoded for t in ids]
            counts["long"] += int(len(tokens) > self.block)  # split over several sequences
            yield tokens
