"""Run by the deepspeed launcher: a real stage-1 run, then facts about its teacher, queue and student."""

import json

import deepspeed
import fire
import torch
from safetensors.torch import load_file

from codir_ds.pretrain.config import PretrainConfig
from codir_ds.pretrain.data import MicroBatches
from codir_ds.pretrain.run import run_pretraining
from codir_ds.runtime.config import load_config
from codir_ds.runtime.distributed import rank, shutdown


def main(config: str, out: str, stop_after: int | None = None, probe: list | None = None, local_rank: int = 0, **overrides):
    loaded = record_loaded_samples()
    run = run_pretraining(load_config(PretrainConfig, config, overrides), stop_after=stop_after)
    teacher = getattr(run.teacher, "module", run.teacher).teacher  # a ZeRO-3 engine on several ranks, else a plain module
    on_disk = load_file(f"{teacher.name_or_path}/model.safetensors")
    params = dict(teacher.named_parameters())
    stored = lambda name: next(on_disk[n] for n in (name, "bert." + name, name.removeprefix("bert.")) if n in on_disk)
    with deepspeed.zero.GatheredParameters(list(params.values())):
        drift = max((params[name] - stored(name)).abs().max().item() for name in params)
    facts = {
        "losses": run.history,
        "evals": run.evals,
        "teacher_total": sum(getattr(p, "ds_numel", p.numel()) for p in params.values()),
        "teacher_here": sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params.values()),
        "teacher_drift": drift,
        "teacher_trainable": any(p.requires_grad for p in params.values()),
        "teacher_training_mode": teacher.training,
        "queue_sum": run.objective.queue.contents()[0].double().sum().item(),
        "queue_filled": run.objective.queue.filled,
        "samples": list(loaded),  # global sample indices of each micro-batch this rank loaded, in order (data.num_workers=0)
        "first_mask": run.data[0]["labels"].ne(-100).tolist(),  # where this rank's first micro-batch is masked
    }
    if probe:  # the student's logits on fixed input, to compare with the exported model
        ids = torch.tensor(probe, device=run.student.device)  # fire parses the JSON list
        run.student.eval()
        with torch.no_grad():
            facts["probe_logits"] = run.student.module.student(input_ids=ids).logits.float().cpu().tolist()
    with open(f"{out}/rank{rank()}.json", "w") as handle:
        json.dump(facts, handle)
    shutdown()


def record_loaded_samples() -> list[list[int]]:
    """Note the sample indices of every micro-batch loaded in this process (the loader runs in-process when
    data.num_workers=0)."""
    loaded, load = [], MicroBatches.__getitem__

    def recording(self, j):
        batch = load(self, j)
        loaded.append(batch["sample_index"].tolist())
        return batch

    MicroBatches.__getitem__ = recording
    return loaded


if __name__ == "__main__":
    fire.Fire(main)
