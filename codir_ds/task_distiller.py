"""Stage-2 modules DeepSpeed wraps: the finetuned teacher's outputs, and the classifier student with its CoDIR heads."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel

from .objective import ProjectionHeads, contrastive_logits, info_nce, sampled_contrastive_logits, task_kd, task_loss
from .representations import layer_features


class TeacherTaskOutputs(nn.Module):
    """Frozen task teacher: pooled features of its mapped layers and its task logits."""

    def __init__(self, teacher: PreTrainedModel, layer_map: list[int], pooling: str):
        super().__init__()
        self.teacher, self.layer_map, self.pooling = teacher, list(layer_map), pooling

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        out = self.teacher(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids, output_hidden_states=True)
        return layer_features(out.hidden_states, self.layer_map, attention_mask, self.pooling), out.logits


@dataclass
class TaskLossWeights:
    kd: float  # alpha
    kd_temperature: float
    codir: float  # beta
    temperature: float  # InfoNCE tau
    regression: bool


class ClassifierWithHeads(nn.Module):
    """The sequence-classification student plus CoDIR projection heads (dropped at export)."""

    def __init__(self, student: PreTrainedModel, teacher_feature_dim: int, projection_dim: int, pooling: str, weights: TaskLossWeights):
        super().__init__()
        self.student = student
        layers = student.config.num_hidden_layers
        self.heads = ProjectionHeads(layers * student.config.hidden_size, teacher_feature_dim, projection_dim)
        self.pooling, self.weights, self.layers = pooling, weights, list(range(1, layers + 1))

    def forward(self, input_ids, attention_mask, token_type_ids=None, labels=None, teacher_logits=None,
                positives=None, negatives=None, candidates=None, positive_index=None, candidate_labels=None):
        """Loss terms (`total` first) and the contrastive logits; with no `labels`, ({}, task logits).

        CoDIR negatives come either per anchor from the memory bank (`positives` [B, F] and `negatives`
        [B, K, F]), or shared from the queue (`candidates` [C, F], `positive_index`, and `candidate_labels`
        to mask same-label rows). All are pre-projection teacher features.
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
        if w.codir > 0:
            anchors = self.heads.project_student(layer_features(out.hidden_states, self.layers, attention_mask, self.pooling))
            if negatives is not None:
                logits = sampled_contrastive_logits(anchors, self.heads.project_teacher(positives), self.heads.project_teacher(negatives), w.temperature)
                positive_index = torch.zeros(len(anchors), dtype=torch.long, device=anchors.device)
            else:
                anchor_labels = None if candidate_labels is None else labels
                logits = contrastive_logits(anchors, self.heads.project_teacher(candidates), positive_index, w.temperature, anchor_labels, candidate_labels)
            terms["codir"] = info_nce(logits, positive_index)
            logits = (logits.detach(), positive_index)
        weight = {"ce": 1 - w.kd if "kd" in terms else 1.0, "kd": w.kd, "codir": w.codir}
        total = sum(weight[name] * value for name, value in terms.items())
        return {"total": total, **terms}, logits
