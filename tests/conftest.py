"""Shared fixtures: tiny random BERT models saved as Hugging Face folders, and the real launcher."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, BertModel, BertTokenizer

REPO = Path(__file__).resolve().parents[1]
WORDS = "the a of and to in is was for on that with as by at from his her it an are were be this which".split()


def tiny_bert_config(layers: int = 4, hidden: int = 32, vocab: int | None = None) -> BertConfig:
    return BertConfig(
        vocab_size=vocab or len(WORDS) + 5,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=2 * hidden,
        max_position_embeddings=128,
    )


def write_tokenizer(folder: Path, words=WORDS) -> BertTokenizer:
    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    tokenizer = BertTokenizer(vocab=str(vocab))
    tokenizer.save_pretrained(folder)
    return tokenizer


def save_tiny_model(folder: Path, layers: int = 4, hidden: int = 32, mlm_head: bool = True, seed: int = 0) -> Path:
    """A random BERT (with or without MLM head) plus a word-level tokenizer, saved with save_pretrained."""
    torch.manual_seed(seed)
    config = tiny_bert_config(layers, hidden)
    model = BertForMaskedLM(config) if mlm_head else BertModel(config)
    model.save_pretrained(folder)
    write_tokenizer(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> Path:
    """A 4-layer, hidden-32 BERT with an MLM head."""
    return save_tiny_model(tmp_path_factory.mktemp("teacher"), layers=4, mlm_head=True)


@pytest.fixture(scope="session")
def headless_teacher(tmp_path_factory) -> Path:
    """A 4-layer BERT saved as BertModel (no MLM head), like a sentence-embedding model."""
    return save_tiny_model(tmp_path_factory.mktemp("headless"), layers=4, mlm_head=False, seed=1)


DISTRIBUTED_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def child_env(**extra) -> dict:
    """The environment for a child process: CPU DeepSpeed, and none of the rendezvous variables that an
    in-process run (a world of one) left in this test process."""
    env = {k: v for k, v in os.environ.items() if k not in DISTRIBUTED_VARIABLES}
    return {**env, "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false", **extra}


def run_deepspeed(script: Path, args: list[str], ranks: int = 2, timeout: int = 600, env: dict | None = None):
    """Start `script` on `ranks` CPU ranks with the real `deepspeed` launcher; returns the CompletedProcess."""
    launcher = Path(sys.executable).with_name("deepspeed")
    full_env = child_env(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **(env or {}))
    port = str(29500 + (os.getpid() % 2000))
    command = [str(launcher), "--num_gpus", str(ranks), "--master_port", port, str(script), *args]
    return subprocess.run(command, env=full_env, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def launch_worker(worker: Path, config: Path, out: Path, *extra: str) -> tuple[dict, dict]:
    """Run a test worker on 2 ranks; return the facts each rank wrote to `out/rank{r}.json`."""
    result = run_deepspeed(worker, [f"--config={config}", f"--out={out}", *extra], ranks=2)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return read_json(out / "rank0.json"), read_json(out / "rank1.json")
