"""Stage 2: task finetuning distillation (CE + logit KD + CoDIR with label-aware negatives)."""
