"""The one training loop both stages run: resume -> announce -> micro-steps -> finite? -> step end -> checkpoint/stop.

A stage (`stage.Stage`) brings its micro-step (one forward/backward/step returning detached loss tensors),
the state its checkpoints carry beside DeepSpeed's, its extra scalars and an after-step hook (stage 2
evaluates there). Everything else (resume, student spec, monitor, stop requests) is written once here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from .method.losses import STATISTICS
from .runs.checkpoint import Resume, latest_tag, load_checkpoint, save_checkpoint
from .runs.export import save_student_spec
from .runs.monitor import Monitor, average_terms
from .runs.run_folder import run_started_ns
from .runtime.config import config_to_dict
from .runtime.distributed import all_ranks, print0, rank, world_size
from .runtime.errors import CodirError
from .runtime.preemption import StopRequest, end_of_step


@dataclass
class TrainResult:
    """What the loop leaves: the last step done and the values (rank-averaged) of each logged step."""

    done: int
    history: list[dict[str, float]] = field(default_factory=list)
    stopped: bool = False  # stopped on request before its last step (checkpointed)


def train(cfg, stage, resume: Resume | None, stop_after: int | None = None) -> TrainResult:
    """Run `cfg.train.max_steps` optimizer steps of `stage` on its student engine (or stop after `stop_after`
    steps, or on a stop request), resuming from `resume` (see `find_resume`); checkpoints as `cfg.checkpoint` says."""
    engine, checkpoints, start = stage.student, cfg.checkpoint_dir, 0
    tag = resume.tag if resume else None
    if resume:
        state = load_checkpoint(engine, checkpoints, resume, stage.elastic)
        stage.load_state_dict(state)
        start = state["step"]
    elif rank() == 0:
        save_student_spec(checkpoints, engine.module.student, stage.tokenizer)
    monitor = Monitor(cfg.tensorboard_dir, cfg.train.max_steps, start, cfg.logging.every, engine.monitor)
    _announce(cfg, stage, tag, monitor)
    if start >= cfg.train.max_steps:
        print0(f"codir-ds: nothing to train: {tag} is at step {start}, train.max_steps is {cfg.train.max_steps}; raise it to train on")

    accumulation = cfg.train.gradient_accumulation_steps
    samples = cfg.train.micro_batch_size * accumulation * world_size()
    last = min(cfg.train.max_steps, stop_after or cfg.train.max_steps)
    result, stop = TrainResult(start), StopRequest(cfg.stop_file, run_started_ns(cfg.output.dir))
    measurable = cfg.logging.gradient_ratio and engine.zero_optimization_stage() < 3  # ZeRO-3 partitions the parameters
    for step in range(start + 1, last + 1):
        engine.module.measure_gradients = measurable and monitor.logs(step)
        terms = average_terms([stage.micro_step() for _ in range(accumulation)])  # tensors: no host sync here
        stopping = _check_step(terms, stop.requested(), step, checkpoints)  # the step's one all-reduce and host sync
        logged = monitor.step(step, samples, samples * stage.tokens_per_sample, terms, stage.scalars)
        if logged:
            result.history.append(logged)
        stage.after_step(step, monitor)
        result.done = step
        save = lambda: save_checkpoint(engine, checkpoints, step, stage.state_dict(), cfg.checkpoint.keep)
        if end_of_step(stop, step, last, cfg.checkpoint.every, stopping, save):
            result.stopped = step < cfg.train.max_steps
            break
    stop.close()
    monitor.close()
    return result


def _announce(cfg, stage, resumed_from: str | None, monitor: Monitor) -> None:
    resolved = json.dumps(config_to_dict(cfg), separators=(",", ":"))
    monitor.text("config", resolved)
    print0(f"codir-ds: config {resolved}")
    print0(f"codir-ds: {stage.summary()}, world {world_size()}, " + (f"resumed from {resumed_from}" if resumed_from else "fresh start"))


def _check_step(terms: dict[str, torch.Tensor], stop_requested: bool, step: int, checkpoints) -> bool:
    """Whether any rank asks to stop; raises (on every rank) at the first step whose loss is not finite, before
    it is checkpointed. One all-reduce answers both."""
    losses = [name for name in terms if name not in STATISTICS]
    flags = torch.stack([torch.isfinite(terms[name]) for name in losses] + [torch.tensor(not stop_requested, device=terms["total"].device)])
    agreed = all_ranks(flags)  # True where true on every rank
    finite, stopping = agreed[:-1], not bool(agreed[-1])
    if not bool(finite.all()):
        bad = losses[int((~finite).nonzero()[0])]
        latest = latest_tag(checkpoints)
        raise CodirError(
            f"step {step}: loss/{bad} is {float(terms[bad]):.4g} on at least one rank, the run stops; "
            + (
                f"'latest' still names {latest}, the last good checkpoint: resume from it after lowering train.lr or fixing the data"
                if latest
                else "no checkpoint was written"
            )
        )
    return stopping
