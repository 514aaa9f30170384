"""Whole training steps on a cluster: where document-length imbalance costs time.

`seq_times` / `dp_step`: a DP replica per packed sequence (DistCA's comparison);
`pp_dp_step` / `straggle`: DP x PP, the pipeline's makespan over unequal microbatches, the
slowest replica per step; `throughput`: tokens/s over sampled batches.  Batches are packed
with `workload.fill`, the packer the benchmark and `scripts/bench_cad.py` use too.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..balance import imbalance
from ..cad.tasks import doc_pairs
from .cost import attention_flops
from .hardware import Hardware
from .predict import collective
from .workload import fill

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
            seqs = repack(seqs, lambda n: linear / tokens * n + attn_cost * doc_pairs([n]))
        times = []
        for s in seqs:
            n = sum(s)
            kv = 2 * n / cp * model.hkv * model.head_dim * 2 / tp   # bf16 K and V of the local rows
            gather = collective((cp - 1) * kv, cp, hw, stride=tp)
            comm = model.layers * (2 * gather + collective((cp - 1) * kv * 2, cp, hw, stride=tp)) * (1 - comm_hidden)
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
    return {"step_s": max(times), "mean_s": sum(times) / len(times), "straggle": imbalance(times)}


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
    return {"step_s": max(rep), "ideal_s": ideal, "dp_straggle": imbalance(rep),
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
