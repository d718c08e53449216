"""Stage-2 modules: the finetuned teacher's outputs, and the classifier student with its CoDIR objective."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel

from ..method.losses import INTERMEDIATE_LOSSES, gradient_norm_ratio, task_kd, task_loss, trainable
from ..method.objective import CodirObjective
from ..method.representations import layer_features


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
    regression: bool
    intermediate: str = "codir"  # a name in INTERMEDIATE_LOSSES


class ClassifierWithHeads(nn.Module):
    """The sequence-classification student plus what its intermediate loss trains beside it (dropped at
    export): the CoDIR objective's projection heads, or for the L2/cosine baselines a linear map to the
    teacher's width when the widths differ."""

    measure_gradients = False  # set by the loop on the steps that log `logging.gradient_ratio`

    def __init__(self, student: PreTrainedModel, codir: CodirObjective | None, teacher_feature_dim: int, pooling: str, weights: TaskLossWeights):
        super().__init__()
        self.student, self.codir = student, codir
        layers, width = student.config.num_hidden_layers, student.config.hidden_size
        self.intermediate = INTERMEDIATE_LOSSES[weights.intermediate] if weights.beta > 0 else None
        regression_to_teacher = self.intermediate is not None and codir is None and width != teacher_feature_dim // layers
        self.to_teacher_width = nn.Linear(width, teacher_feature_dim // layers, bias=False) if regression_to_teacher else nn.Identity()
        self.pooling, self.weights, self.layers = pooling, weights, list(range(1, layers + 1))

    def predict(self, input_ids, attention_mask, token_type_ids=None):
        """Task logits (evaluation)."""
        return self.student(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).logits

    def forward(
        self, input_ids, attention_mask, labels, ids, token_type_ids=None, teacher_logits=None, teacher_features=None, teacher_states=None
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Loss terms (`total` first) and CoDIR's statistics (empty without CoDIR) for one micro-batch.

        `teacher_features` are the teacher's pooled mapped layers of the same examples (CoDIR's positives, the
        `mse` baseline's targets), `teacher_states` its token states [B, layers, seq, dim] (token-level baselines);
        `ids` are the examples' ids, which CoDIR uses to draw and mask negatives.
        """
        out = self.student(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids, output_hidden_states=True)
        w = self.weights
        terms = {"ce": task_loss(out.logits, labels, w.regression)}
        if teacher_logits is not None and w.alpha > 0:
            terms["kd"] = task_kd(out.logits, teacher_logits, w.kd_temperature, w.regression)
        stats = {}
        if self.codir is not None:
            pooled = layer_features(out.hidden_states, self.layers, attention_mask, self.pooling)
            terms["codir"], stats = self.codir(pooled, teacher_features, None if w.regression else labels, ids)
        elif self.intermediate is not None:
            terms[w.intermediate] = self._regression_loss(out.hidden_states, attention_mask, teacher_features, teacher_states)
        total = (1 - w.alpha) * terms["ce"] + w.alpha * terms.get("kd", 0.0) + w.beta * terms.get(w.intermediate, 0.0)
        if self.measure_gradients and w.intermediate in terms:  # `logging.gradient_ratio`, on a logging step
            weighted = w.beta * terms[w.intermediate]
            stats = {**stats, "gradient_ratio": gradient_norm_ratio(weighted, total - weighted, trainable(self.student))}
        return {"total": total, **terms}, stats

    def _regression_loss(self, hidden_states, attention_mask, teacher_features, teacher_states) -> torch.Tensor:
        """A baseline: the student's states (mapped to the teacher's width) against the teacher's."""
        if self.intermediate.teacher_input == "tokens":
            states = self.to_teacher_width(torch.stack([hidden_states[layer] for layer in self.layers], dim=1))
            return self.intermediate.compare(states, teacher_states, attention_mask)
        pooled = layer_features(hidden_states, self.layers, attention_mask, self.pooling).unflatten(-1, (len(self.layers), -1))
        return self.intermediate.compare(self.to_teacher_width(pooled), teacher_features.unflatten(-1, (len(self.layers), -1)))
