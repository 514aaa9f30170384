"""Calibrate CAD's task cost model: time = per_task * tasks + per_pair * pairs (fwd + bwd).

A CAD server runs all its tasks as one kernel call, so what matters is how the time of
that call grows with the number of tasks at a fixed number of allowed pairs.  This runs
batches of n causal documents of length L as one `kernels.attention` call (as a server
does), fits the two coefficients by least squares and prints the per-task overhead in
pair units, the number stored in parallel/cad/tasks.py TASK_OVERHEAD_PAIRS.

    PYTHONPATH=. python3 scripts/profile_cad_cost.py --backend cpu
"""
from __future__ import annotations

import argparse
import time

import torch

import kernels
from kernels import MaskSpec
from parallel.cad.tasks import MaskKind, row_pairs


def time_call(n, length, hq, hkv, d, dtype, backend, repeats):
    """Fastest seconds (least disturbed by other load) of forward + backward of n causal documents of `length` in one call."""
    mask = MaskSpec.from_doc_lens([length] * n, causal=True)
    t = n * length
    q = torch.randn(t, hq, d, dtype=dtype, requires_grad=True)
    k = torch.randn(t, hkv, d, dtype=dtype, requires_grad=True)
    v = torch.randn(t, hkv, d, dtype=dtype, requires_grad=True)
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        out, _ = kernels.attention(q, k, v, mask, backend=backend)
        out.sum().backward()
        times.append(time.perf_counter() - t0)
    return min(times[1:])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backend", default="cpu")
    ap.add_argument("--tokens", type=int, default=4096, help="tokens per call (n * L)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[32, 64, 128, 256, 512, 1024, 2048, 4096])
    ap.add_argument("--heads", type=int, nargs=2, default=[8, 2], metavar=("HQ", "HKV"))
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    rows = []
    print("| tasks | task length | pairs | seconds (fwd+bwd) |\n|---|---|---|---|")
    for length in args.lengths:
        n = max(1, args.tokens // length)
        pairs = n * row_pairs(0, length, length, MaskKind(causal=True))
        sec = time_call(n, length, *args.heads, args.head_dim, torch.float32, args.backend, args.repeats)
        rows.append((n, pairs, sec))
        print(f"| {n} | {length} | {pairs} | {sec:.4f} |", flush=True)
    a = torch.tensor([[float(n), float(p)] for n, p, _ in rows], dtype=torch.float64)
    b = torch.tensor([[s] for _, _, s in rows], dtype=torch.float64)
    per_task, per_pair = torch.linalg.lstsq(a, b).solution.flatten().tolist()
    print(f"backend={args.backend}: per_task={per_task * 1e6:.1f} us, per_pair={per_pair * 1e9:.3f} ns, "
          f"task overhead = {per_task / per_pair if per_pair > 0 else float('nan'):.0f} pairs")


if __name__ == "__main__":
    main()
