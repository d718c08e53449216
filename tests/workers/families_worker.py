"""Run by the deepspeed launcher: stage-1 runs of the given configs in turn with the teacher partitioned by ZeRO-3
(and `replicated_too`'s replicated as well); per run the logged losses and how much of the teacher rank 0 held."""

import json

import fire

from codir_ds.models.engines import parameter_counts
from codir_ds.pretrain.config import PretrainConfig
from codir_ds.pretrain.run import run_pretraining
from codir_ds.runtime.config import load_config
from codir_ds.runtime.distributed import rank, shutdown


def main(configs: str, out: str, replicated_too: str = "", local_rank: int = 0) -> None:
    facts = {}
    for config in configs.split(","):
        for zero3 in (True, False) if config == replicated_too else (True,):
            run = run_pretraining(load_config(PretrainConfig, config, {"teacher.zero3": zero3, "output.dir": f"{config}.zero3-{zero3}"}))
            total, here = parameter_counts(run.teacher)
            facts[f"{config} zero3={zero3}"] = {"losses": run.history, "teacher_total": total, "teacher_here": here}
    if rank() == 0:
        with open(out, "w") as handle:
            json.dump(facts, handle)
    shutdown()


if __name__ == "__main__":
    fire.Fire(main)
