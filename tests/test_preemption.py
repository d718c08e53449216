"""Stop requests: SIGUSR1/SIGTERM/SIGINT and the stop file are noticed at a step boundary; a second Ctrl-C aborts;
handlers are given back; only a stop file is ever removed."""

import os
import signal

import pytest

from codir_ds.runtime.distributed import init_distributed
from codir_ds.runtime.errors import CodirError
from codir_ds.runtime.preemption import StopRequest, checkpoint_due, clear_stop_file


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_is_noted_not_fatal(sig):
    init_distributed()
    before = signal.getsignal(sig)
    stop = StopRequest(stop_file=None)
    assert not stop.requested()
    os.kill(os.getpid(), sig)  # would end the process without the handler
    assert stop.requested()
    assert stop.received == sig.name
    stop.close()
    assert signal.getsignal(sig) == before


def test_a_second_ctrl_c_aborts_at_once():
    init_distributed()
    stop = StopRequest(stop_file=None)
    os.kill(os.getpid(), signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
    stop.close()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_the_stop_file_of_a_previous_run_is_cleared_and_a_new_one_is_seen(tmp_path):
    init_distributed()
    stop_file = tmp_path / "STOP"
    stop_file.write_text("stop\n")  # left by the stopped run this one resumes
    clear_stop_file(stop_file)
    assert not stop_file.exists()
    stop = StopRequest(stop_file)
    assert not stop.requested()
    stop_file.touch()
    assert stop.requested()
    assert stop.received == f"stop file {stop_file}"
    stop.close()


@pytest.mark.parametrize("content", [b"model weights " * 10, b"\x00\x01"])
def test_a_file_that_is_not_a_stop_file_is_never_removed(tmp_path, content):
    precious = tmp_path / "notes.bin"
    precious.write_bytes(content)
    with pytest.raises(CodirError, match="is not a stop file"):
        clear_stop_file(precious)
    assert precious.read_bytes() == content


def test_checkpoint_is_due_at_the_end_periodically_and_on_stop():
    assert [s for s in range(1, 11) if checkpoint_due(s, last=10, every=4, stopping=False)] == [4, 8, 10]
    assert checkpoint_due(3, last=10, every=0, stopping=True)
    assert not checkpoint_due(3, last=10, every=0, stopping=False)
