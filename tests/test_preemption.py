"""Stop requests: SIGUSR1/SIGTERM and the stop file are noticed at a step boundary; handlers are given back."""

import os
import signal

import pytest
import torch

from codir_ds.distributed import init_distributed
from codir_ds.preemption import StopRequest, checkpoint_due


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_a_stop_signal_is_noted_not_fatal(sig):
    init_distributed()
    before = signal.getsignal(sig)
    stop = StopRequest(stop_file=None)
    assert not stop.agreed(torch.device("cpu"))
    os.kill(os.getpid(), sig)  # would end the process without the handler
    assert stop.agreed(torch.device("cpu"))
    assert stop.received == sig.name
    stop.close()
    assert signal.getsignal(sig) == before


def test_the_stop_file_of_a_previous_run_is_cleared_and_a_new_one_is_seen(tmp_path):
    init_distributed()
    stop_file = tmp_path / "STOP"
    stop_file.touch()  # left by the stopped run this one resumes
    stop = StopRequest(stop_file)
    assert not stop_file.exists()
    assert not stop.agreed(torch.device("cpu"))
    stop_file.touch()
    assert stop.agreed(torch.device("cpu"))
    assert stop.received == f"stop file {stop_file}"
    stop.close()


def test_checkpoint_is_due_at_the_end_periodically_and_on_stop():
    assert [s for s in range(1, 11) if checkpoint_due(s, last=10, every=4, stopping=False)] == [4, 8, 10]
    assert checkpoint_due(3, last=10, every=0, stopping=True)
    assert not checkpoint_due(3, last=10, every=0, stopping=False)
