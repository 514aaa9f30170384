"""Benchmark the CAD planner on realistic document mixes (a measurement, not a test).

Batches are packed from document lengths in a JSON list (--doclens, else $LONGCTX_DOCLENS,
else the ProLong mix shipped in the package), with long documents
upsampled as long-context training does (documents of at least --long tokens drawn
--upsample times as often).  For every (ranks, tokens per rank) it prints the attention
cost max/mean of plain packing (each rank computes its own queries), of per-document
head-tail sharding (`parallel.balance.per_doc`), and of CAD after planning; bytes received per rank for CAD versus ring
and all-gather CP (closed form: both bring the other P - 1 ranks' K/V to every rank); and
the planning time.

    PYTHONPATH=. python3 scripts/bench_cad.py --ranks 8 32 64 --tokens-per-rank 32768 131072 524288

`--real N` instead times one attention step (forward + backward) on N real gloo CPU ranks for
ring, CAD and CAD with ping-pong on a skewed document mix and prints the step-time ratios.
"""
from __future__ import annotations

import argparse
import itertools
import random
import time

from kernels import MaskSpec
from parallel.balance import imbalance
from parallel.cad import MaskKind, plan
from parallel.perf.cost import balancer_rows, mask_keys, pairs_per_rank
from parallel.perf.workload import doclens_path, fill, load_doclens


def sample_batch(lens, total, rng, long, upsample):
    """Packed document lengths summing to `total`; documents >= long drawn `upsample`x as often;
    a document longer than what is left of the batch is cut to fit (as a data loader does)."""
    cum = list(itertools.accumulate(upsample if n >= long else 1 for n in lens))
    return fill(total, lambda: rng.choices(lens, cum_weights=cum)[0])


def per_doc_pairs(doc_lens, world, kind):
    """Pairs per rank under `parallel.balance`'s per_doc balancer (head-tail inside every document)."""
    mask = MaskSpec.from_doc_lens(doc_lens, causal=kind.causal, window=kind.window)
    total = sum(doc_lens)
    return pairs_per_rank(mask_keys(mask, total), balancer_rows("per_doc", total, world, mask))


def skewed_mix(seqlen):
    """Sixteen short documents (1/64 of the batch each), then one of the remaining 3/4."""
    short = [seqlen // 64] * 16
    return short + [seqlen - sum(short)]


def _real_rank(rank, world, port, seqlen, repeats, backend, results):
    import torch
    import torch.distributed as dist

    import parallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    mask = MaskSpec.from_doc_lens(skewed_mix(seqlen), causal=True)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(seqlen, h, 64, generator=g) for h in (8, 2, 2))
    for name, strategy, options in (("ring", "ring", {}), ("cad", "cad", {"backend": backend}),
                                    ("cad+pingpong", "cad", {"backend": backend, "pingpong": True})):
        cp = parallel.build(strategy, mask, seqlen, **options)
        lq, lk, lv = (cp.shard(t).clone().requires_grad_() for t in (q, k, v))
        times = []
        for _ in range(repeats + 1):
            dist.barrier()
            t0 = time.perf_counter()
            cp.attention(lq, lk, lv).sum().backward()
            dist.barrier()
            times.append(time.perf_counter() - t0)
        if rank == 0:
            extra = {k: round(v, 4) for k, v in cp.stats.extra.items() if isinstance(v, float)}
            results[name] = (min(times[1:]), cp.stats.imbalance("pairs"), max(cp.stats.bytes_recv), extra)
    dist.destroy_process_group()


