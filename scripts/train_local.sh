#!/bin/bash
# Train on this machine with N ranks: scripts/train_local.sh N [hydra overrides...]
#   scripts/train_local.sh 4 parallel=ring engine=deepspeed
# torchrun restarts failed ranks (MAX_RESTARTS, default 2); set checkpoint=default for resume.
# The run folder (runs/<date>/<time>, or train.out_dir) is relative to where you call it from.
set -euo pipefail
N=${1:?usage: scripts/train_local.sh NPROC [hydra overrides...]}; shift
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH} OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} exec "${PYTHON:-python3}" -m torch.distributed.run --standalone --nproc_per_node="$N" --max_restarts="${MAX_RESTARTS:-2}" -m train "$@"
