"""Stage-1 corpus preparation: tokenise once, pack into fixed-length blocks, write a memory-mappable folder.

A prepared folder holds one subfolder per shard, `part-{i:05d}-of-{n:05d}/`, each with `tokens.bin` (the
blocks, one flat uint16/uint32 array, written by `tokenise.py`) and `meta.json` (counts of documents, tokens,
[UNK] ids, blocks ...). Documents are separated by the tokenizer's [SEP]; the [CLS] ... [SEP] around each block
are added at load time (see `data.py`). n shards can be prepared by n independent jobs; each part is written to
`<part>.partial/` and renamed when complete.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..models.loading import load_tokenizer
from ..runtime.errors import CodirError, error_line
from ..runtime.files import PARTIAL, publish
from ..runtime.progress import on_terminal
from .tokenise import write_blocks

FORMAT_VERSION = 1
UNKNOWN_NOTICE = 0.01  # a larger share of [UNK] ids is reported: likely the wrong tokenizer for this text
_BUILDERS = {".txt": "text", ".text": "text", ".cor": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
_COMPRESSIONS = (".gz", ".bz2", ".xz")
_SHARD = re.compile(r"(\d+)/(\d+)")


def prepare_corpus(
    sources: list[str],
    tokenizer: str,
    out: str,
    max_seq_length: int = 128,
    text_column: str = "text",
    num_proc: int = 1,
    shard: str = "0/1",
    dataset_config: str = "",
    split: str = "train",
    overwrite: bool = False,
) -> Path:
    """Tokenise and pack shard `shard` ("i/n") of the corpus into `<out>/part-i-of-n/`; return that folder.

    An existing part made from the same inputs is reused; one from other inputs needs `overwrite`.
    """
    start = time.perf_counter()
    index, count = parse_shard(shard)
    if max_seq_length < 3:
        raise CodirError(f"max_seq_length: {max_seq_length} leaves no room for tokens between [CLS] and [SEP]")
    block = max_seq_length - 2
    tok = load_tokenizer(tokenizer, "tokenizer")
    special, vocab_hash = special_ids(tok), tokenizer_hash(tok)
    files, hub = resolve_sources(list(sources))
    described = [{"path": f, "bytes": os.path.getsize(f)} for f in files] or [{"dataset": hub, "config": dataset_config, "split": split}]
    stamps = [{**d, "mtime_ns": os.stat(d["path"]).st_mtime_ns} for d in described] if files else described
    fingerprint = _sha256(
        {
            "format": FORMAT_VERSION,
            "sources": stamps,
            "tokenizer": vocab_hash,
            "block_length": block,
            "text_column": text_column,
            "shard": f"{index}/{count}",
        }
    )

    final = Path(out) / f"part-{index:05d}-of-{count:05d}"
    if _is_current(final, fingerprint, overwrite):
        print(f"codir-ds prepare: {final} is up to date, reusing it")
        return final
    if files and not sum(d["bytes"] for d in described):
        raise CodirError(f"prepare: the corpus {_describe(files, hub)} holds no documents (empty files)")
    if not on_terminal():
        datasets.disable_progress_bars()  # their carriage returns would pile up in a log file
    corpus = _load(files, hub, dataset_config, split)
    _check_text_column(corpus, text_column)
    corpus = corpus.shard(count, index, contiguous=True)
    if len(corpus) == 0:
        raise CodirError(f"prepare: the corpus {_describe(files, hub)} holds no documents" + (f" for shard {shard}" if count > 1 else ""))
    text_bytes = pc.sum(pc.binary_length(corpus.data.column(text_column))).as_py() or 0
    dtype = np.uint16 if len(tok) <= 65536 else np.uint32
    partial = final.with_name(final.name + PARTIAL)
    shutil.rmtree(partial, ignore_errors=True)  # left by a crashed run
    partial.mkdir(parents=True)
    with _written(partial / "tokens.bin", final), (partial / "tokens.bin").open("wb") as handle:
        counts = write_blocks(corpus.data.column(text_column), tok, block, dtype, handle, num_proc)
    if counts["blocks"] == 0:
        shutil.rmtree(partial, ignore_errors=True)
        raise CodirError(
            f"prepare: the corpus {_describe(files, hub)} is too short for one block of {block} tokens (it has {counts['tokens']} tokens)"
        )
    counts["dropped_tail_tokens"] = counts["tokens"] - counts["blocks"] * block
    meta = {
        "format": FORMAT_VERSION,
        "tokenizer": tok.name_or_path,
        "tokenizer_hash": vocab_hash,
        "vocab_size": len(tok),
        "dtype": np.dtype(dtype).name,
        "block_length": block,
        "special_ids": special,
        "counts": counts,
        "sources": described,
        "text_column": text_column,
        "shard": f"{index}/{count}",
        "fingerprint": fingerprint,
    }
    with _written(partial / "meta.json", final):
        (partial / "meta.json").write_text(json.dumps(meta, indent=1))
    publish(partial, final)  # replaces an earlier part (--overwrite)

    seconds = time.perf_counter() - start
    print(
        f"codir-ds prepare: part {index}/{count}: {counts['documents']:,} documents, {counts['tokens']:,} tokens, "
        f"{counts['blocks']:,} blocks of {block} in {seconds:.1f} s ({text_bytes / seconds / 1e6:.2f} MB/s, "
        f"{counts['tokens'] / seconds:,.0f} tokens/s) -> {final}"
    )
    if counts["unknown"] > UNKNOWN_NOTICE * counts["tokens"]:
        print(
            f"codir-ds prepare: notice: {counts['unknown'] / counts['tokens']:.1%} of the tokens are {tok.unk_token} (unknown to the "
            f"tokenizer {tok.name_or_path}); is it the teacher's tokenizer for this text?"
        )
    return final


def parse_shard(shard: str) -> tuple[int, int]:
    """ "i/n" -> (i, n) with 0 <= i < n."""
    match = _SHARD.fullmatch(str(shard).strip())
    if not match or not int(match[1]) < int(match[2]):
        raise CodirError(f"shard: {shard!r} is not 'i/n' with 0 <= i < n (e.g. '0/1' or '3/8')")
    return int(match[1]), int(match[2])


def tokenizer_hash(tokenizer) -> str:
    """sha256 of the tokenizer's sorted vocabulary: equal hashes mean equal token ids."""
    return _sha256(sorted(tokenizer.get_vocab().items()))


