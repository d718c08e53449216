"""The modules of stage 1: the frozen teacher's feature extractor and the student with its CoDIR objective."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from ..method.losses import gradient_norm_ratio, logit_kd, trainable
from ..method.objective import CodirObjective
from ..method.representations import layer_features
from ..models.encoders import mlm_logits


def masked_lm_logits(model: PreTrainedModel, sequence_output: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Vocabulary logits [batch * m, vocab] of the masked-LM `model`'s head only at the masked `positions`
    [batch, m] (gathered by index: no host sync); the head never sees the rest."""
    gathered = sequence_output.gather(1, positions.unsqueeze(-1).expand(-1, -1, sequence_output.shape[-1]))
    return mlm_logits(model, gathered.flatten(0, 1))


class TeacherFeatures(nn.Module):
    """Frozen teacher: pooled features of its mapped layers and, with an MLM head, logits at masked positions."""

    def __init__(self, teacher: PreTrainedModel, layer_map: list[int], pooling: str, with_logits: bool):
        super().__init__()
        self.teacher, self.layer_map, self.pooling, self.with_logits = teacher, list(layer_map), pooling, with_logits

    def forward(self, input_ids, attention_mask, positions):
        body = self.teacher.base_model if self.with_logits else self.teacher
        out = body(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        features = layer_features(out.hidden_states, self.layer_map, attention_mask, self.pooling)
        logits = None
        if self.with_logits:
            logits = masked_lm_logits(self.teacher, out.last_hidden_state, positions)
        return features, logits


@dataclass
class LossWeights:
    """L = mlm * MLM + kd * KD + codir * CoDIR (the `loss.*` keys)."""

    mlm: float
    kd: float
    kd_temperature: float
    codir: float


class StudentWithHeads(nn.Module):
    """The trainable part: the masked-LM student plus the CoDIR objective's projection heads (dropped at export)."""

    measure_gradients = False  # set by the loop on the steps that log `logging.gradient_ratio`

    def __init__(self, student: PreTrainedModel, codir: CodirObjective, pooling: str, weights: LossWeights):
        super().__init__()
        self.student, self.codir = student, codir
        self.pooling, self.weights, self.layers = pooling, weights, list(range(1, student.config.num_hidden_layers + 1))

    def forward(self, input_ids, attention_mask, labels, positions, teacher_features, teacher_logits=None):
        """Loss terms (`total` first) and CoDIR's statistics for one micro-batch: MLM and KD at the masked `positions`
        [batch, m] (labels [batch, seq]); `teacher_features` are this rank's pooled teacher features of the same
        samples, `teacher_logits` the teacher's at the masked positions."""
        out = self.student.base_model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        student_logits = masked_lm_logits(self.student, out.last_hidden_state, positions)
        targets = labels.gather(1, positions).flatten()
        predicted = targets.ne(-100)  # all but the extra positions of a row with fewer ordinary tokens than m
        mlm = F.cross_entropy(student_logits.float(), targets, reduction="sum") / predicted.sum().clamp_min(1)
        terms = {"mlm": mlm}
        if teacher_logits is not None and self.weights.kd > 0:
            terms["kd"] = logit_kd(student_logits, teacher_logits, self.weights.kd_temperature, predicted)
        terms["codir"], stats = self.codir(layer_features(out.hidden_states, self.layers, attention_mask, self.pooling), teacher_features)
        w = self.weights
        total = w.mlm * terms["mlm"] + w.kd * terms.get("kd", 0.0) + w.codir * terms["codir"]
        if self.measure_gradients:  # `logging.gradient_ratio`, on a logging step
            weighted = w.codir * terms["codir"]
            stats["gradient_ratio"] = gradient_norm_ratio(weighted, total - weighted, trainable(self.student))
        return {"total": total, **terms}, stats
