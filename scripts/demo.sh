#!/usr/bin/env bash
# Set up ./.venv, then run a short real CoDIR pre-training distillation on 2 CPU ranks (GPUs if present):
# pretrained MiniLM-L6 teacher -> 3-layer student from its layers 2/4/6, on Wikipedia
# articles + news text. Writes runs/demo/{corpus.jsonl,prepared,tensorboard,checkpoints,student}. Extra arguments override the
# run config, e.g. --teacher.path=/my/bert --data.files='[/data/a.txt]' --train.deepspeed_config=ds_configs/zero2_bf16.json
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
export PATH="$PWD/.venv/bin:$PATH" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if ! { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }; then export DS_ACCELERATOR=cpu; fi
python -m codir_ds demo --out_dir=runs/demo
deepspeed --num_gpus 2 launch/pretrain.py --config runs/demo/demo.yaml "$@"
