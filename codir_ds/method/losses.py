"""Every loss codir-ds trains with, as pure tensor functions: CoDIR's student-anchored InfoNCE and its
statistics, logit KD, the task losses of stage 2, and the intermediate-layer baselines (PKD pooled MSE,
token MSE, cosine). CoDIR's trained heads and negatives live in `objective.py`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F


def _at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """`x` in float32, or as it is if wider: contrastive similarities are never formed in bf16/fp16."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def normalized_fp32(x: torch.Tensor) -> torch.Tensor:
    """Rows of `x` scaled to unit length, in float32 at least (the projections contrastive logits compare)."""
    return F.normalize(_at_least_fp32(x), dim=-1)


def contrastive_logits(
    anchors: torch.Tensor,
    candidates: torch.Tensor,
    positive_index: torch.Tensor,
    temperature: float,
    anchor_labels: torch.Tensor | None = None,
    candidate_labels: torch.Tensor | None = None,
    anchor_ids: torch.Tensor | None = None,
    candidate_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Similarities / temperature of each anchor to every candidate [batch, candidates], in float32 at least.

    Candidate `positive_index[i]` is anchor i's positive; all others are negatives. With labels, negatives
    sharing the anchor's label are masked out (-inf), as CoDIR's label-aware finetuning asks; with example ids,
    so are other copies of the anchor's own example (queued in an earlier epoch).
    """
    logits = _at_least_fp32(anchors) @ _at_least_fp32(candidates).T / temperature
    masked = torch.zeros_like(logits, dtype=torch.bool)
    if anchor_labels is not None and candidate_labels is not None:
        masked |= anchor_labels.unsqueeze(1) == candidate_labels.unsqueeze(0)
    if anchor_ids is not None and candidate_ids is not None:
        masked |= anchor_ids.unsqueeze(1) == candidate_ids.unsqueeze(0)
    masked[torch.arange(len(anchors), device=anchors.device), positive_index] = False
    return logits.masked_fill(masked, float("-inf"))


def info_nce(logits: torch.Tensor, positive_index: torch.Tensor) -> torch.Tensor:
    """Mean of -log(exp(pos) / sum(exp(all unmasked candidates))) over the batch."""
    return F.cross_entropy(_at_least_fp32(logits), positive_index)


CONTRASTIVE_STATS = ("top1_accuracy", "positive_similarity", "negative_similarity")  # what `contrastive_stats` returns
STATISTICS = (*CONTRASTIVE_STATS, "gradient_ratio")  # logged step values that are not loss terms


@torch.no_grad()
def contrastive_stats(logits: torch.Tensor, positive_index: torch.Tensor, temperature: float) -> dict[str, torch.Tensor]:
    """Top-1 accuracy of picking the positive, and mean positive / negative cosine similarity (0-d tensors)."""
    rows = torch.arange(len(logits), device=logits.device)
    positive = logits[rows, positive_index]
    negative_mask = torch.isfinite(logits)
    negative_mask[rows, positive_index] = False
    negative_sum = torch.where(negative_mask, logits, torch.zeros_like(logits)).sum()  # no boolean indexing: no host sync
    return {
        "top1_accuracy": (logits.argmax(dim=1) == positive_index).float().mean(),
        "positive_similarity": (positive * temperature).float().mean(),
        "negative_similarity": (negative_sum * temperature / negative_mask.sum()).float(),  # NaN when there are none
    }


def logit_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float, rows: torch.Tensor | None = None) -> torch.Tensor:
    """T^2 * KL(softmax(teacher/T) || softmax(student/T)), averaged over rows (Hinton et al.); with `rows` (bool
    [rows]), over those rows only. No rows gives 0, not NaN."""
    student_log_probs = F.log_softmax(student_logits.float() / temperature, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = F.kl_div(student_log_probs, teacher_log_probs, log_target=True, reduction="none").sum(-1)
    if rows is None:
        return kl.sum() / max(len(kl), 1) * temperature**2
    return (kl * rows).sum() / rows.sum().clamp_min(1) * temperature**2


def sampled_contrastive_logits(anchors: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor, temperature: float) -> torch.Tensor:
    """[batch, 1 + K] similarities / temperature of each anchor to its own positive (column 0) and its own
    K negatives (`negatives` is [batch, K, dim]): the memory bank's per-anchor, label-aware form; float32 at least."""
    anchors, positives, negatives = _at_least_fp32(anchors), _at_least_fp32(positives), _at_least_fp32(negatives)
    positive = (anchors * positives).sum(dim=-1, keepdim=True)
    negative = torch.einsum("bd,bkd->bk", anchors, negatives)
    return torch.cat([positive, negative], dim=1) / temperature


def binary_nce(scores: torch.Tensor, noise: float, eps: float = 1e-7) -> torch.Tensor:
    """CRD's NCE loss (Tian et al., 2020): `scores` [batch, 1 + K] are exp(similarity / tau) / Z with the positive
    in column 0; each score is told apart from K noise draws of probability `noise` (1 / N each):
    -(log P(data | positive) + sum over negatives log P(noise | negative)), summed, divided by the batch."""
    share = (scores.shape[1] - 1) * noise
    positive = torch.log(scores[:, 0] / (scores[:, 0] + share + eps))
    negative = torch.log(share / (scores[:, 1:] + share + eps))
    return -(positive.sum() + negative.sum()) / len(scores)


def gradient_norm_ratio(term: torch.Tensor, rest: torch.Tensor, parameters: list[torch.Tensor]) -> torch.Tensor:
    """||d term / d parameters|| / ||d rest / d parameters||, 2-norms over all `parameters`: how hard one loss term
    pulls against the others. The graph is kept for the backward that follows. Call it inside the module's forward:
    DeepSpeed hooks the engine's outputs, and a backward through them is the engine's backward."""
    norms = []
    for loss in (term, rest):
        grads = torch.autograd.grad(loss, parameters, retain_graph=True, allow_unused=True)
        norms.append(torch.sqrt(sum((g.float() ** 2).sum() for g in grads if g is not None)))
    return norms[0] / norms[1]


def trainable(module: torch.nn.Module) -> list[torch.Tensor]:
    """The parameters of `module` that train."""
    return [p for p in module.parameters() if p.requires_grad]


def task_loss(logits: torch.Tensor, labels: torch.Tensor, regression: bool) -> torch.Tensor:
    """Cross-entropy on class logits, or MSE of the single output for regression."""
    if regression:
        return F.mse_loss(logits.float().squeeze(-1), labels.float())
    return F.cross_entropy(logits.float(), labels)


def task_kd(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float, regression: bool) -> torch.Tensor:
    """Logit KD: T^2 * KL for classes (`logit_kd`), MSE to the teacher's output for regression."""
    if regression:
        return F.mse_loss(student_logits.float(), teacher_logits.float())
    return logit_kd(student_logits, teacher_logits, temperature)


def pooled_mse(student_features: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
    """PKD's loss: squared distance of L2-normalised pooled states, summed over dimensions, averaged over
    layers and batch. Features are [batch, layers, dim] (same width)."""
    student = F.normalize(student_features.float(), dim=-1)
    teacher = F.normalize(teacher_features.float(), dim=-1)
    return (student - teacher).pow(2).sum(-1).mean()


def token_mse(student_states: torch.Tensor, teacher_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error of hidden states [batch, layers, seq, dim] over non-padding tokens (TinyBERT style)."""
    mask = attention_mask[:, None, :, None].float()
    squared = (student_states.float() - teacher_states.float()).pow(2) * mask
    return squared.sum() / (mask.sum() * student_states.shape[1] * student_states.shape[-1])


def token_cosine(student_states: torch.Tensor, teacher_states: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of 1 - cos(student, teacher) over non-padding tokens of every mapped layer (DistilBERT style)."""
    cosine = F.cosine_similarity(student_states.float(), teacher_states.float(), dim=-1)  # [batch, layers, seq]
    mask = attention_mask[:, None, :].float().expand_as(cosine)
    return ((1 - cosine) * mask).sum() / mask.sum()


@dataclass(frozen=True)
class IntermediateLoss:
    """An intermediate-layer loss: what it needs from the teacher and, unless contrastive, its comparison."""

    teacher_input: Literal["pooled", "tokens"]  # pooled features of the mapped layers (a memory bank can hold them) or token states
    compare: Callable[..., torch.Tensor] | None = None  # (student, teacher[, attention_mask]) -> loss; None: CoDIR's InfoNCE


INTERMEDIATE_LOSSES = {
    "codir": IntermediateLoss("pooled"),  # contrastive: InfoNCE against negatives
    "mse": IntermediateLoss("pooled", pooled_mse),  # PKD
    "mse_tokens": IntermediateLoss("tokens", token_mse),  # TinyBERT-style hidden-state MSE
    "cosine": IntermediateLoss("tokens", token_cosine),  # DistilBERT's cosine
}
