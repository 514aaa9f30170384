"""Benchmark the `cpu` attention backend against torch's own kernels (not a test).

1. Causal attention, T = 4K and 16K, forward + backward: our `cpu` backend
   (kernels.attention) vs torch.nn.functional.scaled_dot_product_attention vs the raw
   fused aten op pair it dispatches to.  All three read the same [T, H, D] tensors
   through [1, H, T, D] views, as a model's projections would give them.
2. Document mask (documents of --doc-len tokens) vs fully causal at the largest T, both
   through the `cpu` backend: hidden cross-document tiles are skipped.
3. The benchmark's other mask kinds (`parallel.perf.workload.MASK_KINDS`: s2, prefix, sink,
   window, ...) vs fully causal at each of --mask-seqlens, through the `cpu` backend, with
   S2's ideal block-count speed-up beside its measured one.

Variants are timed interleaved (A, B, C, A, B, C, ...) in one process; the table shows
medians and ratios.  The default clock is this process's CPU time, which, run with one
thread, is not inflated when other processes share the cores (use --clock wall on an
idle machine or with several threads).  Usage:
    PYTHONPATH=$PWD python3 scripts/bench_kernels.py [--seqlens 4096 16384] [--repeats 3] [--warmup 1]
    PYTHONPATH=$PWD python3 scripts/bench_kernels.py --parts masks --masks s2 --mask-seqlens 16384   # S2 target
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import kernels
from kernels import MaskSpec
from parallel.perf.workload import MASK_KINDS, ideal_speedup, make_mask

_fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


PARTS = ("torch", "documents", "masks")


def _inputs(t, heads, dim, dtype):
    g = torch.Generator().manual_seed(0)
    q, k, v, dout = (torch.randn(t, heads, dim, generator=g).to(dtype) for _ in range(4))
    return [x.requires_grad_() for x in (q, k, v)], dout


def ours(mask):
    def step(q, k, v, dout):
        out, _ = kernels.attention(q, k, v, mask, backend="cpu")
        out.backward(dout)
    return step


def sdpa(q, k, v, dout):
    bh = lambda x: x.permute(1, 0, 2).unsqueeze(0)
    out = F.scaled_dot_product_attention(bh(q), bh(k), bh(v), is_causal=True)
    out.backward(bh(dout))


def raw_op(q, k, v, dout):
    bh = lambda x: x.detach().permute(1, 0, 2).unsqueeze(0)
    out, lse = _fwd(bh(q), bh(k), bh(v), 0.0, True)
    _bwd(bh(dout), bh(q), bh(k), bh(v), out, lse, 0.0, True)


def interleaved(variants: dict, inputs, repeats: int, warmup: int, clock,
                first: dict | None = None) -> dict[str, float]:
    """Median seconds per fwd+bwd of each variant, timed round-robin after `warmup` rounds
    (`first`, when given, gets each variant's first round: it plans the tiles, later rounds
    reuse the plans as a model's layers do)."""
    (q, k, v), dout = inputs
    times = {name: [] for name in variants}
    for rep in range(warmup + repeats):
        for name, fn in variants.items():
            for x in (q, k, v):
                x.grad = None
            start = clock()
            fn(q, k, v, dout)
            if rep == 0 and first is not None:
                first[name] = clock() - start
            if rep >= warmup:
                times[name].append(clock() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqlens", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--doc-len", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds before the timed ones")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    ap.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="which tables to run")
    ap.add_argument("--masks", nargs="+", choices=[k for k in MASK_KINDS if "document" not in k],
                    default=["s2", "prefix", "window", "sink"], help="mask kinds of part 3 (vs causal)")
    ap.add_argument("--mask-seqlens", type=int, nargs="+", help="seqlens of part 3 (default: the largest --seqlens)")
    ap.add_argument("--window", type=int, default=4096, help="window of the window and sink masks")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    shape = (f"H={args.heads} D={args.head_dim} {args.dtype}, {args.threads} thread(s), "
             f"{args.clock} time, median of {args.repeats} after {args.warmup} warm-up")

    if "torch" in args.parts:
        vs_torch(args, dtype, clock, shape)
    if "documents" in args.parts:
        documents(args, dtype, clock, shape)
    if "masks" in args.parts:
        for t in args.mask_seqlens or [max(args.seqlens)]:
            masks(args, t, dtype, clock, shape)


def vs_torch(args, dtype, clock, shape):
    print(f"## causal fwd+bwd: `cpu` backend vs torch ({shape})\n")
    print("| T | cpu backend (s) | torch SDPA (s) | raw aten op (s) | cpu / SDPA | cpu / raw op |")
    print("|---|---|---|---|---|---|")
    causal = MaskSpec(causal=True)
    for t in args.seqlens:
        med = interleaved({"ours": ours(causal), "sdpa": sdpa, "raw": raw_op},
                          _inputs(t, args.heads, args.head_dim, dtype), args.repeats, args.warmup, clock)
        print(f"| {t} | {med['ours']:.3f} | {med['sdpa']:.3f} | {med['raw']:.3f} | "
              f"{med['ours'] / med['sdpa']:.3f} | {med['ours'] / med['raw']:.3f} |", flush=True)


def documents(args, dtype, clock, shape):
    t = max(args.seqlens)
    causal = MaskSpec(causal=True)
    docs = MaskSpec.from_doc_lens([args.doc_len] * (t // args.doc_len) + ([t % args.doc_len] if t % args.doc_len else []))
    med = interleaved({"causal": ours(causal), "docs": ours(docs)},
                      _inputs(t, args.heads, args.head_dim, dtype), args.repeats, args.warmup, clock)
    print(f"\n## document mask vs fully causal, T={t}, documents of {args.doc_len} tokens ({shape})\n")
    print("| T | causal (s) | documents (s) | speed-up |")
    print("|---|---|---|---|")
    print(f"| {t} | {med['causal']:.3f} | {med['docs']:.3f} | {med['causal'] / med['docs']:.2f}x |")


def masks(args, t, dtype, clock, shape):
    """Every mask of --masks against fully causal, interleaved in one process."""
    cells = {kind: make_mask({"mask": kind, "seqlen": t, "window": args.window}) for kind in args.masks}
    variants = {"causal": ours(MaskSpec(causal=True)), **{kind: ours(mask) for kind, mask in cells.items()}}
    first = {}
    med = interleaved(variants, _inputs(t, args.heads, args.head_dim, dtype), args.repeats, args.warmup, clock, first)
    print(f"\n## mask kinds vs fully causal, T={t}, window {args.window} ({shape})\n")
    print("| mask | seconds | first call (s) | speed-up over causal | ideal (block count) | share of ideal |")
    print("|---|---|---|---|---|---|")
    print(f"| causal | {med['causal']:.3f} | {first['causal']:.3f} | 1.00x | - | - |")
    for kind, mask in cells.items():
        speedup = med["causal"] / med[kind]
        ideal = ideal_speedup(mask.heads, t, args.heads) if mask.heads is not None else None
        shown = f"{ideal:.2f}x | {speedup / ideal:.2f}" if ideal else "- | -"
        print(f"| {mask.describe()} | {med[kind]:.3f} | {first[kind]:.3f} | {speedup:.2f}x | {shown} |", flush=True)


if __name__ == "__main__":
    main()
