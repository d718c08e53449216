"""Stage 1: pre-training distillation (masked-LM student, frozen teacher, CoDIR on intermediate layers)."""