def real(world, seqlen, repeats, backend):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    results = mp.get_context("spawn").Manager().dict()
    mp.spawn(_real_rank, args=(world, port, seqlen, repeats, backend, results), nprocs=world)
    print(f"{world} gloo CPU ranks, seqlen={seqlen}, docs={skewed_mix(seqlen)[:3]}...+{skewed_mix(seqlen)[-1]}, "
          f"Hq=8 Hkv=2 D=64 float32, backend={backend}; fastest of {repeats} fwd+bwd steps")
    print("| strategy | step s | pairs max/mean | max bytes received | ring step / this step |\n|---|---|---|---|---|")
    ring = results["ring"][0]
    for name, (sec, imb, recv, _) in results.items():
        print(f"| {name} | {sec:.3f} | {imb:.3f} | {recv} | {ring / sec:.2f} |")
    for name, (*_, extra) in results.items():
        if name != "ring":
            print(f"{name} timing breakdown (rank 0, last step): "
                  + ", ".join(f"{k}={v}" for k, v in extra.items() if k.endswith("_s")))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--doclens", help="document-length JSON list (default: $LONGCTX_DOCLENS, else the packaged "
                                      "ProLong mix)")
    ap.add_argument("--ranks", type=int, nargs="+", default=[8, 32, 64])
    ap.add_argument("--tokens-per-rank", type=int, nargs="+", default=[32768, 131072, 524288])
    ap.add_argument("--long", type=int, default=32768, help="documents at least this long are upsampled")
    ap.add_argument("--upsample", type=float, default=20.0)
    ap.add_argument("--window", type=int, default=None, help="also sliding window of this size")
    ap.add_argument("--epsilon", type=float, default=0.02)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--q-bytes", type=int, default=32 * 128 * 2, help="bytes of one token's Q (Hq=32, D=128, bf16)")
    ap.add_argument("--kv-bytes", type=int, default=2 * 8 * 128 * 2, help="bytes of one token's K+V (Hkv=8)")
    ap.add_argument("--real", type=int, default=0, help="time a step on this many real CPU ranks instead")
    ap.add_argument("--seqlen", type=int, default=8192, help="--real: global tokens")
    ap.add_argument("--backend", default="cpu", help="--real: CAD's kernel backend")
    args = ap.parse_args(argv)
    if args.real:
        return real(args.real, args.seqlen, 3, args.backend)
    try:
        lens, source = load_doclens(args.doclens), doclens_path(args.doclens, "--doclens")[0].name
    except ValueError as e:
        ap.error(str(e))
    kind = MaskKind(causal=True, window=args.window)
    gib = 2 ** 30
    print(f"mask: document+{'window=%d' % args.window if args.window else 'causal'}; docs from {source}, "
          f">= {args.long} tokens upsampled x{args.upsample}; epsilon={args.epsilon}")
    print("| ranks | tokens/rank | docs | long-doc token share | packing max/mean | per-doc head-tail max/mean "
          "| CAD max/mean (pairs) | CAD max/mean (cost) | packing GiB in/rank max | CAD GiB in/rank max (mean) "
          "| ring GiB/rank "
          "| all-gather GiB/rank | planning s |")
    print("|---" * 13 + "|")
    for world in args.ranks:
        for tpr in args.tokens_per_rank:
            rng = random.Random(args.seed * 1000003 + world * 7919 + tpr)
            docs = sample_batch(lens, world * tpr, rng, args.long, args.upsample)
            p = plan(docs, tpr, kind, epsilon=args.epsilon, q_bytes_per_token=args.q_bytes,
                     kv_bytes_per_token=args.kv_bytes)
            packed = plan(docs, tpr, kind, epsilon=args.epsilon, q_bytes_per_token=args.q_bytes,
                          kv_bytes_per_token=args.kv_bytes, max_moves=0)  # K/V of documents spanning ranks
            ring = (world - 1) * tpr * args.kv_bytes
            share = sum(n for n in docs if n >= args.long) / (world * tpr)
            print(f"| {world} | {tpr} | {len(docs)} | {share:.2f} | {imbalance(p.pairs_before):.3f} "
                  f"| {imbalance(per_doc_pairs(docs, world, kind)):.3f} | {imbalance(p.pairs_after):.3f} "
                  f"| {imbalance(p.cost_after):.3f} | {max(packed.bytes_in) / gib:.3f} | {max(p.bytes_in) / gib:.3f} ({sum(p.bytes_in) / world / gib:.3f}) "
                  f"| {ring / gib:.3f} | {ring / gib:.3f} | {p.planning_s:.3f} |", flush=True)


if __name__ == "__main__":
    main()
