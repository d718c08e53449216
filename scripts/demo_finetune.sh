#!/usr/bin/env bash
# Stage-2 demo: finetune the MiniLM-L6 teacher on Rotten Tomatoes reviews (fresh vs rotten), then distil it
# into the stage-1 demo's 3-layer student with CE + KD + CoDIR (label-aware memory-bank negatives), on 2
# ranks. Runs the stage-1 demo first if its student is missing. Prints teacher vs student dev accuracy,
# size and inference speed. Extra arguments override the distillation config (e.g. --loss.beta=0.5).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f runs/demo/student/config.json ] || bash scripts/demo.sh
bash scripts/setup_env.sh
export PATH="$PWD/.venv/bin:$PATH" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if ! { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }; then export DS_ACCELERATOR=cpu; fi
python -m codir_ds demo_finetune --out_dir=runs/demo_rt --student=runs/demo/student
[ -f runs/demo_rt/teacher_run/teacher/eval_results.json ] || deepspeed --num_gpus 2 launch/finetune.py teacher --config runs/demo_rt/teacher.yaml
deepspeed --num_gpus 2 launch/finetune.py --config runs/demo_rt/distill.yaml "$@"
python -m codir_ds report runs/demo_rt/teacher_run/teacher runs/demo_rt/student
