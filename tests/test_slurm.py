"""The real slurm/pretrain.sbatch on 2 "nodes" of this machine: stand-in srun/scontrol start one DeepSpeed
launcher with 1 CPU rank per node (real sockets on loopback). Completion, SIGUSR1 preemption, a dead rank; and a
hung rank under the plain launcher."""

import contextlib
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch
from helpers import REPO, child_env, run_deepspeed, save_task_teacher, write_corpus, write_run_config, write_task, write_task_config

from codir_ds.runs.state_files import load_state

pytestmark = pytest.mark.multirank
STANDIN = REPO / "tests/slurm_standin"
JOB = 4242


def sbatch_env(run_dir: Path, tmp_path: Path) -> dict:
    """SLURM's environment for a 2-node job, the stand-ins first on PATH."""
    venv_bin = str(Path(os.sys.executable).parent)
    port = 29500 + (os.getpid() + 7) % 2000
    return child_env(
        PATH=f"{STANDIN}:{venv_bin}:{os.environ['PATH']}",
        SLURM_JOB_ID=str(JOB),
        SLURM_NNODES="2",
        SLURM_JOB_NODELIST="127.0.0.1,127.0.0.2",
        SLURM_SUBMIT_DIR=str(REPO),
        GPUS_PER_NODE="1",
        RUN_DIR=str(run_dir),
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
        PYTHONPATH=str(REPO),
        SCONTROL_LOG=str(tmp_path / "scontrol.log"),
    )


def sbatch(config: Path, env: dict, *overrides, script: str = "pretrain") -> subprocess.Popen:
    command = ["bash", str(REPO / f"slurm/{script}.sbatch"), f"--config={config}", *overrides]
    return subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def node_logs(run_dir: Path) -> list[str]:
    return [(run_dir / f"logs/job{JOB}-node{node}.log").read_text() for node in (0, 1)]


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert process.poll() is None, process.stdout.read()[-3000:]
        assert time.time() < deadline, f"{path} did not appear"
        time.sleep(0.2)


@pytest.fixture
def setup(tmp_path, tiny_teacher):
    config = write_run_config(tmp_path, tiny_teacher, write_corpus(tmp_path / "corpus.txt"))
    run_dir = tmp_path / "run"
    return config, run_dir, sbatch_env(run_dir, tmp_path)


def test_two_nodes_share_one_world_sigusr1_checkpoints_stops_requeues_and_the_next_job_resumes(setup, tmp_path):
    config, run_dir, env = setup
    job = sbatch(config, env, "--train.max_steps=400", "--checkpoint.every=5")
    wait_for(run_dir / "checkpoints/latest", job)
    job.send_signal(signal.SIGUSR1)  # what `#SBATCH --signal=B:USR1@120` does
    output, _ = job.communicate(timeout=120)
    assert job.returncode == 0, output[-3000:]
    stopped = int((run_dir / "checkpoints/latest").read_text().split("_")[1])
    assert 5 <= stopped < 400
    assert (run_dir / f"checkpoints/step_{stopped}/rank_1.json").is_file()
    assert f"stopped at step {stopped} on stop file" in node_logs(run_dir)[0]
    assert not (run_dir / "student").exists()  # not finished: no export yet
    assert (tmp_path / "scontrol.log").read_text() == f"requeue {JOB}\n"

    requeued = sbatch(config, env, f"--train.max_steps={stopped + 3}", "--checkpoint.every=5")
    output, _ = requeued.communicate(timeout=400)
    assert requeued.returncode == 0, output[-3000:]
    first, second = node_logs(run_dir)
    assert f"resumed from step_{stopped}" in first
    assert (run_dir / "checkpoints/latest").read_text() == f"step_{stopped + 3}"
    assert (run_dir / "student/model.safetensors").is_file()
    assert (run_dir / "tensorboard").is_dir()

    assert "node_rank=0" in first
    assert "node_rank=1" in second
    assert "world 2" in first
    assert "nnodes=2" in second
    states = [load_state(run_dir / f"checkpoints/step_{stopped + 3}/rank_{r}") for r in (0, 1)]
    assert states[0]["queue"]["filled"] == 24
    assert torch.equal(states[0]["queue"]["features"], states[1]["queue"]["features"])  # negatives shared across nodes


