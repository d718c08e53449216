"""Run by the deepspeed launcher: a real stage-2 run, then facts about its memory bank, queue and evaluations."""

import json

import fire
import torch
from transformers import AutoModelForSequenceClassification

from codir_ds.finetune.config import FinetuneConfig
from codir_ds.finetune.data import collate
from codir_ds.finetune.run import run_finetuning
from codir_ds.runtime.config import load_config
from codir_ds.runtime.distributed import rank, shutdown


def main(config: str, out: str, local_rank: int = 0, **overrides):
    cfg = load_config(FinetuneConfig, config, overrides)
    run = run_finetuning(cfg)
    facts = {"losses": run.history, "evals": run.evals, "best": run.best, "steps": run.cfg.train.max_steps}
    if run.bank is not None:  # the bank against a fresh, plain forward of the teacher over the whole train set
        teacher = AutoModelForSequenceClassification.from_pretrained(cfg.teacher.path).eval()
        batch = collate(run.data.train, list(range(len(run.data.train))), run.batches.tokenizer)
        with torch.no_grad():
            fresh = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True)
        mask = batch["attention_mask"].unsqueeze(-1).float()
        layers = [(fresh.hidden_states[layer] * mask).sum(1) / mask.sum(1) for layer in (2, 4)]
        facts["bank_feature_error"] = (run.bank.features.cpu() - torch.cat(layers, dim=1)).abs().max().item()
        facts["bank_logit_error"] = (run.bank.logits.cpu() - fresh.logits).abs().max().item()
        facts["bank_sum"] = run.bank.features.double().sum().item()
    if run.objective is not None and run.objective.queue is not None:
        facts["queue_sum"] = run.objective.queue.contents()[0].double().sum().item()
        facts["queue_labels"] = run.objective.queue.contents()[1].tolist()
    with open(f"{out}/rank{rank()}.json", "w") as handle:
        json.dump(facts, handle)
    shutdown()


if __name__ == "__main__":
    fire.Fire(main)
