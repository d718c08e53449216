"""`train.compile`: a stage-1 run with torch.compile'd student and teacher trains like the eager one (CPU, inductor)."""

from __future__ import annotations

import pytest
from helpers import save_tiny_model, write_corpus, write_run_config

from codir_ds.pretrain.config import PretrainConfig
from codir_ds.pretrain.run import run_pretraining
from codir_ds.runtime.config import load_config


@pytest.mark.slow
def test_compiled_run_matches_the_eager_run(tmp_path):
    teacher = save_tiny_model(tmp_path / "teacher", layers=4, mlm_head=True, dropout=0.0)  # no dropout: compiled kernels draw their own
    corpus = write_corpus(tmp_path / "corpus.txt", documents=30)
    runs = {}
    for compiled in (False, True):
        folder = tmp_path / ("compiled" if compiled else "eager")
        folder.mkdir()
        config = write_run_config(folder, teacher, corpus, train={"max_steps": 2, "compile": compiled}, data={"num_workers": 0})
        runs[compiled] = run_pretraining(load_config(PretrainConfig, str(config), {"output.export": False}))
    eager, compiled = runs[False], runs[True]
    assert compiled.teacher._compiled_call_impl is not None  # compiled in place
    assert eager.teacher._compiled_call_impl is None
    for step_eager, step_compiled in zip(eager.history, compiled.history, strict=True):
        for name in ("total", "mlm", "kd", "codir"):
            assert step_compiled[name] == pytest.approx(step_eager[name], rel=1e-4, abs=1e-5), name