def test_sigterm_checkpoints_and_stops_without_a_second_requeue_and_finetune_sbatch_resumes_to_the_end(tmp_path):
    teacher = save_task_teacher(tmp_path / "teacher")
    train, dev = write_task(tmp_path / "train.csv", 100), write_task(tmp_path / "dev.csv", 31, seed=1)
    config = write_task_config(tmp_path, teacher, train, dev, checkpoint={"every": 5})
    run_dir = tmp_path / "run"
    env = sbatch_env(run_dir, tmp_path)
    job = sbatch(config, env, "--train.max_steps=100000", script="finetune")
    wait_for(run_dir / "checkpoints/latest", job)
    srun = next(p for p in psutil.Process(job.pid).children() if "srun" in " ".join(p.cmdline()))
    job.send_signal(signal.SIGTERM)  # preemption: SLURM signals the batch shell and every task of the step
    srun.send_signal(signal.SIGTERM)
    output, _ = job.communicate(timeout=120)
    assert job.returncode == 1, output[-3000:]  # DeepSpeed's launcher exits 1 after its ranks' 75
    assert "codir-ds/slurm: TERM: asking all ranks to checkpoint and stop" in output
    stopped = int((run_dir / "checkpoints/latest").read_text().split("_")[1])
    assert f"codir-ds: stopped at step {stopped} on SIGTERM; checkpoint step_{stopped} written" in node_logs(run_dir)[0]
    assert (run_dir / f"checkpoints/step_{stopped}/rank_1.json").is_file()
    assert not list((run_dir / "checkpoints").glob("*.partial"))
    assert not (tmp_path / "scontrol.log").exists()  # SLURM requeues a preempted job itself: the script does not

    requeued = sbatch(config, env, f"--train.max_steps={stopped + 2}", script="finetune")  # the job SLURM requeued
    output, _ = requeued.communicate(timeout=400)
    assert requeued.returncode == 0, output[-3000:]
    assert output.splitlines()[-1] == "codir-ds/slurm: ranks finished with status 0"
    assert f"resumed from step_{stopped}" in node_logs(run_dir)[0]
    assert (run_dir / "checkpoints/latest").read_text() == f"step_{stopped + 2}"
    assert (run_dir / "student/model.safetensors").is_file()
    assert not (tmp_path / "scontrol.log").exists()


def rank_process(rank: int) -> psutil.Process:
    return next(
        p
        for p in psutil.process_iter(["cmdline", "environ"])
        if "launch/pretrain.py" in " ".join(p.info["cmdline"] or []) and (p.info["environ"] or {}).get("RANK") == str(rank)
    )


def test_a_dead_rank_ends_the_whole_job_through_its_launcher(setup):
    config, run_dir, env = setup
    job = sbatch(config, env, "--train.max_steps=100000", "--checkpoint.every=5")
    wait_for(run_dir / "checkpoints/latest", job)
    rank0 = rank_process(0)
    rank0.suspend()  # rank 0 cannot notice the dead peer itself: only node 1's launcher can end the job
    rank_process(1).kill()
    try:
        output, _ = job.communicate(timeout=60)
    finally:
        with contextlib.suppress(psutil.NoSuchProcess):
            rank0.resume()  # on failure, lets the job end by itself
    assert job.returncode == 247, output[-3000:]  # the launcher's sys.exit(-9), through srun and the sbatch script
    assert output.splitlines()[-1] == "codir-ds/slurm: ranks finished with status 247"
    last = node_logs(run_dir)[1].splitlines()[-1]
    assert re.fullmatch(
        r"\[.*\] \[ERROR\] \[launch.py:\d+:sigkill_handler\] \[.*'launch/pretrain.py', '--local_rank=0', .*\] exits with return code = -9", last
    )


def test_a_collective_timeout_ends_a_run_whose_peer_hangs():
    """Rank 1 hangs (alive, silent); rank 0's all-reduce gives up after train.comm_timeout_minutes (0.1: 6 s), and the
    launcher ends the hung rank."""
    result = run_deepspeed(REPO / "tests/workers/hang_worker.py", ["--timeout_minutes=0.1"], timeout=120)
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    assert "rank 1 joined" in result.stdout
    errors = [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("[rank0]: RuntimeError")]
    assert len(errors) == 1, result.stderr[-3000:]
    assert re.fullmatch(
        r"\[rank0\]: RuntimeError: \[\S+/gloo/transport/tcp/unbound_buffer.cc:\d+\] Timed out waiting 6000ms for recv operation to complete",
        errors[0],
    )
    assert re.search(r"\[ERROR\] \[launch.py:\d+:sigkill_handler\] .* exits with return code = 1\n", result.stdout)
