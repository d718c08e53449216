"""`codir-ds prepare`: corpus -> packed token blocks in `part-*` folders, counted, sharded, atomic, reusable."""

import gzip
import json
import os
import resource
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from helpers import REPO, WORDS, child_env, write_corpus
from transformers import AutoTokenizer, BertTokenizerFast

from codir_ds.pretrain import prepare as prep
from codir_ds.pretrain.data import PreparedCorpus
from codir_ds.pretrain.prepare import prepare_corpus
from codir_ds.runtime.errors import CodirError

SEQ = 32  # blocks of 30 tokens


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus") / "c.txt", documents=300)


@pytest.fixture(scope="module")
def prepared(corpus, tiny_teacher, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prepared")
    prepare_corpus([str(corpus)], str(tiny_teacher), str(out), max_seq_length=SEQ)
    return out


@pytest.fixture(scope="module")
def tokenizer(tiny_teacher):
    return AutoTokenizer.from_pretrained(tiny_teacher)


def stream_words(documents: list[str], sep: str = "[SEP]") -> list[str]:
    """The expected token stream of whitespace-separated word documents: words, then the separator."""
    return [word for doc in documents if doc.strip() for word in [*doc.split(), sep]]


def all_tokens(folder: Path) -> np.ndarray:
    corpus = PreparedCorpus(str(folder))
    return corpus.blocks(np.arange(len(corpus))).ravel()


def test_blocks_decode_to_the_documents_and_meta_counts_them(prepared, corpus, tokenizer):
    documents = corpus.read_text().splitlines()
    words = stream_words(documents)
    reader = PreparedCorpus(str(prepared))
    blocks = len(words) // (SEQ - 2)
    assert len(reader) == blocks
    assert reader.block_length == SEQ - 2
    assert reader.blocks(np.arange(blocks)).dtype == np.uint16
    assert tokenizer.decode(all_tokens(prepared)) == " ".join(words[: blocks * (SEQ - 2)])
    meta = json.loads((prepared / "part-00000-of-00001" / "meta.json").read_text())
    long = sum(len(d.split()) > SEQ - 2 for d in documents)
    assert meta["counts"] == {
        "documents": 300,
        "empty": 0,
        "undecodable": 0,
        "long": long,
        "unknown": 0,
        "tokens": len(words),
        "blocks": blocks,
        "dropped_tail_tokens": len(words) - blocks * (SEQ - 2),
    }
    assert meta["special_ids"]["sep"] == tokenizer.sep_token_id
    assert meta["vocab_size"] == len(tokenizer)
    assert meta["sources"] == [{"path": str(corpus), "bytes": corpus.stat().st_size}]
    assert meta["shard"] == "0/1"
    assert meta["tokenizer_hash"] == prep.tokenizer_hash(tokenizer)
    assert sorted(os.listdir(prepared / "part-00000-of-00001")) == ["meta.json", "tokens.bin"]


def test_empty_undecodable_and_long_documents_are_counted(tiny_teacher, tmp_path):
    corpus = tmp_path / "messy.txt"
    long_doc = b" ".join([b"is was"] * 30)  # 60 tokens: longer than a block of 30
    corpus.write_bytes(b"the a of\n\n   \nand \xff\xfe to in\n" + long_doc + b"\n" + b"of the " * 20 + b"\n")
    prepare_corpus([str(corpus)], str(tiny_teacher), str(tmp_path / "out"), max_seq_length=SEQ)
    counts = PreparedCorpus(str(tmp_path / "out")).meta["counts"]
    tokens = 4 + 4 + 61 + 41  # the tokenizer drops U+FFFD
    assert counts == {
        "documents": 6,
        "empty": 2,
        "undecodable": 1,
        "long": 2,
        "unknown": 0,
        "tokens": tokens,
        "blocks": tokens // 30,
        "dropped_tail_tokens": tokens % 30,
    }


def test_wordpiece_tokens_equal_whole_document_tokens_from_compressed_jsonl(tmp_path):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    texts = [
        "Hello, World! The quick brown fox.",
        "Numbers 12345 and (brackets) in 2024.",
        "A very long one: " + "Lorem ipsum dolor sit amet. " * 8000,
    ]  # > 100,000 characters: tokenised in pieces
    wordpiece = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wordpiece.normalizer, wordpiece.pre_tokenizer = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    wordpiece.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=200, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
    BertTokenizerFast(tokenizer_object=wordpiece).save_pretrained(tmp_path / "wp")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "wp")  # with its WordPiece decoder
    with gzip.open(tmp_path / "docs.jsonl.gz", "wt") as handle:
        handle.writelines(json.dumps({"text": t}) + "\n" for t in texts)

    prepare_corpus([str(tmp_path / "docs.jsonl.gz")], str(tmp_path / "wp"), str(tmp_path / "out"), max_seq_length=SEQ)
    tokens = all_tokens(tmp_path / "out")
    expected = [i for t in texts for i in [*tokenizer(t, add_special_tokens=False).input_ids, tokenizer.sep_token_id]]
    assert tokens.tolist() == expected[: len(tokens)]
    assert len(expected) - len(tokens) < SEQ - 2
    decoded = tokenizer.decode(tokens[:40]).replace(" ", "")
    assert decoded == "".join(t.lower().replace(" ", "") + "[SEP]" for t in texts)[: len(decoded)]


