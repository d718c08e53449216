"""A corpus's text column -> the packed token stream of a prepared part, counted.

The documents are cut into batches of about equal bytes, many more than processes, which a pool tokenises
while the results are written in order: every process stays busy to the end, whatever the documents' lengths,
and the stream is the same for any number of processes. Each non-empty document's ids are followed by [SEP];
the stream is written as whole blocks and its incomplete tail dropped.
"""

from __future__ import annotations

import itertools
import multiprocessing
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ..runtime.progress import progress

BATCH_BYTES = 1_000_000  # text per tokenizer call, at most
BATCH_DOCUMENTS = 2_000  # documents per tokenizer call, at most
BATCHES_PER_PROCESS = 16  # at least: small batches even out the processes' shares
MAX_CHARS_PER_PIECE = 100_000  # very long documents are tokenised piecewise
COUNTS = ("documents", "empty", "undecodable", "long", "unknown", "tokens")
_WORKER: dict = {}  # what a pool process reads: inherited by fork, never pickled


def write_blocks(texts: pa.ChunkedArray, tokenizer, block: int, dtype, handle, processes: int) -> dict[str, int]:
    """Tokenise `texts` with `processes` processes and write whole blocks of `block` tokens to `handle`; return the
    counts: documents, empty, undecodable (holding U+FFFD), long (more tokens than a block), unknown ([UNK] ids),
    tokens (separators included) and blocks."""
    counts, carry = Counter(dict.fromkeys(COUNTS, 0)), np.empty(0, dtype)
    with _tokenised(texts, tokenizer, block, dtype, processes) as results, progress(len(texts), "documents", "codir-ds prepare: tokenising") as bar:
        for ids, batch_counts in results:
            stream = np.concatenate([carry, ids]) if len(carry) else ids
            whole = len(stream) // block * block
            handle.write(stream[:whole])  # not ndarray.tofile, which ignores a short write (a full disk)
            carry = stream[whole:].copy()
            counts.update(batch_counts)
            bar.update(batch_counts["documents"])
    return {**counts, "blocks": (counts["tokens"] - len(carry)) // block}


def balanced_batches(texts: pa.ChunkedArray, processes: int) -> list[tuple[int, int]]:
    """(start, stop) row ranges of about equal text bytes, at least BATCHES_PER_PROCESS per process, at most
    BATCH_BYTES and BATCH_DOCUMENTS each (a document longer than that is a batch of its own)."""
    ends = np.cumsum(pc.fill_null(pc.binary_length(texts), 0).to_numpy())
    total = int(ends[-1]) if len(ends) else 0
    size = max(1, min(BATCH_BYTES, total // (processes * BATCHES_PER_PROCESS)))
    byte_cuts = np.searchsorted(ends, np.arange(size, total, size), side="right")
    cuts = np.union1d(np.union1d(byte_cuts, np.arange(0, len(ends), BATCH_DOCUMENTS)), [len(ends)])
    return [(int(start), int(stop)) for start, stop in itertools.pairwise(cuts)]


@contextmanager
def _tokenised(texts: pa.ChunkedArray, tokenizer, block: int, dtype, processes: int) -> Iterator[Iterator]:
    """The batches' (ids, counts), in order: from a pool of `processes` forked processes, or from this one."""
    _WORKER.update(texts=texts, tokenizer=tokenizer, block=block, dtype=dtype)
    batches = balanced_batches(texts, processes)
    try:
        if processes > 1:
            with multiprocessing.get_context("fork").Pool(min(processes, len(batches))) as pool:
                yield pool.imap(_tokenise_rows, batches)
        else:
            yield map(_tokenise_rows, batches)
    finally:
        _WORKER.clear()


def _tokenise_rows(rows: tuple[int, int]) -> tuple[np.ndarray, dict[str, int]]:
    start, stop = rows
    texts = _WORKER["texts"].slice(start, stop - start).to_pylist()
    return tokenise(texts, _WORKER["tokenizer"], _WORKER["block"], _WORKER["dtype"])


def tokenise(texts: list[str | None], tokenizer, block: int, dtype) -> tuple[np.ndarray, dict[str, int]]:
    """The documents' ids as one stream, [SEP] after each non-empty one, and their counts (see `write_blocks`)."""
    pieces, owners = [], []
    for doc, text in enumerate(texts):
        if text is not None and text.strip():
            for piece in _pieces(text):
                pieces.append(piece)
                owners.append(doc)
    encoded = (
        tokenizer(pieces, add_special_tokens=False, return_attention_mask=False, return_token_type_ids=False, verbose=False)["input_ids"]
        if pieces
        else []
    )
    ids = [[] for _ in texts]
    for doc, piece in zip(owners, encoded):
        ids[doc] += piece
    for doc in set(owners):
        ids[doc].append(tokenizer.sep_token_id)
    lengths = np.fromiter(map(len, ids), np.int64, len(ids))
    stream = np.fromiter(itertools.chain.from_iterable(ids), dtype, int(lengths.sum()))
    unknown = tokenizer.unk_token_id
    counts = {
        "documents": len(texts),
        "empty": int(np.count_nonzero(lengths == 0)),
        "undecodable": sum(text is not None and "\ufffd" in text for text in texts),
        "long": int(np.count_nonzero(lengths > block + 1)),
        "unknown": int(np.count_nonzero(stream == unknown)) if unknown is not None else 0,
        "tokens": len(stream),
    }
    return stream, counts


def _pieces(text: str):
    """`text` in pieces of at most MAX_CHARS_PER_PIECE characters, each cut before a space where there is
    one, so that no word is split."""
    start = 0
    while len(text) - start > MAX_CHARS_PER_PIECE:
        cut = text.rfind(" ", start + 1, start + MAX_CHARS_PER_PIECE)
        cut = cut if cut > 0 else start + MAX_CHARS_PER_PIECE
        yield text[start:cut]
        start = cut
    yield text[start:]
