"""Stage-1 held-out evaluation: the student against the teacher on blocks training never sees, with fixed masks.

Rank r takes held-out samples r, r + w, r + 2w, ... (padded to equal counts, so a ZeRO-3 engine runs the same
forward passes on every rank) and the sums are all-reduced, so the figures do not depend on the world size:
- masked-LM loss, the mean over predicted positions, and its perplexity;
- KD (with a teacher MLM head): T^2 KL(teacher || student) at the predicted positions, as the training term;
- CoDIR: InfoNCE loss and top-1 accuracy of each student anchor against the projected teacher features of every
  held-out block, its own block the positive;
- per student layer, the mean cosine similarity of its pooled states with its mapped teacher layer's (where the
  widths match).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..method.losses import contrastive_logits, logit_kd
from ..method.representations import layer_features
from ..runtime.distributed import all_gather_rows, print0, sum_over_ranks
from .config import DataConfig
from .data import PreparedCorpus, check_block_length, held_out_blocks, mask_blocks
from .modules import StudentWithHeads, masked_lm_logits

EVAL_MASK_SEED = 0x4556414C  # the masks of held-out sample i: the same at every evaluation and in every run
MAX_HELD_OUT_SHARE = 10  # a corpus holds out at most 1/10 of its blocks


def evaluation_split(cfg: DataConfig, corpus: PreparedCorpus, tokenizer) -> tuple[PreparedCorpus, np.ndarray, int]:
    """The corpus evaluation reads, the ids of its held-out blocks, and how many blocks the training corpus
    holds out: `data.eval_blocks` of `data.eval_prepared`, or else of the training corpus (at most a tenth)."""
    if cfg.eval_prepared:
        held_out = PreparedCorpus(cfg.eval_prepared)
        held_out.check_tokenizer(tokenizer)
        check_block_length(held_out, cfg.max_seq_length)
        return held_out, held_out_blocks(len(held_out), min(cfg.eval_blocks, len(held_out))), 0
    count = min(cfg.eval_blocks, len(corpus) // MAX_HELD_OUT_SHARE)
    if count < cfg.eval_blocks:
        print0(
            f"codir-ds: notice: data.eval_blocks {cfg.eval_blocks} is more than a tenth of the corpus's {len(corpus):,} "
            f"blocks; {count} are held out for evaluation" + ("" if count else " (none: no evaluation)")
        )
    return corpus, held_out_blocks(len(corpus), count), count


class HeldOutBatches:
    """This rank's share of the held-out blocks as masked batches (CPU tensors), built once."""

    def __init__(self, corpus: PreparedCorpus, block_ids: np.ndarray, batch_size: int, world_size: int, rank: int, mlm_probability: float):
        self.count = len(block_ids)
        indices = np.arange(-(-self.count // world_size)) * world_size + rank  # held-out sample indices
        valid, indices = indices < self.count, np.minimum(indices, self.count - 1)  # padding repeats the last sample
        self.batches = []
        for start in range(0, len(indices), batch_size):
            part = indices[start : start + batch_size]
            blocks = corpus.blocks(block_ids[part])
            input_ids, labels, positions = mask_blocks(blocks, part, EVAL_MASK_SEED, corpus.special_ids, corpus.vocab_size, mlm_probability)
            self.batches.append(
                {
                    "input_ids": input_ids,
                    "labels": labels,
                    "masked_positions": positions,
                    "index": torch.from_numpy(part),
                    "valid": torch.from_numpy(valid[start : start + batch_size]),
                }
            )


def layer_cosine(student_features: torch.Tensor, teacher_features: torch.Tensor, layers: int) -> torch.Tensor:
    """Cosine similarity [batch, layers] of each layer's pooled student and teacher states, from features
    [batch, layers * dim] of equal width."""
    split = lambda features: features.float().unflatten(1, (layers, -1))
    return F.cosine_similarity(split(student_features), split(teacher_features), dim=-1)


@torch.no_grad()
def evaluate(student: StudentWithHeads, teacher, held_out: HeldOutBatches, device: torch.device) -> dict[str, float]:
    """The held-out figures (see the module's docstring) of `student` (in eval mode) against the frozen `teacher`.
    Every rank calls it; the result is the same on every rank."""
    weights, heads, layers = student.weights, student.codir.heads, len(student.layers)
    with_kd, same_width = False, False
    sums = torch.zeros(6 + layers, dtype=torch.float64, device=device)  # mlm, predicted, kd, rows, codir, top-1, cosines
    anchors, candidates, indices, valid_rows = [], [], [], []
    for batch in held_out.batches:
        input_ids, labels, positions, index, valid = (batch[k].to(device) for k in ("input_ids", "labels", "masked_positions", "index", "valid"))
        teacher_features, teacher_logits = teacher(input_ids, None, positions)
        out = student.student.base_model(input_ids=input_ids, output_hidden_states=True)
        logits = masked_lm_logits(student.student, out.last_hidden_state, positions)
        targets = labels.gather(1, positions).flatten()
        rows = targets.ne(-100) & valid.repeat_interleave(positions.shape[1])
        sums[0] += (F.cross_entropy(logits.float(), targets, reduction="none") * rows).sum()
        sums[1] += rows.sum()
        with_kd = teacher_logits is not None and weights.kd > 0
        if with_kd:
            sums[2] += logit_kd(logits, teacher_logits, weights.kd_temperature, rows) * rows.sum()
        sums[3] += valid.sum()
        features = layer_features(out.hidden_states, student.layers, None, student.pooling)
        same_width = features.shape[1] == teacher_features.shape[1]
        if same_width:
            sums[6:] += (layer_cosine(features, teacher_features, layers) * valid[:, None]).sum(0)
        anchors.append(heads.project_student(features))
        candidates.append(heads.project_teacher(teacher_features))
        indices.append(index)
        valid_rows.append(valid)
    rows = [torch.cat(parts) for parts in (anchors, candidates, indices, valid_rows)]
    sums[4:6] = _contrastive_sums(*rows, held_out.count, student.codir.tau)
    totals = sum_over_ranks(sums)
    mlm, count = totals[0] / totals[1].clamp_min(1), totals[3]
    metrics = {"mlm_loss": float(mlm), "perplexity": float(torch.exp(mlm))}
    if with_kd:
        metrics["kd"] = float(totals[2] / totals[1].clamp_min(1))
    metrics.update(codir_loss=float(totals[4] / count), codir_top1=float(totals[5] / count))
    if same_width:
        metrics.update({f"cosine_layer_{layer}": float(value / count) for layer, value in zip(student.layers, totals[6:])})
    return metrics


def _contrastive_sums(anchors, candidates, index, valid, count: int, tau: float) -> torch.Tensor:
    """[summed InfoNCE loss, top-1 hits] of this rank's valid anchors against the projected teacher features of
    every held-out block (gathered from all ranks, row i = held-out sample i)."""
    gathered, gathered_index, gathered_valid = (all_gather_rows(t)[0] for t in (candidates, index, valid.long()))
    keep = gathered_valid.bool()
    table = candidates.new_zeros(count, candidates.shape[1])
    table[gathered_index[keep]] = gathered[keep]
    anchors, index = anchors[valid], index[valid]
    logits = contrastive_logits(anchors, table, index, tau)
    return torch.stack([F.cross_entropy(logits, index, reduction="sum"), (logits.argmax(1) == index).sum()]).double()
