"""Run by the deepspeed launcher: a real stage-1 run, then facts about its teacher, queue and student."""
import json

import deepspeed
import fire
import torch
from safetensors.torch import load_file

from codir_ds.config import load_config
from codir_ds.distributed import rank, shutdown
from codir_ds.pretrain.config import PretrainConfig
from codir_ds.pretrain.run import run_pretraining


def main(config: str, out: str, stop_after: int | None = None, probe: list | None = None, local_rank: int = 0, **overrides):
    run = run_pretraining(load_config(PretrainConfig, config, overrides), stop_after=stop_after)
    teacher = run.teacher.module.teacher
    on_disk = load_file(f"{teacher.name_or_path}/model.safetensors")
    params = dict(teacher.named_parameters())
    stored = lambda name: next(on_disk[n] for n in (name, "bert." + name, name.removeprefix("bert.")) if n in on_disk)
    with deepspeed.zero.GatheredParameters(list(params.values())):
        drift = max((params[name] - stored(name)).abs().max().item() for name in params)
    facts = {
        "losses": run.losses,
        "teacher_total": sum(getattr(p, "ds_numel", p.numel()) for p in params.values()),
        "teacher_here": sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params.values()),
        "teacher_drift": drift,
        "teacher_trainable": any(p.requires_grad for p in params.values()),
        "teacher_training_mode": teacher.training,
        "queue_sum": run.queue.contents()[0].double().sum().item(),
        "queue_filled": run.queue.filled,
    }
    if probe:  # the student's logits on fixed input, to compare with the exported model
        ids = torch.tensor(probe, device=run.student.device)  # fire parses the JSON list
        run.student.eval()
        with torch.no_grad():
            facts["probe_logits"] = run.student.module.student(input_ids=ids).logits.float().cpu().tolist()
    with open(f"{out}/rank{rank()}.json", "w") as handle:
        json.dump(facts, handle)
    shutdown()


if __name__ == "__main__":
    fire.Fire(main)
