"""Stop requests: SIGUSR1/SIGTERM/SIGINT and the stop file are noticed at a step boundary; a second Ctrl-C aborts;
handlers are given back; only a stop file touched after the run started counts, and none is ever removed."""

import os
import signal

import pytest

from codir_ds.runs.run_folder import LOCK_FILE, run_started_ns
from codir_ds.runtime.distributed import init_distributed
from codir_ds.runtime.preemption import StopRequest, checkpoint_due


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_is_noted_not_fatal(sig):
    init_distributed()
    before = signal.getsignal(sig)
    stop = StopRequest(stop_file=None, since_ns=0)
    assert not stop.requested()
    os.kill(os.getpid(), sig)  # would end the process without the handler
    assert stop.requested()
    assert stop.received == sig.name
    stop.close()
    assert signal.getsignal(sig) == before


def test_a_second_ctrl_c_aborts_at_once():
    init_distributed()
    stop = StopRequest(stop_file=None, since_ns=0)
    os.kill(os.getpid(), signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
    stop.close()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.parametrize("content", [None, b"stop\n", b"", b"model weights " * 10])
def test_only_a_stop_file_touched_after_the_start_counts_and_none_is_removed(tmp_path, content):
    init_distributed()
    (tmp_path / LOCK_FILE).touch()  # the run's start, as its folder's lock records it
    started = run_started_ns(tmp_path)
    stop_file = tmp_path / "STOP"
    if content is not None:  # left by the run this one resumes, or a user's file of that name
        stop_file.write_bytes(content)
        os.utime(stop_file, ns=(started - 10**9, started - 10**9))
    stop = StopRequest(stop_file, started)
    assert not stop.requested()
    stop_file.touch()
    os.utime(stop_file, ns=(started + 10**9, started + 10**9))  # file times tick coarsely: a touch a second later
    assert stop.requested()
    assert stop.received == f"stop file {stop_file}"
    assert stop_file.read_bytes() == (content or b"")
    stop.close()


def test_checkpoint_is_due_at_the_end_periodically_and_on_stop():
    assert [s for s in range(1, 11) if checkpoint_due(s, last=10, every=4, stopping=False)] == [4, 8, 10]
    assert checkpoint_due(3, last=10, every=0, stopping=True)
    assert not checkpoint_due(3, last=10, every=0, stopping=False)
