"""Stage-2 modules DeepSpeed wraps: the finetuned teacher's outputs, and the classifier student with its CoDIR heads."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel

from ..losses import (
    INTERMEDIATE_LOSSES,
    ProjectionHeads,
    contrastive_logits,
    info_nce,
    sampled_contrastive_logits,
    task_kd,
    task_loss,
)
from ..representations import layer_features


class TeacherTaskOutputs(nn.Module):
    """Frozen task teacher: pooled features of its mapped layers, its task logits and, with `with_states`,
    the token states of its mapped layers [batch, layers, seq, dim] (else None)."""

    def __init__(self, teacher: PreTrainedModel, layer_map: list[int], pooling: str, with_states: bool = False):
        super().__init__()
        self.teacher, self.layer_map, self.pooling, self.with_states = teacher, list(layer_map), pooling, with_states

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        out = self.teacher(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids, output_hidden_states=True)
        states = torch.stack([out.hidden_states[layer] for layer in self.layer_map], dim=1) if self.with_states else None
        return layer_features(out.hidden_states, self.layer_map, attention_mask, self.pooling), out.logits, states


@dataclass
class TaskLossWeights:
    """L = (1 - alpha) * CE + alpha * KD + beta * intermediate (CE and KD become MSE for regression)."""

    alpha: float  # mixes KD into CE
    kd_temperature: float
    beta: float  # weight of the intermediate-layer loss
    temperature: float  # InfoNCE tau
    regression: bool
    intermediate: str = "codir"  # a name in INTERMEDIATE_LOSSES


class ClassifierWithHeads(nn.Module):
    """The sequence-classification student plus what its intermediate loss trains beside it (dropped at
    export): CoDIR's projection heads, or for the L2/cosine baselines a linear map to the teacher's width
    when the widths differ."""

    def __init__(self, student: PreTrainedModel, teacher_feature_dim: int, projection_dim: int, pooling: str, weights: TaskLossWeights):
        super().__init__()
        self.student = student
        layers, width = student.config.num_hidden_layers, student.config.hidden_size
        self.intermediate = INTERMEDIATE_LOSSES[weights.intermediate] if weights.beta > 0 else None
        contrastive = self.intermediate is not None and self.intermediate.compare is None
        self.heads = ProjectionHeads(layers * width, teacher_feature_dim, projection_dim) if contrastive else None
        teacher_width = teacher_feature_dim // layers
        regression_to_teacher = self.intermediate is not None and not contrastive and width != teacher_width
        self.to_teacher_width = nn.Linear(width, teacher_width, bias=False) if regression_to_teacher else nn.Identity()
        self.pooling, self.weights, self.layers = pooling, weights, list(range(1, layers + 1))

    def predict(self, input_ids, attention_mask, token_type_ids=None):
        """Task logits (evaluation)."""
        return self.student(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).logits

    def forward(self, input_ids, attention_mask, labels, token_type_ids=None, teacher_logits=None, target: dict | None = None):
        """Loss terms (`total` first) and, for CoDIR, (contrastive logits, positive index).

        `target` is what the intermediate loss compares with, all pre-projection teacher values: for CoDIR
        either per-anchor bank negatives {`positives` [B, F], `negatives` [B, K, F]} or shared queue candidates
        {`candidates` [C, F], `positive_index`, optional `candidate_labels` to mask same-label rows}; for `mse`
        {`positives`}; for the token-level baselines {`states`} [B, layers, seq, dim].
        """
        out = self.student(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids, output_hidden_states=True)
        w = self.weights
        terms = {"ce": task_loss(out.logits, labels, w.regression)}
        if teacher_logits is not None and w.alpha > 0:
            terms["kd"] = task_kd(out.logits, teacher_logits, w.kd_temperature, w.regression)
        logits = None
        if self.intermediate is not None and self.intermediate.compare is not None:
            terms[w.intermediate] = self._regression_loss(out.hidden_states, attention_mask, target)
        elif self.intermediate is not None:
            logits = self._contrastive_logits(out.hidden_states, attention_mask, labels, **target)
            terms["codir"] = info_nce(*logits)
        total = (1 - w.alpha) * terms["ce"] + w.alpha * terms.get("kd", 0.0) + w.beta * terms.get(w.intermediate, 0.0)
        return {"total": total, **terms}, logits

    def _regression_loss(self, hidden_states, attention_mask, target: dict) -> torch.Tensor:
        """A baseline: the student's states (mapped to the teacher's width) against the teacher's."""
        if self.intermediate.teacher_input == "tokens":
            states = self.to_teacher_width(torch.stack([hidden_states[layer] for layer in self.layers], dim=1))
            return self.intermediate.compare(states, target["states"], attention_mask)
        pooled = layer_features(hidden_states, self.layers, attention_mask, self.pooling).unflatten(-1, (len(self.layers), -1))
        return self.intermediate.compare(self.to_teacher_width(pooled), target["positives"].unflatten(-1, (len(self.layers), -1)))

    def _contrastive_logits(
        self, hidden_states, attention_mask, labels, positives=None, negatives=None, candidates=None, positive_index=None, candidate_labels=None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        anchors = self.heads.project_student(layer_features(hidden_states, self.layers, attention_mask, self.pooling))
        if negatives is not None:
            logits = sampled_contrastive_logits(
                anchors, self.heads.project_teacher(positives), self.heads.project_teacher(negatives), self.weights.temperature
            )
            return logits, torch.zeros(len(anchors), dtype=torch.long, device=anchors.device)
        anchor_labels = None if candidate_labels is None else labels
        return contrastive_logits(
            anchors, self.heads.project_teacher(candidates), positive_index, self.weights.temperature, anchor_labels, candidate_labels
        ), positive_index
