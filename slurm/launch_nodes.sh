#!/usr/bin/env bash
# Shared by slurm/*.sbatch: start one DeepSpeed launcher per node of this SLURM job (no ssh, no pdsh),
# forward SLURM's stop warning to the ranks, and requeue the job when it stopped before finishing.
#   launch_nodes.sh ENTRY_POINT [run-config arguments ...]      (ENTRY_POINT: launch/pretrain.py, launch/finetune.py)
# Environment: RUN_DIR (required; shared by all nodes: checkpoints, TensorBoard, logs, export),
# GPUS_PER_NODE (default: SLURM's count, else nvidia-smi's), MASTER_PORT (default: derived from the job id).
set -euo pipefail
ENTRY=$1
shift
: "${RUN_DIR:?set RUN_DIR to a folder on a filesystem that every node mounts}"
: "${SLURM_JOB_ID:?run this through sbatch (SLURM_JOB_ID is not set)}"
cd "${SLURM_SUBMIT_DIR:-$PWD}"
[ -x .venv/bin/deepspeed ] && export PATH="$PWD/.venv/bin:$PATH"

mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
MASTER_ADDR=${MASTER_ADDR:-${NODES[0]}}
MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-$(nvidia-smi -L 2>/dev/null | wc -l)}}
STOP_FILE="$RUN_DIR/STOP"
mkdir -p "$RUN_DIR/logs"
HOSTFILE="$RUN_DIR/hostfile.$SLURM_JOB_ID"
for node in "${NODES[@]}"; do echo "$node slots=$GPUS_PER_NODE"; done >"$HOSTFILE"
echo "codir-ds/slurm: job $SLURM_JOB_ID: ${#NODES[@]} nodes x $GPUS_PER_NODE ranks, master $MASTER_ADDR:$MASTER_PORT, run dir $RUN_DIR"

# SLURM sends USR1 to this shell (#SBATCH --signal=B:USR1@120) before the time limit: the stop file makes
# every rank stop at the next step boundary after writing a checkpoint, and the job is requeued. On
# preemption or scancel SLURM sends TERM to every process: the ranks checkpoint and stop by themselves,
# and SLURM requeues a preempted --requeue job itself. Each task's DeepSpeed runner ignores TERM: it would
# die at once, and srun --kill-on-bad-exit would then kill the ranks in the middle of their checkpoint.
# DeepSpeed's launcher waits up to 30 s for its ranks, then exits 1 (not their 75).
REQUEUE=0
request_stop() { touch "$STOP_FILE"; echo "codir-ds/slurm: $1: asking all ranks to checkpoint and stop"; }
trap 'REQUEUE=1; request_stop USR1' USR1
trap 'request_stop TERM' TERM
rm -f "$STOP_FILE"

srun --kill-on-bad-exit=1 --ntasks-per-node=1 --output="$RUN_DIR/logs/job$SLURM_JOB_ID-node%n.log" \
  bash -c 'trap "" TERM; exec deepspeed --hostfile "$1" --no_ssh --node_rank "$SLURM_NODEID" --master_addr "$2" --master_port "$3" "${@:4}"' \
  node-launcher "$HOSTFILE" "$MASTER_ADDR" "$MASTER_PORT" "$ENTRY" --output.dir="$RUN_DIR" --checkpoint.stop_file="$STOP_FILE" "$@" &
SRUN=$!
while true; do  # a trapped signal interrupts `wait`; keep waiting for srun itself
  status=0
  wait "$SRUN" || status=$?
  kill -0 "$SRUN" 2>/dev/null || break
done
echo "codir-ds/slurm: ranks finished with status $status"
if [ "$status" = 75 ]; then  # codir-ds's EXIT_STOPPED: checkpointed before train.max_steps, not a failure
  if [ "$REQUEUE" = 1 ]; then  # the time limit's warning; a preempted --requeue job is requeued by SLURM itself
    echo "codir-ds/slurm: requeueing job $SLURM_JOB_ID; it resumes from the checkpoint it just wrote"
    scontrol requeue "$SLURM_JOB_ID"
  fi
  exit 0
fi
exit "$status"
