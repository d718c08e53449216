"""Pooled intermediate representations: hidden states in, one feature vector per sequence out."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def pool_tokens(hidden: torch.Tensor, attention_mask: torch.Tensor, mode: str = "mean") -> torch.Tensor:
    """Pool [batch, seq, dim] over tokens: `mean` over non-padding tokens, or `cls` (first token)."""
    if mode == "cls":
        return hidden[:, 0]
    if mode != "mean":
        raise ValueError(f"unknown pooling {mode!r}")
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)


def layer_features(
    hidden_states: Sequence[torch.Tensor],
    layers: Sequence[int],
    attention_mask: torch.Tensor,
    mode: str = "mean",
) -> torch.Tensor:
    """Concatenate pooled `hidden_states[l]` for each chosen layer l (0 = embeddings): [batch, len(layers)*dim]."""
    return torch.cat([pool_tokens(hidden_states[layer], attention_mask, mode) for layer in layers], dim=-1)