def test_shards_hold_contiguous_halves(prepared, corpus, tiny_teacher, tokenizer, tmp_path):
    halves = tmp_path / "halves"
    for i in range(2):
        prepare_corpus([str(corpus)], str(tiny_teacher), str(halves), max_seq_length=SEQ, shard=f"{i}/2")
        if i == 0:
            with pytest.raises(CodirError, match=r"part\(s\) \[1\] of 2 missing"):
                PreparedCorpus(str(halves))
    documents = corpus.read_text().splitlines()
    reader = PreparedCorpus(str(halves))
    ends = np.cumsum([0] + [m["counts"]["blocks"] for m in reader.metas])
    for i, half in enumerate([documents[:150], documents[150:]]):
        words = stream_words(half)
        part = reader.blocks(np.arange(ends[i], ends[i + 1])).ravel()
        assert tokenizer.decode(part) == " ".join(words[: len(part)])
        assert len(words) - len(part) < SEQ - 2
    assert len(reader) == ends[-1]
    assert reader.meta["counts"]["documents"] == 300
    assert len(reader.meta["sources"]) == 2


def test_two_processes_give_the_same_tokens(prepared, corpus, tiny_teacher, tmp_path):
    prepare_corpus([str(corpus)], str(tiny_teacher), str(tmp_path), max_seq_length=SEQ, num_proc=2)
    assert np.array_equal(all_tokens(tmp_path), all_tokens(prepared))
    assert (tmp_path / "part-00000-of-00001/tokens.bin").read_bytes() == (prepared / "part-00000-of-00001/tokens.bin").read_bytes()


def test_batches_hold_about_equal_bytes_in_order():
    import pyarrow as pa

    from codir_ds.pretrain.tokenise import BATCH_DOCUMENTS, balanced_batches

    texts = pa.chunked_array([["a" * 10] * 100 + ["b" * 5_000] + [None] * 3, ["c" * 10] * 99])
    batches = balanced_batches(texts, processes=2)
    assert [start for start, _ in batches] == [0] + [stop for _, stop in batches[:-1]]
    assert batches[-1][1] == len(texts)
    share = 6_990 // (2 * 16)  # bytes per batch: 16 per process
    sizes = {(a, b): sum(len(t or "") for t in texts[a:b].to_pylist()) for a, b in batches}
    assert all(size <= share + 10 for (a, b), size in sizes.items() if not a <= 100 < b)  # all but the long one's
    assert len(balanced_batches(pa.chunked_array([["abc"] * 960]), processes=2)) == 32
    assert [b - a for a, b in balanced_batches(pa.chunked_array([[""] * 5_000]), processes=1)] == [BATCH_DOCUMENTS, BATCH_DOCUMENTS, 1_000]


