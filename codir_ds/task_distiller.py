"""Stage-2 modules DeepSpeed wraps: the finetuned teacher's outputs, and the classifier student with its CoDIR heads."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel

from .objective import (ProjectionHeads, contrastive_logits, info_nce, pooled_mse, sampled_contrastive_logits, task_kd,
                        task_loss, token_cosine, token_mse)
from .representations import layer_features


TOKEN_LEVEL = ("mse_tokens", "cosine")  # intermediate losses on every token's state: they need a live teacher


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
    kd: float  # alpha
    kd_temperature: float
    codir: float  # beta: weight of the intermediate-layer loss
    temperature: float  # InfoNCE tau
    regression: bool
    intermediate: str = "codir"  # codir | mse (PKD, pooled) | mse_tokens | cosine (DistilBERT)


class ClassifierWithHeads(nn.Module):
    """The sequence-classification student plus what its intermediate loss trains beside it (dropped at
    export): CoDIR's projection heads, or for the L2/cosine baselines a linear map to the teacher's width
    when the widths differ."""

    def __init__(self, student: PreTrainedModel, teacher_feature_dim: int, projection_dim: int, pooling: str, weights: TaskLossWeights):
        super().__init__()
        self.student = student
        layers, width = student.config.num_hidden_layers, student.config.hidden_size
        self.heads = ProjectionHeads(layers * width, teacher_feature_dim, projection_dim) if weights.intermediate == "codir" and weights.codir > 0 else None
        teacher_width = teacher_feature_dim // layers
        self.to_teacher_width = nn.Linear(width, teacher_width, bias=False) if weights.intermediate != "codir" and width != teacher_width else nn.Identity()
        self.pooling, self.weights, self.layers = pooling, weights, list(range(1, layers + 1))

    def forward(self, input_ids, attention_mask, token_type_ids=None, labels=None, teacher_logits=None,
                positives=None, negatives=None, candidates=None, positive_index=None, candidate_labels=None, teacher_states=None):
        """Loss terms (`total` first) and the contrastive logits; with no `labels`, ({}, task logits).

        CoDIR negatives come either per anchor from the memory bank (`positives` [B, F] and `negatives`
        [B, K, F]), or shared from the queue (`candidates` [C, F], `positive_index`, and `candidate_labels`
        to mask same-label rows). All are pre-projection teacher features. The `mse` baseline compares
        pooled features with `positives`; `mse_tokens` and `cosine` compare token states with `teacher_states`.
        """
        out = self.student(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                           output_hidden_states=labels is not None)
        if labels is None:
            return {}, out.logits
        w = self.weights
        terms = {"ce": task_loss(out.logits, labels, w.regression)}
        if teacher_logits is not None and w.kd > 0:
            terms["kd"] = task_kd(out.logits, teacher_logits, w.kd_temperature, w.regression)
        logits = None
        if w.codir > 0 and w.intermediate == "mse":
            pooled = layer_features(out.hidden_states, self.layers, attention_mask, self.pooling)
            pooled = self.to_teacher_width(pooled.unflatten(-1, (len(self.layers), -1))).flatten(1)
            terms["mse"] = pooled_mse(pooled, positives, len(self.layers))
        elif w.codir > 0 and w.intermediate in TOKEN_LEVEL:
            states = self.to_teacher_width(torch.stack([out.hidden_states[layer] for layer in self.layers], dim=1))
            loss = token_mse if w.intermediate == "mse_tokens" else token_cosine
            terms[w.intermediate] = loss(states, teacher_states, attention_mask)
        elif w.codir > 0:
            anchors = self.heads.project_student(layer_features(out.hidden_states, self.layers, attention_mask, self.pooling))
            if negatives is not None:
                logits = sampled_contrastive_logits(anchors, self.heads.project_teacher(positives), self.heads.project_teacher(negatives), w.temperature)
                positive_index = torch.zeros(len(anchors), dtype=torch.long, device=anchors.device)
            else:
                anchor_labels = None if candidate_labels is None else labels
                logits = contrastive_logits(anchors, self.heads.project_teacher(candidates), positive_index, w.temperature, anchor_labels, candidate_labels)
            terms["codir"] = info_nce(logits, positive_index)
            logits = (logits.detach(), positive_index)
        weight = {"ce": 1 - w.kd, "kd": w.kd}
        total = sum(weight.get(name, w.codir) * value for name, value in terms.items())
        return {"total": total, **terms}, logits
