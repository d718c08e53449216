"""What differs between encoder families, read from a model's own structure: where its per-layer weights live,
which tensors form its masked-LM head, and how that head turns hidden states into vocabulary logits."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModelForMaskedLM, PretrainedConfig, PreTrainedModel

from ..runtime.errors import CodirError, error_line

MLM_HEADS: dict[str, Callable[[PreTrainedModel, torch.Tensor], torch.Tensor]] = {
    # model types whose masked-LM head is more than one module beside the body; all others have exactly one
    "electra": lambda model, hidden: model.generator_lm_head(model.generator_predictions(hidden)),
    "modernbert": lambda model, hidden: model.decoder(model.head(hidden)),
    "deberta-v2": lambda model, hidden: model.cls(hidden) if model.legacy else model.lm_predictions(hidden, model.deberta.embeddings.word_embeddings),
}


@dataclass(frozen=True)
class EncoderLayout:
    """Names, relative to the masked-LM model, worked out from its config alone (the model built without weights)."""

    model_type: str
    prefix: str  # the body's attribute (`bert`, `roberta`, `model`, ...)
    layers: str | None  # the body's per-layer module list (`encoder.layer`, `layers`); None when layers share weights
    head_tensors: tuple[str, ...]  # trained tensors of the masked-LM head (tied ones excluded)
    max_length: int | None  # the most tokens its absolute position embeddings take; None with relative/rotary positions only


def check_length(layout: EncoderLayout, length: int, key: str) -> None:
    """Refuse sequences longer than the teacher's position embeddings reach."""
    if layout.max_length is not None and length > layout.max_length:
        raise CodirError(
            f"{key}: {length} exceeds the {layout.max_length} positions of the {layout.model_type} teacher; set {key}={layout.max_length}"
        )


def encoder_layout(config: PretrainedConfig, role: str = "teacher.path") -> EncoderLayout:
    """The layout of `config`'s masked-LM model; a model type without one is a `CodirError`."""
    try:
        with torch.device("meta"):
            model = AutoModelForMaskedLM.from_config(config)
    except (ValueError, KeyError, AttributeError, TypeError) as err:
        raise CodirError(f"{role}: model type {config.model_type!r} has no masked-LM encoder in transformers: {error_line(err, limit=200)}") from None
    prefix = model.base_model_prefix
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})  # copies of other tensors: not stored
    names = [name for name, _ in model.named_parameters(remove_duplicate=False)]
    head = tuple(name for name in names if not name.startswith(prefix + ".") and name not in tied)
    return EncoderLayout(config.model_type, prefix, layer_list(model.base_model, config.num_hidden_layers), head, _max_length(model))


def layer_list(body: nn.Module, num_layers: int) -> str | None:
    """The name of the body's one module list with a module per layer; None if there is none (ALBERT's layers
    share one set of weights) or several."""
    names = [name for name, module in body.named_modules() if isinstance(module, nn.ModuleList) and len(module) == num_layers]
    return names[0] if len(names) == 1 else None


def _max_length(model: PreTrainedModel) -> int | None:
    """RoBERTa-style embeddings number positions from padding_idx + 1 on, so that many of them are never used."""
    embeddings = getattr(model.base_model, "embeddings", None)
    if not hasattr(embeddings, "position_embeddings"):
        return None
    offset = embeddings.padding_idx + 1 if hasattr(embeddings, "create_position_ids_from_input_ids") else 0
    return model.config.max_position_embeddings - offset


def mlm_logits(model: PreTrainedModel, hidden: torch.Tensor) -> torch.Tensor:
    """Vocabulary logits of the masked-LM `model`'s head applied to body outputs `hidden` [..., dim]."""
    custom = MLM_HEADS.get(model.config.model_type)
    if custom is not None:
        return custom(model, hidden)
    heads = [module for name, module in model.named_children() if name != model.base_model_prefix]
    if len(heads) != 1:
        raise CodirError(f"{type(model).__name__}: expected one masked-LM head beside the body, found {len(heads)}; add its family to MLM_HEADS")
    return heads[0](hidden)