def test_in_a_pipe_unknown_words_are_counted_noticed_and_no_bar_is_drawn(tiny_teacher, tmp_path):
    corpus = tmp_path / "foreign.txt"
    corpus.write_text("".join(f"{WORDS[i % 5]} qux quux corge grault\n" for i in range(40)))  # 4 of every 6 tokens unknown
    command = [sys.executable, "-m", "codir_ds", "prepare", str(corpus), f"--tokenizer={tiny_teacher}", f"--out={tmp_path / 'out'}"]
    result = subprocess.run(
        [*command, f"--max_seq_length={SEQ}", "--num_proc=2"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=child_env(PYTHONPATH=str(REPO)),
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "\r" not in result.stdout + result.stderr
    counts = PreparedCorpus(str(tmp_path / "out")).meta["counts"]
    assert (counts["unknown"], counts["tokens"]) == (160, 240)
    assert f"notice: 66.7% of the tokens are [UNK] (unknown to the tokenizer {tiny_teacher})" in result.stdout


def test_interrupted_prepare_leaves_no_readable_part(corpus, tiny_teacher, tmp_path, monkeypatch):
    def crash(partial, final):
        raise KeyboardInterrupt  # killed after tokens.bin and meta.json were written, before the rename

    with monkeypatch.context() as patch:
        patch.setattr(prep, "publish", crash)
        with pytest.raises(KeyboardInterrupt):
            prepare_corpus([str(corpus)], str(tiny_teacher), str(tmp_path), max_seq_length=SEQ)
    assert (tmp_path / "part-00000-of-00001.partial" / "tokens.bin").is_file()
    with pytest.raises(CodirError, match="not a prepared corpus, run codir-ds prepare"):
        PreparedCorpus(str(tmp_path))
    prepare_corpus([str(corpus)], str(tiny_teacher), str(tmp_path), max_seq_length=SEQ)
    assert os.listdir(tmp_path) == ["part-00000-of-00001"]
    assert len(PreparedCorpus(str(tmp_path))) > 0


def test_rerun_reuses_and_changed_input_needs_overwrite(tiny_teacher, tmp_path, capsys):
    corpus = write_corpus(tmp_path / "c.txt", documents=40)
    out = tmp_path / "out"
    tokens_bin = prepare_corpus([str(corpus)], str(tiny_teacher), str(out), max_seq_length=SEQ) / "tokens.bin"
    stamp = tokens_bin.stat().st_mtime_ns
    prepare_corpus([str(corpus)], str(tiny_teacher), str(out), max_seq_length=SEQ)
    assert tokens_bin.stat().st_mtime_ns == stamp
    assert "up to date, reusing it" in capsys.readouterr().out
    part = out / "part-00000-of-00001"
    with file_size_limit(1024), pytest.raises(CodirError) as full:  # as on a full disk
        prepare_corpus([str(corpus)], str(tiny_teacher), str(out), max_seq_length=SEQ, overwrite=True)
    assert (
        str(full.value)
        == f"prepare: cannot write {part}.partial/tokens.bin (File too large); {part} is left untouched: free disk space and run again"
    )
    assert os.listdir(out) == [part.name]
    assert tokens_bin.stat().st_mtime_ns == stamp
    assert "notice" not in capsys.readouterr().out  # no [UNK] in this corpus
    write_corpus(corpus, documents=60, seed=1)
    with pytest.raises(CodirError, match="other inputs.*--overwrite=true") as err:
        prepare_corpus([str(corpus)], str(tiny_teacher), str(out), max_seq_length=SEQ)
    assert "\n" not in str(err.value)
    assert str(out / "part-00000-of-00001") in str(err.value)
    prepare_corpus([str(corpus)], str(tiny_teacher), str(out), max_seq_length=SEQ, overwrite=True)
    assert PreparedCorpus(str(out)).meta["counts"]["documents"] == 60


@contextmanager
def file_size_limit(size: int):
    """Writing past `size` bytes fails (EFBIG) in this process, as writing to a full disk does."""
    handler, limits = signal.signal(signal.SIGXFSZ, signal.SIG_IGN), resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, limits[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)


def write_bad(tmp_path: Path, case: str) -> tuple[list[str], dict]:
    """Sources and extra arguments for one bad input."""
    if case == "missing":
        return [str(tmp_path / "nope.txt")], {}
    if case == "glob":
        return [str(tmp_path / "*.nothing")], {}
    if case == "empty":
        (tmp_path / "empty.txt").write_text("")
        return [str(tmp_path / "empty.txt")], {}
    if case == "short":
        (tmp_path / "short.txt").write_text("the a of\n")
        return [str(tmp_path / "short.txt")], {}
    if case == "column":
        (tmp_path / "c.jsonl").write_text('{"body": "the a"}\n')
        return [str(tmp_path / "c.jsonl")], {}
    if case == "nulls":
        (tmp_path / "n.jsonl").write_text('{"text": null, "id": 1}\n{"text": null, "id": 2}\n')
        return [str(tmp_path / "n.jsonl")], {}
    if case == "extension":
        (tmp_path / "c.docx").write_text("the a")
        return [str(tmp_path / "c.docx")], {}
    if case == "parquet":
        (tmp_path / "c.parquet").write_bytes(b"PAR1 not really parquet \x00\xff")
        return [str(tmp_path / "c.parquet")], {}
    if case == "shard":
        (tmp_path / "c.txt").write_text("the a\n")
        return [str(tmp_path / "c.txt")], {"shard": "2/2"}
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "no such file .*nope.txt"),
        ("glob", r"pattern .*\*\.nothing matches no file"),
        ("empty", "holds no documents"),
        ("short", "too short for one block of 30 tokens"),
        ("column", r"no column 'text'; the corpus has \['body'\]"),
        ("nulls", "column 'text' holds only nulls"),
        ("extension", "unsupported file type .*c.docx"),
        ("parquet", "cannot read .*c.parquet"),
        ("shard", "'2/2' is not 'i/n' with 0 <= i < n"),
    ],
)
def test_bad_input_is_one_clear_line(tiny_teacher, tmp_path, case, message):
    sources, extra = write_bad(tmp_path, case)
    with pytest.raises(CodirError, match=message) as err:
        prepare_corpus(sources, str(tiny_teacher), str(tmp_path / "out"), max_seq_length=SEQ, **extra)
    assert "\n" not in str(err.value)
    assert not list((tmp_path / "out").glob("part-*")) if (tmp_path / "out").exists() else True


def test_tokenizer_without_mask_token_is_refused(tiny_teacher, corpus, tmp_path):
    AutoTokenizer.from_pretrained(tiny_teacher).save_pretrained(tmp_path / "tok")
    config = tmp_path / "tok" / "tokenizer_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "mask_token": None}))
    with pytest.raises(CodirError, match="has no MASK token") as err:
        prepare_corpus([str(corpus)], str(tmp_path / "tok"), str(tmp_path / "out"), max_seq_length=SEQ)
    assert "\n" not in str(err.value)


def test_check_tokenizer_refuses_another_vocabulary(prepared, tokenizer, tmp_path):
    from helpers import write_tokenizer

    PreparedCorpus(str(prepared)).check_tokenizer(tokenizer)
    other = write_tokenizer(tmp_path / "other", words=["x", "y", "z"])
    with pytest.raises(CodirError, match="prepared with tokenizer .* differs") as err:
        PreparedCorpus(str(prepared)).check_tokenizer(other)
    assert "\n" not in str(err.value)
