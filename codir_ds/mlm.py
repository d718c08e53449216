"""Masked-LM pieces: the head of an `...ForMaskedLM` model, applied only where tokens are masked."""
from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel


def mlm_head(model: PreTrainedModel) -> nn.Module:
    """The module after the encoder body (`cls` for BERT, `lm_head` for RoBERTa)."""
    heads = [module for name, module in model.named_children() if name != model.base_model_prefix]
    if len(heads) != 1:
        raise ValueError(f"{type(model).__name__}: expected one masked-LM head beside the body, found {len(heads)}")
    return heads[0]


def masked_positions(labels: torch.Tensor) -> torch.Tensor:
    """Boolean [batch, seq]: where a token was masked (label != -100)."""
    return labels.ne(-100)


def masked_lm_logits(head: nn.Module, sequence_output: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Vocabulary logits [masked tokens, vocab] only at masked positions: the head never sees the rest."""
    return head(sequence_output[positions])
