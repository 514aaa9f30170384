#!/bin/bash
# Start the throw-away Slurm cluster (2 virtual nodes on this machine) that
# tests/train/test_slurm.py submits to. Called by .ci/run before the tests; idempotent.
# The start script lives in the shared CI folder next to the repository (../shared/ci).
set -euo pipefail
HERE=$(cd "$(dirname "$0")/.." && pwd)
START=${SLURM_START_SCRIPT:-$HERE/../shared/ci/start_slurm.sh}
[ -f "$START" ] || START=/work/shared/ci/start_slurm.sh
SLURM_CI_NODES=${SLURM_CI_NODES:-2} bash "$START"
sinfo
