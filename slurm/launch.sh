#!/bin/bash
# Run a Python module under torchrun on every node of the current Slurm allocation.
#   slurm/launch.sh <python module> [args...]      (called by train.sbatch / bench.sbatch)
#
# srun starts ONE torchrun per node; torchrun starts NPROC_PER_NODE ranks on its node and
# they meet at a c10d rendezvous on the first node of the allocation. Preemption: Slurm
# sends SIGUSR1 to this batch shell (#SBATCH --signal=B:USR1@120); we create the stop
# file named by $LONGCTX_STOP_FILE, the trainer checkpoints and returns, and the job is
# requeued; the requeued job resumes from the newest complete checkpoint.
# Env: NPROC_PER_NODE (default: GPUs on the node, else 1), MAX_RESTARTS (torchrun restarts
# after a rank failure, default 2), RUN_DIR (default runs/slurm-<job>), PYTHON (python3),
# MASTER_PORT, LONGCTX_ROOT (the repository; default the submit directory),
# OVERRIDES_FILE (job arrays: line i+1 holds extra arguments for array task i).
set -uo pipefail
MODULE=$1; shift
ROOT=${LONGCTX_ROOT:-$SLURM_SUBMIT_DIR}
cd "$ROOT" || exit 1
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

JOB=${SLURM_ARRAY_JOB_ID:-$SLURM_JOB_ID}${SLURM_ARRAY_TASK_ID:+_$SLURM_ARRAY_TASK_ID}
RUN_DIR=${RUN_DIR:-runs/slurm-$JOB}
mkdir -p "$RUN_DIR"
export LONGCTX_STOP_FILE=$RUN_DIR/STOP
rm -f "$LONGCTX_STOP_FILE"

EXTRA=()
if [ -n "${SLURM_ARRAY_TASK_ID:-}" ] && [ -n "${OVERRIDES_FILE:-}" ]; then
  read -r -a EXTRA <<< "$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" "$OVERRIDES_FILE")"
fi

NPROC=${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
echo "[launch] job $JOB: $SLURM_NNODES node(s) x $NPROC rank(s), rendezvous $MASTER_ADDR:$MASTER_PORT, run dir $RUN_DIR"

trap 'echo "[launch] preemption signal: asking the trainer to checkpoint and stop"; touch "$LONGCTX_STOP_FILE"' USR1

# Each node's torchrun records its root-cause error in $ERRORS/node<N>.json; when the job
# fails, the earliest one is printed last (after srun's and the stopped nodes' own messages).
ERRORS=$RUN_DIR/errors
rm -rf "$ERRORS" && mkdir -p "$ERRORS"

srun --kill-on-bad-exit=1 --ntasks-per-node=1 \
  bash -c 'TORCHELASTIC_ERROR_FILE="$0/node$SLURM_NODEID.json" exec "$@"' "$ERRORS" \
  "${PYTHON:-python3}" -m torch.distributed.run \
  --nnodes="$SLURM_NNODES" --nproc_per_node="$NPROC" \
  --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_id="$JOB" \
  --max_restarts="${MAX_RESTARTS:-2}" \
  -m "$MODULE" "$@" "${EXTRA[@]}" &
PID=$!
# `wait` returns early when the trap fires; keep waiting until srun itself has ended.
while true; do
  wait "$PID"; RC=$?
  kill -0 "$PID" 2>/dev/null || break
done

if [ "$RC" -ne 0 ] && [ ! -f "$LONGCTX_STOP_FILE" ]; then
  "${PYTHON:-python3}" -m train.faults root-cause "$ERRORS" "[launch] job $JOB failed (rc=$RC)"
fi
if [ -f "$LONGCTX_STOP_FILE" ]; then
  rm -f "$LONGCTX_STOP_FILE"
  echo "[launch] stopped for preemption (rc=$RC); requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID"
fi
exit "$RC"
