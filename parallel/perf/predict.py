"""Analytical step time of one CP attention call (fwd + bwd), for clusters far beyond this one.

Time = compute from FLOPs at a sustained rate + messages over links (latency + bytes /
bandwidth), combined the way each strategy schedules them (its `cost_time` hook, written
with the pieces below):

  ring       P steps; step s computes one key block while the next block travels, so a step
             costs max(compute, overlap-hidden hop) + the fp32 merge of the partial output
             (memory-bound: `merge_passes` reads/writes of [L, Hq, D] fp32 at `mem_bw`).
  allgather  gather K/V (fwd) / reduce-scatter dK/dV (bwd), not overlapped, then compute.
  ulysses    all-to-all Q/K/V and the output around a head-sharded full-sequence kernel.
  usp        ulysses over u ranks inside ring over P/u.
  cad        every server computes (total pairs / P) * (1 + epsilon); ping-pong hides the
             shipping of Q/K/V/out behind compute.

The slowest rank sets the time (synchronous collectives), so the max of pairs_per_rank is
what counts.  `Hardware` (parallel.perf.hardware) holds the sustained rates.
"""
from __future__ import annotations

from .. import STRATEGIES
from ..balance import default_balancer, imbalance
from .cost import (Layout, attention_flops, balancer_rows, bytes_sent, has_hook, kernel_rows, mask_keys,
                   memory_per_rank, pairs_per_rank, strategy_class)
from .hardware import Hardware


def link(hw: Hardware, group: int, stride: int = 1) -> tuple[float, float]:
    """(bandwidth, latency) of the slowest hop of a group of `group` ranks `stride` apart."""
    if group * stride <= hw.devices_per_node:
        return hw.intra_bw, hw.intra_lat
    return hw.inter_bw, hw.inter_lat


def compute_s(pairs: float, hq: float, lay: Layout, hw: Hardware, backward: bool) -> float:
    """Kernel seconds of `pairs` attention pairs over `hq` query heads at the profile's rate."""
    return attention_flops(pairs, hq, lay.head_dim, backward=backward) / (hw.bwd_flops if backward else hw.fwd_flops)


def ring_time(c_fwd, c_bwd, lay: Layout, p: int, hw: Hardware, stride: int,
              sent: dict[str, list[int]] | None = None) -> tuple[float, float]:
    """(fwd, bwd) seconds of a ring of p ranks whose slowest rank computes c_fwd / c_bwd;
    `sent`: the bytes each rank forwards (`bytes_sent`), else every hop carries whole blocks."""
    bw, lat = link(hw, p, stride)
    sent = sent or bytes_sent("ring", lay, p)
    loc = lay.seqlen // p
    out_fp32 = loc * lay.hq * lay.head_dim * 4 / hw.mem_bw
    times = []
    for c, total, merge in ((c_fwd, sent["fwd"], hw.merge_passes * out_fp32),
                            (c_bwd, sent["bwd"], hw.accum_passes * out_fp32)):
        hop = lat + max(total) / max(p - 1, 1) / bw if p > 1 else 0.0
        step = c / p + hw.call_overhead
        overlapped = step + hop - hw.overlap * min(step, hop) + merge
        times.append(step + (p - 1) * overlapped if p > 1 else step)
    return times[0], times[1]


def bytes_for_time(strategy: str, mask, lay: Layout, world: int, rows, options: dict) -> dict[str, list[int]] | None:
    """The bytes a ring forwards under S2 heads, where each hop carries only the entries some
    later query needs (`Ring.cost_bytes`); None elsewhere: windows and documents shorten
    the ring instead, which `ring_time` does not model, so it keeps whole blocks."""
    if strategy != "ring" or mask.heads is None or world == 1:
        return None
    return bytes_sent(strategy, lay, world, mask=mask, rows=rows, **options)


def collective(nbytes: float, p: int, hw: Hardware, stride: int = 1, kind: str = "gather") -> float:
    """Ring-algorithm collective over p ranks: p-1 latencies + bytes over the slowest link
    (or the profile's measured bandwidth of that kind of collective: "gather" for
    all-gather / reduce-scatter, "a2a" for all-to-all)."""
    if p == 1:
        return 0.0
    bw, lat = link(hw, p, stride)
    measured = hw.a2a_bw if kind == "a2a" else hw.coll_bw
    return (p - 1) * lat + nbytes / (measured or bw)


