"""Session fixtures: tiny random BERT models saved as Hugging Face folders, built once per test run."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import save_tiny_model


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> Path:
    """A 4-layer, hidden-32 BERT with an MLM head."""
    return save_tiny_model(tmp_path_factory.mktemp("teacher"), layers=4, mlm_head=True)


@pytest.fixture(scope="session")
def headless_teacher(tmp_path_factory) -> Path:
    """A 4-layer BERT saved as BertModel (no MLM head), like a sentence-embedding model."""
    return save_tiny_model(tmp_path_factory.mktemp("headless"), layers=4, mlm_head=False, seed=1)
