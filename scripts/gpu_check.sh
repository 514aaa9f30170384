#!/usr/bin/env bash
# The GPU acceptance check (scripts/gpu_check.py) on a machine with one CUDA GPU, in under
# 8 minutes: kernels vs reference, a 2-process CP run on the one GPU, the kernel benchmark
# against flash-attn.  Results: $OUT/results.md and results.json (OUT defaults to
# ./gpu_check_out).  Extra arguments go to scripts/gpu_check.py.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 || echo "nvidia-smi: not found"
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())"
  python3 -c "import triton; print('triton', triton.__version__)" 2>&1 | tail -1
  python3 -c "import flash_attn; print('flash-attn', flash_attn.__version__)" 2>&1 | tail -1
} | tee "$OUT/environment.txt"
PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} timeout 470 python3 -m scripts.gpu_check --out "$OUT" "$@"
rc=$?
[ "$rc" -eq 124 ] && echo "gpu_check: stopped at the 470 s limit; partial output only" >&2
exit "$rc"
