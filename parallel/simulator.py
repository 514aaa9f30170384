"""Analytical step time of one CP attention call (fwd + bwd), for clusters far beyond this one.

Time = compute from FLOPs at a sustained rate + messages over links (latency + bytes /
bandwidth), combined per strategy the way it schedules them:

  ring       P steps; step s computes one key block while the next block travels, so a step
             costs max(compute, overlap-hidden hop) + the fp32 merge of the partial output
             (memory-bound: `merge_passes` reads/writes of [L, Hq, D] fp32 at `mem_bw`).
  allgather  gather K/V (fwd) / reduce-scatter dK/dV (bwd), not overlapped, then compute.
  ulysses    all-to-all Q/K/V and the output around a head-sharded full-sequence kernel.
  usp        ulysses over u ranks inside ring over P/u.
  cad        every server computes (total pairs / P) * (1 + epsilon); ping-pong hides the
             shipping of Q/K/V/out behind compute.

The slowest rank sets the time (synchronous collectives), so the max of pairs_per_rank is
what counts.  `Hardware` holds the sustained rates; presets say where each figure is from.

Whole training steps: `seq_times` / `dp_step` (a DP replica per packed sequence; DistCA's
comparison), `pp_dp_step` / `straggle` (DP x PP: the pipeline's makespan over unequal
microbatches, the slowest replica per step).  Memory per rank is
`costmodel.memory_per_rank`.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace

from .costmodel import Layout, attention_flops, bytes_sent
from .perf.workload import fill


@dataclass(frozen=True)
class Hardware:
    """Sustained rates of one device and its links (SI units: FLOP/s, bytes/s, s)."""

    name: str
    fwd_flops: float            # sustained attention-kernel FLOP/s, forward
    bwd_flops: float            # sustained attention-kernel FLOP/s, backward
    mem_bw: float               # device memory bandwidth (merges, accumulations)
    intra_bw: float             # per direction, per device, inside a node
    intra_lat: float
    inter_bw: float             # per device, across nodes
    inter_lat: float
    devices_per_node: int = 8
    overlap: float = 1.0        # fraction of ring hop time hidden behind the block compute
    merge_passes: float = 6.0   # fp32 passes over the output per forward ring-step merge
    accum_passes: float = 2.0   # fp32 passes over dQ per backward ring-step accumulation
    call_overhead: float = 0.0  # fixed seconds per kernel call (launch / python)
    diag_fwd: float = 0.0       # seconds per row of a causal (diagonal) kernel tile per query head:
    diag_bwd: float = 0.0       # the kernel computes whole key blocks across the diagonal, so every
                                # document pays ~half a block of wasted keys per row (cpu backend)
    split_fwd: float = 0.0      # seconds per row per query head of a kernel call cut into several
    split_bwd: float = 0.0      # tiles (merging partials fwd, accumulating grads bwd; cpu backend)
    coll_bw: float = 0.0        # effective bytes/s per rank of all-gather / reduce-scatter and of
    a2a_bw: float = 0.0         # all-to-all, where they differ from p2p (gloo); 0 = the link's


# Figures: H100 SXM dense bf16 989 TFLOP/s and NVLink4 900 GB/s total = 450 GB/s per direction,
# HBM3 3.35 TB/s (NVIDIA H100 datasheet); H800 is the H100 die with NVLink cut to 400 GB/s total
# (200 per direction; NVIDIA H800 product brief); H200: same compute, HBM3e 4.8 TB/s (H200
# datasheet); InfiniBand NDR 400 Gb/s = 50 GB/s per GPU (one ConnectX-7 per GPU, DGX H100).
# Sustained attention rates: flash-attn 2 on H800, llama3-8B heads, 8K causal, measured by
# ring-flash-attention's README (591.5 fwd iter/s -> 325 TFLOP/s; 154.7 fwd+bwd iter/s -> 298
# TFLOP/s overall, i.e. ~289 TFLOP/s backward).  Latencies: ~10 us NCCL p2p intra-node,
# ~20 us across IB (NCCL tests, small messages).
H800 = Hardware("h800", 325e12, 289e12, 3.35e12, 200e9, 10e-6, 50e9, 20e-6)
H100 = replace(H800, name="h100", intra_bw=450e9)
H200 = replace(H100, name="h200", mem_bw=4.8e12)
PRESETS = {h.name: h for h in (H100, H200, H800)}


def save_hardware(hw: Hardware, path: str) -> None:
    """Write a profile as JSON (what `scripts.simulate_cp calibrate --save` produces)."""
    with open(path, "w") as f:
        json.dump(asdict(hw), f, indent=2)
        f.write("\n")


def load_hardware(path: str) -> Hardware:
    """Read a JSON profile; unknown or missing fields name themselves in the error."""
    with open(path) as f:
        data = json.load(f)
    known = {f.name for f in fields(Hardware)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"hardware profile {path}: unknown field(s) {', '.join(unknown)}; "
                         f"a profile has {', '.join(sorted(known))}")
    try:
        return Hardware(**data)
    except TypeError as e:
        raise ValueError(f"hardware profile {path}: {e}; re-create it with scripts.simulate_cp calibrate --save") from e


def _link(hw: Hardware, group: int, stride: int = 1) -> tuple[float, float]:
    """(bandwidth, latency) of the slowest hop of a group of `group` ranks `stride` apart."""
    if group * stride <= hw.devices_per_node:
        return hw.intra_bw, hw.intra_lat
    return hw.inter_bw, hw.inter_lat


def _tile_costs(hw: Hardware, diag: float, split: float, heads: float) -> tuple[float, float]:
    """Cost (fwd, bwd) of how the kernel cuts one rank's work: `diag` rows of causal tiles
    (block-wise waste along the diagonal) and `split` rows merged from several tiles."""
    return (heads * (diag * hw.diag_fwd + split * hw.split_fwd),
            heads * (diag * hw.diag_bwd + split * hw.split_bwd))


def _ring(c_fwd, c_bwd, lay: Layout, p: int, hw: Hardware, stride: int) -> tuple[float, float]:
    bw, lat = _link(hw, p, stride)
    sent = bytes_sent("ring", lay, p)
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


def _collective(nbytes: float, p: int, hw: Hardware, stride: int = 1, kind: str = "gather") -> float:
    """Ring-algorithm collective over p ranks: p-1 latencies + bytes over the slowest link
    (or the profile's measured bandwidth of that kind of collective: "gather" for
    all-gather / reduce-scatter, "a2a" for all-to-all)."""
    if p == 1:
        return 0.0
    bw, lat = _link(hw, p, stride)
    measured = hw.a2a_bw if kind == "a2a" else hw.coll_bw
    return (p - 1) * lat + nbytes / (measured or bw)


def predict(strategy: str, pairs: list[int], lay: Layout, hw: Hardware, *,
            ulysses_degree: int | None = None, epsilon: float = 0.0,
            kernel_rows: dict[str, list[int]] | None = None) -> dict[str, float]:
    """Predicted seconds of one attention call on len(pairs) ranks: fwd_s, bwd_s, total_s.

    `kernel_rows` (per rank, from `costmodel.kernel_rows`: "diagonal" and "split" rows,
    "masked" hidden pairs computed anyway) adds the profile's costs of how a tile-based kernel
    cuts the work (`diag_*`, `split_*`, and the hidden pairs at the kernel's rate; not used
    with the GPU presets, whose figures are sustained rates of whole causal runs)."""
    p = len(pairs)
    worst, total = max(pairs), sum(pairs)
    flops = lambda n, b: attention_flops(n, lay.hq, lay.head_dim, backward=b)  # noqa: E731
    rate = lambda n, b: flops(n, b) / (hw.bwd_flops if b else hw.fwd_flops)  # noqa: E731
    heads = lay.hq / p if strategy == "ulysses" else lay.hq / (ulysses_degree or 1) if strategy == "usp" else lay.hq
    if kernel_rows:
        worst_rank = max(range(p), key=lambda r: pairs[r])
        tile_f, tile_b = _tile_costs(hw, kernel_rows["diagonal"][worst_rank], kernel_rows["split"][worst_rank], heads)
        hidden = kernel_rows.get("masked", [0] * p)[worst_rank]  # computed in full, at the kernel's rate
        tile_f += attention_flops(hidden, heads, lay.head_dim) / hw.fwd_flops
        tile_b += attention_flops(hidden, heads, lay.head_dim, backward=True) / hw.bwd_flops
    else:
        tile_f = tile_b = 0.0
    if strategy == "none" or p == 1:
        fwd, bwd = rate(total, False) + hw.call_overhead, rate(total, True) + hw.call_overhead
    elif strategy == "ring":
        fwd, bwd = _ring(rate(worst, False), rate(worst, True), lay, p, hw, 1)
    elif strategy == "allgather":
        sent = bytes_sent("allgather", lay, p)
        fwd = _collective(sent["fwd"][0], p, hw) + rate(worst, False) + hw.call_overhead
        bwd = _collective(sent["bwd"][0], p, hw) + rate(worst, True) + hw.call_overhead
    elif strategy == "ulysses":
        sent = bytes_sent("ulysses", lay, p)
        fwd = _collective(sent["fwd"][0], p, hw, kind="a2a") + rate(total / p, False) + hw.call_overhead
        bwd = _collective(sent["bwd"][0], p, hw, kind="a2a") + rate(total / p, True) + hw.call_overhead
    elif strategy == "usp":
        u = ulysses_degree or 1
        r = p // u
        uly = bytes_sent("ulysses", Layout(lay.seqlen // r, lay.hq, lay.hkv, lay.head_dim, lay.elem_bytes), u)
        # ring over r groups of u: a ring rank's work is the max over its u members' pairs
        ring_pairs = [sum(pairs[g * u:(g + 1) * u]) / u for g in range(r)]
        ring_lay = Layout(lay.seqlen, max(lay.hq // u, 1), max(lay.hkv // u, 1), lay.head_dim, lay.elem_bytes)
        c_f = attention_flops(max(ring_pairs), ring_lay.hq, lay.head_dim) / hw.fwd_flops
        c_b = attention_flops(max(ring_pairs), ring_lay.hq, lay.head_dim, backward=True) / hw.bwd_flops
        rf, rb = _ring(c_f, c_b, ring_lay, r, hw, u)
        fwd = _collective(uly["fwd"][0], u, hw, kind="a2a") + rf
        bwd = _collective(uly["bwd"][0], u, hw, kind="a2a") + rb
    elif strategy == "cad":
        loc = lay.seqlen // p
        ship = (p - 1) / p * loc * (2 * lay.hq + 2 * lay.hkv) * lay.head_dim * lay.elem_bytes
        bal = total / p * (1 + epsilon)
        fwd = max(rate(bal, False), _collective(ship, p, hw)) + hw.call_overhead
        bwd = max(rate(bal, True), _collective(ship, p, hw)) + hw.call_overhead
    else:
        raise ValueError(f"strategy={strategy!r} has no time model; choose none, ring, allgather, ulysses, usp or cad")
    fwd, bwd = fwd + tile_f, bwd + tile_b
    return {"fwd_s": fwd, "bwd_s": bwd, "total_s": fwd + bwd}


@dataclass(frozen=True)
class ModelShape:
    """What the non-attention part of a step costs: 6 * params FLOPs per token (fwd+bwd)."""

    params: float
    layers: int
    hq: int
    hkv: int
    head_dim: int
    linear_mfu: float = 0.5     # sustained fraction of peak for the dense GEMMs
    peak_flops: float = 989e12  # H100/H200 dense bf16 (datasheet)


LLAMA3_8B = ModelShape(params=8.0e9, layers=32, hq=32, hkv=8, head_dim=128)


def pack(doc_lens, tokens: int, count: int, rng) -> list[list[int]]:
    """`count` sequences of exactly `tokens` tokens, documents drawn from `doc_lens` in random
    order and cut at the sequence end (how packed pretraining batches are built)."""
    return [fill(tokens, lambda: int(doc_lens[rng.integers(len(doc_lens))])) for _ in range(count)]


def doc_pairs(lens) -> float:
    """Causal attention pairs of one packed sequence: sum of L(L+1)/2 over its documents."""
    return float(sum(n * (n + 1) // 2 for n in lens))


def repack(seqs: list[list[int]], cost) -> list[list[int]]:
    """WLB-LLM-style variable-length packing: the same documents re-dealt to the replicas,
    longest-cost first to the currently cheapest replica, so per-replica cost (linear +
    attention) is as even as whole documents allow (token counts may then differ)."""
    bins = [[] for _ in seqs]
    load = [0.0] * len(seqs)
    for n in sorted((n for s in seqs for n in s), key=cost, reverse=True):
        i = load.index(min(load))
        bins[i].append(n)
        load[i] += cost(n)
    return bins


def seq_times(seqs: list[list[int]], model: ModelShape, hw: Hardware, *, tp: int, cp: int, mode: str,
              epsilon: float = 0.05, comm_hidden: float = 0.0) -> list[float]:
    """Seconds of one training step (fwd + bwd, every layer) of each DP replica's packed sequence
    (`seqs[r]`: its document lengths) on a TP x CP group, under `mode`:

    per_doc_cp (and wlb, the same after `repack` evens the replicas' cost, WLB-LLM's
        "ideal" baseline of DistCA): every document is split head-tail over the CP group, so
        attention is balanced inside a replica, but K/V are all-gathered across the group in
        every layer (fwd, and again with a reduce-scatter of dK/dV in bwd; `comm_hidden` of it
        overlaps compute); replicas with more attention take longer.
    cad: core attention of all replicas is pooled and re-split over every GPU (within
        epsilon); its Q/K/V/output shipping hides behind compute (ping-pong), so every
        replica takes the linear time plus the mean attention work.
    """
    tokens = sum(seqs[0])
    gpus = tp * cp
    linear = 6 * model.params * tokens / gpus / (model.peak_flops * model.linear_mfu)
    attn_cost = model.layers * attention_flops(1, model.hq, model.head_dim) * 3.5 / gpus \
        / ((hw.fwd_flops + 2.5 * hw.bwd_flops) / 3.5)     # seconds per causal pair
    attn = [attn_cost * doc_pairs(s) for s in seqs]
    if mode in ("per_doc_cp", "wlb"):
        if mode == "wlb":
            seqs = repack(seqs, lambda n: linear / tokens * n + attn_cost * n * (n + 1) / 2)
        times = []
        for s in seqs:
            n = sum(s)
            kv = 2 * n / cp * model.hkv * model.head_dim * 2 / tp   # bf16 K and V of the local rows
            gather = _collective((cp - 1) * kv, cp, hw, stride=tp)
            comm = model.layers * (2 * gather + _collective((cp - 1) * kv * 2, cp, hw, stride=tp)) * (1 - comm_hidden)
            times.append(linear / tokens * n + attn_cost * doc_pairs(s) + comm)
        return times
    if mode == "cad":
        return [linear + sum(attn) / len(attn) * (1 + epsilon)] * len(attn)
    raise ValueError(f"mode={mode!r} is unknown; choose per_doc_cp, wlb or cad")


def dp_step(seqs: list[list[int]], model: ModelShape, hw: Hardware, *, tp: int, cp: int, mode: str,
            epsilon: float = 0.05, comm_hidden: float = 0.0) -> dict:
    """Step time of DP replicas (one packed sequence each, CP degree `cp`, TP degree `tp`):
    the synchronous gradient all-reduce waits for the slowest replica (`seq_times`)."""
    times = seq_times(seqs, model, hw, tp=tp, cp=cp, mode=mode, epsilon=epsilon, comm_hidden=comm_hidden)
    return {"step_s": max(times), "mean_s": sum(times) / len(times), "straggle": max(times) / (sum(times) / len(times))}


def pipeline_makespan(times: list[float], stages: int) -> float:
    """Seconds for microbatches taking `times[m]` on each of `stages` equal pipeline stages,
    in order (each stage starts microbatch m once it has finished m - 1 and the previous stage
    has finished m): sum(times) + (stages - 1) * max(times).  Every path through the
    stage x microbatch grid crosses each microbatch once and spends its stages - 1 extra
    steps on one of them, so the longest microbatch -- the one holding a long document -- is
    paid stages - 1 more times.  Equal times give the usual (M + S - 1) * t bubble."""
    if stages < 1 or not times:
        raise ValueError(f"pipeline needs stages >= 1 (got {stages}) and at least one microbatch")
    return sum(times) + (stages - 1) * max(times)


def pp_dp_step(batches: list[list[list[int]]], model: ModelShape, hw: Hardware, *, tp: int, cp: int, pp: int,
               mode: str, epsilon: float = 0.05, comm_hidden: float = 0.0) -> dict:
    """Step time with DP x PP x CP x TP: `batches[r][m]` are the document lengths of microbatch
    m on DP replica r.  Layers are split evenly over the `pp` stages, so a microbatch spends
    1/pp of its `seq_times` on each stage; a replica's time is the pipeline's makespan over its
    microbatches (`pipeline_makespan`, fwd + bwd taken together), and the step waits for the
    slowest replica.  Against `ideal_s` (every microbatch at the mean cost) it splits the
    loss to document-length imbalance into the DP straggle (slowest / mean replica) and the
    PP straggle (mean replica / its pipeline with equal microbatches)."""
    reps, mbs = len(batches), len(batches[0])
    if any(len(b) != mbs for b in batches):
        raise ValueError("every DP replica needs the same number of microbatches")
    per_mb = [seq_times([batches[r][m] for r in range(reps)], model, hw, tp=tp, cp=cp, mode=mode,
                        epsilon=epsilon, comm_hidden=comm_hidden) for m in range(mbs)]
    stage = [[per_mb[m][r] / pp for m in range(mbs)] for r in range(reps)]
    rep = [pipeline_makespan(t, pp) for t in stage]
    even = [pipeline_makespan([sum(t) / mbs] * mbs, pp) for t in stage]
    mean_t = sum(map(sum, stage)) / (reps * mbs)
    ideal = pipeline_makespan([mean_t] * mbs, pp)
    return {"step_s": max(rep), "ideal_s": ideal, "dp_straggle": max(rep) / (sum(rep) / reps),
            "pp_straggle": sum(r / e for r, e in zip(rep, even)) / reps, "bubble": ideal / (mbs * mean_t)}


def throughput(doc_lens, model: ModelShape, hw: Hardware, *, gpus: int, tokens: int, tp: int, cp: int, mode: str,
               steps: int = 20, seed: int = 0, comm_hidden: float = 0.0) -> float:
    """Mean tokens/s over `steps` sampled global batches (one packed sequence per DP replica)."""
    import numpy as np

    dp = gpus // (tp * cp)
    if dp < 1:
        raise ValueError(f"gpus={gpus} cannot hold tp={tp} x cp={cp}")
    rng = np.random.default_rng(seed)
    total = sum(dp_step(pack(doc_lens, tokens, dp, rng), model, hw, tp=tp, cp=cp, mode=mode,
                        comm_hidden=comm_hidden)["step_s"]
                for _ in range(steps))
    return dp * tokens * steps / total


def straggle(doc_lens, model: ModelShape, hw: Hardware, *, gpus: int, tokens: int, tp: int, cp: int, pp: int,
             microbatches: int, mode: str, steps: int = 10, seed: int = 0, comm_hidden: float = 0.0) -> dict:
    """What document-length imbalance costs a DP x PP x CP x TP run: `pp_dp_step` over `steps`
    sampled global batches (each microbatch one packed sequence of `tokens` tokens), averaged;
    `loss` = step / ideal - 1, the time lost to unequal documents against equal microbatches."""
    import numpy as np

    group = tp * cp * pp
    if gpus % group:
        raise ValueError(f"gpus={gpus} is not a multiple of tp x cp x pp = {tp} x {cp} x {pp}; change one of them")
    if microbatches < 1:
        raise ValueError(f"microbatches={microbatches} must be >= 1")
    dp = gpus // group
    rng = np.random.default_rng(seed)
    runs = []
    for _ in range(steps):
        seqs = pack(doc_lens, tokens, dp * microbatches, rng)
        runs.append(pp_dp_step([seqs[r * microbatches:(r + 1) * microbatches] for r in range(dp)], model, hw,
                               tp=tp, cp=cp, pp=pp, mode=mode, comm_hidden=comm_hidden))
    out = {k: sum(r[k] for r in runs) / steps for k in runs[0]}
    out.update(dp=dp, tokens_per_s=dp * microbatches * tokens * steps / sum(r["step_s"] for r in runs),
               loss=out["step_s"] / out["ideal_s"] - 1)
    return out
