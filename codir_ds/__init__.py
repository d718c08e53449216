"""codir-ds: CoDIR contrastive distillation of BERT/RoBERTa-style models on DeepSpeed."""

__version__ = "0.1.0"