def _tile_costs(hw: Hardware, diag: float, split: float, heads: float) -> tuple[float, float]:
    """Cost (fwd, bwd) of how the kernel cuts one rank's work: `diag` rows of causal tiles
    (block-wise waste along the diagonal) and `split` rows merged from several tiles."""
    return (heads * (diag * hw.diag_fwd + split * hw.split_fwd),
            heads * (diag * hw.diag_bwd + split * hw.split_bwd))


def predict(strategy: str, pairs: list[int], lay: Layout, hw: Hardware, *,
            kernel_rows: dict[str, list[int]] | None = None, sent: dict[str, list[int]] | None = None,
            **options) -> dict[str, float]:
    """Predicted seconds of one attention call on len(pairs) ranks: fwd_s, bwd_s, total_s
    (the strategy's `cost_time`; options such as `ulysses_degree` or cad's `epsilon` go to it).

    `kernel_rows` (per rank, from `cost.kernel_rows`: "diagonal" and "split" rows,
    "masked" hidden pairs computed anyway) adds the profile's costs of how a tile-based kernel
    cuts the work (`diag_*`, `split_*`, and the hidden pairs at the kernel's rate; not used
    with the GPU presets, whose figures are sustained rates of whole causal runs).  `sent`
    (per rank, from `bytes_for_time`) replaces the strategy's dense-block bytes where it
    prices them (ring under S2 heads)."""
    p = len(pairs)
    impl = strategy_class("none" if p == 1 else strategy)
    heads = lay.hq / impl.head_split(p, options)
    if kernel_rows:
        worst_rank = max(range(p), key=lambda r: pairs[r])
        tile_f, tile_b = _tile_costs(hw, kernel_rows["diagonal"][worst_rank], kernel_rows["split"][worst_rank], heads)
        hidden = kernel_rows.get("masked", [0] * p)[worst_rank]  # computed in full, at the kernel's rate
        tile_f += compute_s(hidden, heads, lay, hw, False)
        tile_b += compute_s(hidden, heads, lay, hw, True)
    else:
        tile_f = tile_b = 0.0
    fwd, bwd = impl.cost_time(pairs, lay, hw, sent=sent, **options)
    fwd, bwd = fwd + tile_f, bwd + tile_b
    return {"fwd_s": fwd, "bwd_s": bwd, "total_s": fwd + bwd}


def compare_strategies(mask, lay: Layout, world: int, hw: Hardware) -> list[dict]:
    """Every registered strategy with a time model, in each of its `auto_candidates`
    settings, on `world` ranks: attention pairs max/mean, bytes and memory per rank (where
    the strategy has those models), predicted seconds and efficiency against one device
    (the `none` strategy on the whole sequence)."""
    def cut(name, rows, options):  # profiles of a tile-based kernel (cpu) price its cuts
        return kernel_rows(name, mask, lay.seqlen, rows, heads=(lay.hq, lay.hkv), **options) \
            if hw.tiled and has_hook(name, "cost_kernel_cut") else None

    keys = mask_keys(mask, lay.seqlen, lay.hkv)
    whole = balancer_rows("contiguous", lay.seqlen, 1, mask)
    one = predict("none", [keys.sum().item()], lay, hw, kernel_rows=cut("none", whole, {}))["total_s"]
    out = []
    for name in STRATEGIES:
        if name == "none" or not has_hook(name, "cost_time"):
            continue
        for balancer, options in strategy_class(name).auto_candidates(world, mask, lay):
            balancer = balancer or default_balancer(mask)
            rows = balancer_rows(balancer, lay.seqlen, world, mask)
            pairs = pairs_per_rank(keys, rows)
            t = predict(name, pairs, lay, hw, kernel_rows=cut(name, rows, options),
                        sent=bytes_for_time(name, mask, lay, world, rows, options), **options)["total_s"]
            sent = bytes_sent(name, lay, world, mask=mask, rows=rows, **options) \
                if has_hook(name, "cost_bytes") else None
            mem = memory_per_rank(name, lay, world, **options) if has_hook(name, "cost_memory") else None
            out.append(dict(strategy=name, balancer=balancer, options=options, imbalance=imbalance(pairs),
                            bytes=max(sent["fwd"]) + max(sent["bwd"]) if sent else None,
                            memory=mem["peak"] if mem else None, seconds=t, efficiency=one / (world * t)))
    return out
