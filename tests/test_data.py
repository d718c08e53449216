"""The stage-1 stream: packing, counted bad input, per-rank shards, resumable position."""
import json

import pytest
import torch
from stage1 import write_corpus
from transformers import AutoTokenizer

from codir_ds.errors import CodirError
from codir_ds.pretrain.config import DataConfig
from codir_ds.pretrain.data import PackedMLMStream, load_corpus


def stream(tiny_teacher, files, rank=0, world=1, batch=4, **data):
    cfg = DataConfig(files=[str(f) for f in files], max_seq_length=16, **data)
    return PackedMLMStream(cfg, AutoTokenizer.from_pretrained(tiny_teacher), batch, rank, world, seed=0)


def test_packed_sequences_are_full_and_masked(tiny_teacher, tmp_path):
    s = stream(tiny_teacher, [write_corpus(tmp_path / "c.txt", documents=50)])
    tokenizer = s.tokenizer
    batch = s.next_batch()
    assert batch["input_ids"].shape == (4, 16) and batch["attention_mask"].eq(1).all()
    assert batch["input_ids"][:, 0].eq(tokenizer.cls_token_id).all() and batch["input_ids"][:, -1].eq(tokenizer.sep_token_id).all()
    masked = batch["labels"].ne(-100)
    assert 0 < masked.sum() < masked.numel()
    assert not batch["labels"][:, 0].ne(-100).any()  # special tokens are never masked


def test_empty_undecodable_and_long_documents_are_counted_not_fatal(tiny_teacher, tmp_path):
    corpus = tmp_path / "messy.txt"
    corpus.write_bytes(b"the a of\n\n   \nand \xff\xfe to in\n" + b" ".join([b"is was"] * 30) + b"\n")
    s = stream(tiny_teacher, [corpus], batch=1)
    token_lists = list(s._documents())  # exactly one epoch
    assert len(token_lists) == 3 and max(map(len, token_lists)) == 60
    counts = s.state.counts
    assert counts["documents"] == 5 and counts["empty"] == 2 and counts["undecodable"] == 1 and counts["long"] == 1


def test_ranks_read_disjoint_shards(tiny_teacher, tmp_path):
    corpus = tmp_path / "lines.txt"
    corpus.write_text("\n".join(f"doc{i}" for i in range(40)) + "\n")
    cfg = DataConfig(files=[str(corpus)])
    from datasets.distributed import split_dataset_by_node

    seen = [[ex["text"] for ex in split_dataset_by_node(load_corpus(cfg, 0, seed=0), r, 2)] for r in range(2)]
    assert not set(seen[0]) & set(seen[1]) and len(seen[0]) + len(seen[1]) == 40
    epoch1 = [ex["text"] for ex in load_corpus(cfg, 1, seed=0)]
    assert sorted(epoch1) == sorted(seen[0] + seen[1]) and epoch1 != seen[0] + seen[1]  # reshuffled per epoch


@pytest.mark.parametrize("streaming", [False, True])
def test_resumed_stream_continues_where_it_stopped(tiny_teacher, tmp_path, streaming):
    corpus = write_corpus(tmp_path / "c.txt", documents=8)  # ~20 sequences: 12 batches cross epochs
    original = stream(tiny_teacher, [corpus], streaming=streaming)
    for _ in range(5):
        original.next_batch()
    saved = json.loads(json.dumps(original.state_dict()))  # survives serialisation
    torch.manual_seed(7)
    expected = [original.next_batch()["input_ids"] for _ in range(7)]
    assert original.state.epoch >= 1

    resumed = stream(tiny_teacher, [corpus], streaming=streaming)
    resumed.load_state_dict(saved)
    torch.manual_seed(7)
    for want in expected:
        assert torch.equal(resumed.next_batch()["input_ids"], want)


@pytest.mark.parametrize(
    "content, name, expected",
    [
        (None, "missing.txt", "data.files: no such file"),
        (b"PAR1 this is not parquet", "bad.parquet", "data: cannot read"),
        (b"x", "corpus.docx", "data.files: unsupported file type"),
        (b'{"body": "hello"}\n', "c.jsonl", "data.text_column: no column 'text'"),
    ],
)
def test_bad_corpus_is_a_one_line_error(tiny_teacher, tmp_path, content, name, expected):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(CodirError, match=expected) as info:
        load_corpus(DataConfig(files=[str(path)]), 0, seed=0)
    assert "\n" not in str(info.value)
