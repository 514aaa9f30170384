"""Masks on the CP strategies: ring bytes under S2 against dense causal, and run times of
masks against each other (e.g. window + sink against the plain window).

    python -m scripts.bench_ring_s2 bytes --seqlen 65536 --world 4
    torchrun --nproc_per_node 4 -m scripts.bench_ring_s2 run --seqlen 16384 --masks causal s2 --strategies ring
    torchrun --nproc_per_node 2 -m scripts.bench_ring_s2 run --seqlen 16384 --masks window window+sink \\
        --strategies ring ulysses

`bytes` prints the ring's cost hook (`Ring.cost_bytes`, equal to `cp.stats` by the tests)
per rank.  `run` builds each (strategy, mask) once, then times forward + backward of every
variant in turn, `--repeats` rounds (slowest rank per call), so variants are compared as
ratios taken in one run; it prints the median, the ratio to the first mask of the same
strategy, and the stats bytes beside the hook's.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import parallel
from kernels import HeadStride, MaskSpec
from parallel.perf.cost import Layout, balancer_rows, bytes_sent


def make_masks(args) -> dict[str, MaskSpec]:
    s2 = HeadStride(args.block, args.local_blocks, args.vert_stride)
    return {
        "causal": MaskSpec(causal=True),
        "s2": MaskSpec(causal=True, heads=s2),
        "window": MaskSpec(causal=True, window=args.window),
        "window+sink": MaskSpec(causal=True, window=args.window, sink=args.sink),
    }


def layout(args) -> Layout:
    return Layout(args.seqlen, args.heads[0], args.heads[1], args.head_dim, 4)


def hook_bytes(args, mask, balancer=None) -> dict[str, list[int]]:
    rows = balancer_rows(balancer, args.seqlen, args.world, mask)
    return bytes_sent("ring", layout(args), args.world, mask=mask, rows=rows)


def show_bytes(args) -> None:
    masks = make_masks(args)
    for balancer in (None, "contiguous"):
        dense, s2 = hook_bytes(args, masks["causal"], balancer), hook_bytes(args, masks["s2"], balancer)
        print(f"balancer={balancer or 'default'} seqlen={args.seqlen} world={args.world} heads={args.heads} "
              f"D={args.head_dim} fp32")
        for kind in ("fwd", "bwd"):
            print(f"  {kind}: dense causal MB/rank {[round(b / 2**20, 1) for b in dense[kind]]}  "
                  f"s2 MB/rank {[round(b / 2**20, 1) for b in s2[kind]]}  "
                  f"max ratio {max(s2[kind]) / max(dense[kind]):.3f}  mean ratio "
                  f"{sum(s2[kind]) / sum(dense[kind]):.3f}")


def _call(cp, q, k, v, dout) -> float:
    import torch.distributed as dist

    q, k, v = (x.clone().requires_grad_() for x in (q, k, v))
    dist.barrier()
    start = time.perf_counter()
    cp.attention(q, k, v).backward(dout)
    took = torch.tensor([time.perf_counter() - start])
    dist.all_reduce(took, op=dist.ReduceOp.MAX)
    return float(took)


def run(args) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    world, rank = dist.get_world_size(), dist.get_rank()
    args.world = world
    masks = make_masks(args)
    hq, hkv = args.heads
    g = torch.Generator().manual_seed(0)
    q, dout = (torch.randn(args.seqlen, hq, args.head_dim, generator=g) for _ in range(2))
    k, v = (torch.randn(args.seqlen, hkv, args.head_dim, generator=g) for _ in range(2))
    variants = {}
    for strategy in args.strategies:
        for name in args.masks:
            cp = parallel.build(strategy, masks[name], args.seqlen, backend="cpu")
            variants[strategy, name] = (cp, *(cp.shard(x) for x in (q, k, v, dout)))
    times = {key: [] for key in variants}
    for rep in range(args.warmup + args.repeats):
        for key, (cp, *tensors) in variants.items():
            took = _call(cp, *tensors)
            if rep >= args.warmup:
                times[key].append(took)
    if rank:
        return
    for (strategy, name), (cp, *_) in variants.items():
        med = statistics.median(times[strategy, name])
        base = statistics.median(times[strategy, args.masks[0]])
        line = (f"{strategy:8s} {name:12s} fwd+bwd median {med:7.2f} s  ratio to {args.masks[0]} {med / base:.3f}  "
                f"times {[round(t, 2) for t in times[strategy, name]]}  bytes_sent/rank "
                f"{[round(b / 2**20, 1) for b in cp.stats.bytes_sent]} MB")
        if strategy == "ring":
            hook = bytes_sent("ring", layout(args), world, mask=masks[name], rows=[r.numpy() for r in cp.indices])
            same = hook["fwd"] == cp.stats.bytes_sent and hook["bwd"] == cp.stats.extra["bytes_bwd_sent"]
            line += f"  bwd {[round(b / 2**20, 1) for b in cp.stats.extra['bytes_bwd_sent']]} MB  hook equal: {same}"
        print(line, flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", choices=["bytes", "run"])
    ints = {"seqlen": 65536, "world": 4, "head-dim": 64, "block": 64, "local-blocks": 16, "vert-stride": 8,
            "window": 4096, "sink": 4, "warmup": 1, "repeats": 3}
    for name, default in ints.items():  # --world: bytes mode (run mode: the torchrun world)
        p.add_argument(f"--{name}", type=int, default=default)
    p.add_argument("--heads", type=int, nargs=2, default=[8, 8], metavar=("HQ", "HKV"))
    p.add_argument("--masks", nargs="+", default=["causal", "s2"], choices=["causal", "s2", "window", "window+sink"])
    p.add_argument("--strategies", nargs="+", default=["ring"])
    args = p.parse_args(argv)
    if args.mode == "bytes":
        show_bytes(args)
    else:
        run(args)


if __name__ == "__main__":
    main()
