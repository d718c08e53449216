"""Pooled intermediate representations: hidden states in, one feature vector per sequence out."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def pool_tokens(hidden: torch.Tensor, attention_mask: torch.Tensor | None, mode: str = "mean") -> torch.Tensor:
    """Pool [batch, ..., seq, dim] over tokens: `mean` over non-padding tokens (all of them when `attention_mask`
    [batch, seq] is None), or `cls` (the first token)."""
    if mode == "cls":
        return hidden[..., 0, :]
    if mode != "mean":
        raise ValueError(f"unknown pooling {mode!r}")
    if attention_mask is None:
        return hidden.mean(dim=-2)
    mask = attention_mask.to(hidden.dtype).view(len(hidden), *[1] * (hidden.dim() - 3), -1, 1)
    return (hidden * mask).sum(dim=-2) / mask.sum(dim=-2).clamp_min(1.0)


def layer_features(
    hidden_states: Sequence[torch.Tensor],
    layers: Sequence[int],
    attention_mask: torch.Tensor | None,
    mode: str = "mean",
) -> torch.Tensor:
    """Pooled `hidden_states[l]` of each chosen layer l (0 = embeddings), concatenated: [batch, len(layers)*dim].
    All layers are pooled in one operation; `attention_mask` None means no sample is padded."""
    return pool_tokens(torch.stack([hidden_states[layer] for layer in layers], dim=1), attention_mask, mode).flatten(1)
