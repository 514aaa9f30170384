"""Hardware probes one benchmark launch runs on every rank (under torch.distributed), which
`parallel.perf.calibrate.fit_cpu_profile` turns into a `Hardware`: point-to-point link
bandwidth and latency, the collectives' bandwidth, the attention rate a rank keeps while
all ranks compute, and the cost of a kernel call cut into tiles."""
from __future__ import annotations

import time

import torch
import torch.distributed as dist

import kernels
from kernels import MaskSpec

from ..cad.tasks import doc_pairs
from .cost import attention_flops


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def max_over_ranks(x: float) -> float:
    t = torch.tensor([x], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def link_probe(device, nbytes: int = 1 << 24, reps: int = 3) -> dict:
    """Rank 0 <-> 1 point-to-point: bandwidth of `nbytes` messages and latency of 8-byte ones
    (what the simulator's calibration uses for the link; measured once per launch)."""
    rank = dist.get_rank()
    if dist.get_world_size() < 2:
        return {}
    times = {}
    for size in (8, nbytes):
        buf = torch.zeros(size // 4, device=device)
        dist.barrier()
        t0 = time.perf_counter()
        for _ in range(reps):
            if rank == 0:
                dist.send(buf, 1)
                dist.recv(buf, 1)
            elif rank == 1:
                dist.recv(buf, 0)
                dist.send(buf, 0)
        times[size] = (time.perf_counter() - t0) / (2 * reps)
    lat = times[8]
    return {"link_lat": lat, "link_bw": nbytes / max(times[nbytes] - lat, 1e-9), **collective_probe(device, nbytes)}


def collective_probe(device, nbytes: int = 1 << 24, reps: int = 3) -> dict:
    """Effective bandwidth of the collectives the strategies use (all-gather, reduce-scatter,
    all-to-all; `nbytes` to every peer): bytes each rank sends over the median time.  On
    gloo they run several times slower than one p2p message of the same size, which the
    simulator's `coll_bw` and `a2a_bw` carry."""
    world = dist.get_world_size()
    chunk = torch.zeros(nbytes // 4, device=device)
    full = torch.zeros(world * chunk.numel(), device=device)
    out = torch.empty_like(full)
    ops = {"all_gather": lambda: dist.all_gather_into_tensor(out, chunk),
           "reduce_scatter": lambda: dist.reduce_scatter_tensor(chunk, full),
           "all_to_all": lambda: dist.all_to_all_single(out, full)}
    res = {}
    for name, op in ops.items():
        times = []
        for _ in range(reps):
            dist.barrier()
            t0 = time.perf_counter()
            op()
            sync(device)
            times.append(max_over_ranks(time.perf_counter() - t0))
        res[f"{name}_bw"] = (world - 1) * nbytes / sorted(times)[reps // 2]
    return res


def rate_probe(device, seqlen: int = 2048, heads: int = 8, head_dim: int = 64) -> dict:
    """Attention FLOP/s each rank sustains while every rank of the launch computes at once
    (fixed causal shape, slowest rank): the simulator scales the 1-rank kernel rate by the
    ratio of this probe between launches, which captures how much of the machine a rank gets."""
    g = torch.Generator().manual_seed(1)
    q, k, v, dout = (torch.randn(seqlen, heads, head_dim, generator=g).to(device) for _ in range(4))
    q.requires_grad_(True)
    flops = attention_flops(doc_pairs([seqlen]), heads, head_dim)
    best_f = best_b = float("inf")
    for _ in range(3):
        dist.barrier()
        t0 = time.perf_counter()
        out, _ = kernels.attention(q, k, v, MaskSpec(causal=True))
        sync(device)
        t1 = time.perf_counter()
        out.backward(dout)
        sync(device)
        t2 = time.perf_counter()
        best_f, best_b = min(best_f, max_over_ranks(t1 - t0)), min(best_b, max_over_ranks(t2 - t1))
    return {"probe_fwd_flops": flops / best_f, "probe_bwd_flops": 2.5 * flops / best_b}


def tile_probe(device, rows: int = 2048, heads: int = 8, head_dim: int = 64, pieces: int = 16) -> dict:
    """Cost per row and head of a kernel call cut into tiles (fwd: merging the tiles'
    partial outputs; bwd: accumulating their gradients): the same bidirectional attention
    run as one tile and as `pieces` tiles (keys in `pieces` shuffled runs, so
    `kernels.cpu.plan` cuts them apart); the pairs are identical, so the difference over
    the merged rows is that cost.  Only the cpu backend works in tiles; elsewhere this
    returns nothing."""
    if device.type != "cpu":
        return {}
    g = torch.Generator().manual_seed(2)
    q, k, v, dout = (torch.randn(rows, heads, head_dim, generator=g) for _ in range(4))
    mask, pos = MaskSpec(causal=False), torch.arange(rows)
    shuffled = pos.view(pieces, -1).flip(0).reshape(-1)   # runs of rows/pieces, out of order
    times = {}
    for name, k_pos in (("one", pos), ("many", shuffled)):
        best_f = best_b = float("inf")
        for _ in range(3):
            dist.barrier()
            t0 = time.perf_counter()
            out, lse = kernels.forward(q, k, v, mask, q_pos=pos, k_pos=k_pos, backend="cpu")
            t1 = time.perf_counter()
            kernels.backward(dout, q, k, v, out, lse, mask, q_pos=pos, k_pos=k_pos, backend="cpu")
            t2 = time.perf_counter()
            best_f, best_b = min(best_f, max_over_ranks(t1 - t0)), min(best_b, max_over_ranks(t2 - t1))
        times[name] = (best_f, best_b)
    merged = pieces * rows * heads  # rows x heads the cut call merges (fwd) / accumulates (bwd)
    return {"split_fwd_s": max(times["many"][0] - times["one"][0], 0.0) / merged,
            "split_bwd_s": max(times["many"][1] - times["one"][1], 0.0) / merged}


def run_probes(device) -> dict:
    """Every probe's figures, as one launch records them with each cell."""
    return dict(link_probe(device), **rate_probe(device), **tile_probe(device))