def special_ids(tokenizer) -> dict[str, int | None]:
    """The ids of [CLS], [SEP], [MASK], [PAD] and [UNK]; the first three are required."""
    ids = {
        "cls": tokenizer.cls_token_id,
        "sep": tokenizer.sep_token_id,
        "mask": tokenizer.mask_token_id,
        "pad": tokenizer.pad_token_id,
        "unk": tokenizer.unk_token_id,
    }
    missing = [name for name in ("cls", "sep", "mask") if ids[name] is None]
    if missing:
        raise CodirError(f"tokenizer {tokenizer.name_or_path!r} has no {'/'.join(missing).upper()} token; masked-LM blocks need CLS, SEP and MASK")
    return ids


def resolve_sources(sources: list[str]) -> tuple[list[str], str]:
    """(files, "") for local files and glob patterns (expanded, sorted), or ([], name) for one hub dataset."""
    if not sources:
        raise CodirError("prepare: give corpus files, glob patterns or one dataset name")
    files = []
    for source in sources:
        if glob.has_magic(source):
            matched = sorted(p for p in glob.glob(os.path.expanduser(source)) if os.path.isfile(p))
            if not matched:
                raise CodirError(f"prepare: the pattern {source} matches no file")
            files += matched
        elif os.path.isfile(os.path.expanduser(source)):
            files.append(os.path.expanduser(source))
        elif len(sources) == 1 and not _looks_like_path(source):
            return [], source
        else:
            raise CodirError(f"prepare: no such file {source}")
    _builder(files)
    return files, ""


def _load(files: list[str], hub: str, dataset_config: str, split: str) -> datasets.Dataset:
    try:
        if hub:
            return datasets.load_dataset(hub, dataset_config or None, split=split)
        builder = _builder(files)
        extra = {"encoding_errors": "replace"} if builder == "text" else {}
        return datasets.load_dataset(builder, data_files=files, split="train", **extra)
    except Exception as err:  # datasets/pyarrow raise many types for unreadable files
        cause = _root_cause(err)
        raise CodirError(f"prepare: cannot read {_describe(files, hub)}: {type(cause).__name__}: {error_line(cause, limit=200)}") from None


def _check_text_column(corpus: datasets.Dataset, column: str) -> None:
    if column not in corpus.column_names:
        raise CodirError(f"text_column: no column {column!r}; the corpus has {corpus.column_names}")
    values = corpus.data.column(column)
    if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type) or pa.types.is_null(values.type)):
        raise CodirError(f"text_column: column {column!r} holds {values.type}, not text")
    if len(values) and values.null_count == len(values):
        raise CodirError(f"text_column: column {column!r} holds only nulls; the corpus has {corpus.column_names}")


def _builder(files: list[str]) -> str:
    kinds = set()
    for path in files:
        suffix = _suffix(path)
        if suffix not in _BUILDERS:
            raise CodirError(
                f"prepare: unsupported file type {path} (use {', '.join(sorted(_BUILDERS))}, optionally {'/'.join(_COMPRESSIONS)} compressed)"
            )
        kinds.add(_BUILDERS[suffix])
    if len(kinds) > 1:
        raise CodirError(f"prepare: mixed file types {sorted(kinds)}; give files of one type")
    return kinds.pop()


def _suffix(path: str) -> str:
    name = Path(path).name.lower()
    for compression in _COMPRESSIONS:
        name = name.removesuffix(compression)
    return Path(name).suffix


def _looks_like_path(source: str) -> bool:
    return source.startswith(("/", ".", "~")) or _suffix(source) in _BUILDERS or source.endswith(_COMPRESSIONS)


def _is_current(part: Path, fingerprint: str, overwrite: bool) -> bool:
    """Whether `part` exists and was made from the same inputs; an outdated one needs `overwrite`."""
    if overwrite or not (part / "meta.json").is_file():
        return False
    if json.loads((part / "meta.json").read_text()).get("fingerprint") != fingerprint:
        raise CodirError(
            f"prepare: {part} was prepared from other inputs (corpus, tokenizer, max_seq_length, "
            "text_column or shard); pass --overwrite=true to codir-ds prepare, or delete that folder, to prepare it again"
        )
    return True


def _root_cause(err: BaseException) -> BaseException:
    while err.__cause__ is not None or err.__context__ is not None:
        err = err.__cause__ or err.__context__
    return err


def _describe(files: list[str], hub: str) -> str:
    return hub or (files[0] if len(files) == 1 else f"{files[0]} (+{len(files) - 1} more files)")


def _sha256(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


@contextmanager
def _written(path: Path, final: Path):
    """An OSError while writing `path` (a full disk, a quota) becomes one line naming it and `final`, which is left
    untouched; the partial folder is removed."""
    try:
        yield
    except OSError as err:
        shutil.rmtree(final.with_name(final.name + PARTIAL), ignore_errors=True)
        raise CodirError(
            f"prepare: cannot write {path} ({err.strerror or error_line(err)}); {final} is left untouched: free disk space and run again"
        ) from None
