"""Exact work and traffic of one CP attention call, from the mask alone (no process group).

Two counts drive every prediction in `parallel.simulator` and `parallel.auto`:

* attention pairs per rank: the number of allowed (query, key) pairs whose query row a
  rank owns.  For the masks of `kernels.MaskSpec` a query at global position i sees
  `keys(i)` keys, a closed form (below), so a rank's pairs are a sum over its rows and the
  whole sequence costs O(seqlen) -- 1M tokens and 1024 ranks run on a laptop.
* bytes sent per rank by each strategy (forward and backward), closed forms in the layout
  (tokens per rank, heads, head_dim, element size) that `cp.stats` must reproduce exactly.

Invariant: sum over ranks of pairs_per_rank == MaskSpec.pairs(all, all) for every
balancer, because a balancer is a permutation of query rows.  Rows come from
`parallel.balance` (the balancers the strategies use), never from a copy here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from kernels import MaskSpec

from .balance import assign, key_intervals
from .ring import RingPlan

@dataclass(frozen=True)
class Layout:
    """Shape of one attention call: the global sequence and the heads."""

    seqlen: int
    hq: int
    hkv: int
    head_dim: int
    elem_bytes: int = 4

    def __post_init__(self):
        if self.hkv < 1 or self.hq % self.hkv:
            raise ValueError(f"hq={self.hq} must be a multiple of hkv={self.hkv} (GQA)")

    @property
    def acc_bytes(self) -> int:
        """Element size of float32 gradient accumulators (float64 stays float64)."""
        return 8 if self.elem_bytes == 8 else 4


def mask_keys(mask, seqlen: int) -> np.ndarray:
    """keys(i): number of keys query i may attend, int64 [seqlen], from the mask's key
    interval [lo, hi] of every query (document start / window start .. query / document end)."""
    lo, hi = key_intervals(mask, torch.arange(seqlen))
    return (hi.clamp_max(seqlen - 1) - lo + 1).clamp_min(0).numpy()


def keys_per_query(seqlen: int, *, causal: bool, doc_lens=None, window: int | None = None) -> np.ndarray:
    """mask_keys for a mask given by its parts (documents as lengths)."""
    mask = MaskSpec.from_doc_lens(doc_lens, causal=causal, window=window) if doc_lens is not None \
        else MaskSpec(causal=causal, window=window)
    return mask_keys(mask, seqlen)


def balancer_rows(balancer: str | None, seqlen: int, world: int, mask=None) -> list[np.ndarray]:
    """Global query rows of every rank under a balancer of `parallel.balance` (numpy)."""
    mask = MaskSpec(causal=True) if mask is None else mask
    return [r.numpy() for r in assign(balancer, seqlen, world, mask)]


def ring_reach(mask, seqlen: int, rows: list[np.ndarray]) -> list[int]:
    """reach[j]: the last ring offset t at which rank j's K/V block is still needed, i.e. the
    largest t such that rank (j + t) % P owns a query that sees a key of block j (-1: none).

    A run of consecutive keys [a, b] is seen exactly by the queries in [a, end(b)] (causal:
    end = document end / window end / sequence end of key b) or [doc_start(a), doc_end(b)]
    (bidirectional), so only the owners of that interval matter; they are found on the runs
    of the owner map, never token by token.
    """
    world = len(rows)
    owner = np.empty(seqlen, dtype=np.int64)
    for r, idx in enumerate(rows):
        owner[idx] = r
    run_start = np.flatnonzero(np.r_[True, owner[1:] != owner[:-1]])
    run_owner = owner[run_start]
    lo_all, hi_all = (t.numpy() for t in key_intervals(mask, torch.arange(seqlen)))
    doc_lo = lo_all if not mask.is_causal else None
    # causal: the last query that sees key k is where the window or the document closes
    last_seer = _last_seer(mask, seqlen) if mask.is_causal else np.minimum(hi_all, seqlen - 1)
    reach = []
    for j, idx in enumerate(rows):
        cut = np.flatnonzero(np.diff(idx) != 1)
        starts, ends = idx[np.r_[0, cut + 1]], idx[np.r_[cut, idx.size - 1]]
        offsets = []
        for a, b in zip(starts, ends):
            lo = a if mask.is_causal else doc_lo[a]
            hi = last_seer[b]
            first = np.searchsorted(run_start, lo, side="right") - 1
            last = np.searchsorted(run_start, hi, side="right") - 1
            offsets.append(((run_owner[first:last + 1] - j) % world).max())
        reach.append(int(max(offsets)) if offsets else -1)
    return reach


def _last_seer(mask, seqlen: int) -> np.ndarray:
    """Causal masks: the largest query position that sees key k (document end / window)."""
    pos = np.arange(seqlen)
    last = np.full(seqlen, seqlen - 1)
    if mask.has_docs:
        lens = np.asarray(mask.doc_lens)
        last = np.repeat(np.cumsum(lens) - 1, lens)
    if mask.window is not None:
        last = np.minimum(last, pos + mask.window - 1)
    return last


def pairs_per_rank(keys: np.ndarray, rows: list[np.ndarray]) -> list[int]:
    """Attention pairs each rank's query rows cover."""
    return [int(keys[r].sum()) for r in rows]


def imbalance(values) -> float:
    """max / mean (1.0 for all-zero work)."""
    vals = np.asarray(values, dtype=np.float64)
    mean = vals.mean() if vals.size else 0.0
    return float(vals.max() / mean) if mean > 0 else 1.0


def attention_flops(pairs: int, hq: int, head_dim: int, backward: bool = False) -> float:
    """4 * pairs * Hq * D forward (QK^T and PV), 2.5x that backward (DESIGN.md)."""
    fwd = 4.0 * pairs * hq * head_dim
    return 2.5 * fwd if backward else fwd


def bytes_sent(strategy: str, lay: Layout, world: int, *, reach: list[int] | None = None,
               ulysses_degree: int | None = None) -> dict[str, list[int]]:
    """Bytes each rank sends in one attention call: {"fwd": [per rank], "bwd": [per rank]}.

    P ranks, L = seqlen / P local tokens, block = K and V of L tokens (2 * L * Hkv * D * elem),
    acc = the same in float32 (gradient accumulators):
      ring:      rank r forwards its current block at `h_r` of the P steps (every step but the
                 last when every block is needed by every rank; fewer when the mask lets a
                 block stop early, see `ring_reach`):  fwd h_r * block;  bwd h_r * block (K/V
                 again) + (d_r + o_r) * acc, d_r = the hops after the first (a block's dK/dV
                 accumulator starts at its first remote rank), o_r = accumulators it returns
                 home.  Every block needed everywhere: fwd (P-1) block, bwd (P-1)(block + acc).
      allgather: fwd (P-1) * block (gather K/V);  bwd (P-1) * (block + acc) (re-gather K/V,
                 reduce-scatter dK/dV in float32).
      ulysses:   all-to-all keeps 1/P of every tensor at home; Q, K, V out and the output back
                 (bwd: dO out, dQ, dK, dV back): (P-1) * L * (2 Hq + 2 Hkv') * D * elem // P each
                 way, Hkv' = Hkv repeated to a multiple of P.
      usp:       ulysses over u ranks on L tokens + ring over P/u ranks on u*L tokens, H/u heads.
    """
    p = world
    loc = lay.seqlen // p
    block = 2 * loc * lay.hkv * lay.head_dim * lay.elem_bytes
    acc = 2 * loc * lay.hkv * lay.head_dim * lay.acc_bytes
    if strategy == "none" or p == 1:
        return {"fwd": [0] * p, "bwd": [0] * p}
    if strategy == "ring":
        plan = RingPlan(0, list(range(p)), [], [], [p - 1] * p if reach is None else list(reach))
        hops = [plan.hops(r) for r in range(p)]
        return {"fwd": [h["kv_out"] * block for h in hops],
                "bwd": [h["kv_out"] * block + (h["dkv_out"] + h["home_out"]) * acc for h in hops]}
    if strategy == "allgather":
        return {"fwd": [(p - 1) * block] * p, "bwd": [(p - 1) * (block + acc)] * p}
    if strategy == "ulysses":
        hkv = lay.hkv * (p // math.gcd(lay.hkv, p))
        one_way = (p - 1) * loc * (2 * lay.hq + 2 * hkv) * lay.head_dim * lay.elem_bytes // p
        return {"fwd": [one_way] * p, "bwd": [one_way] * p}
    if strategy == "usp":
        u = ulysses_degree or 1
        if p % u:
            raise ValueError(f"ulysses_degree={u} must divide the CP size {p}")
        uly = bytes_sent("ulysses", Layout(loc * u, lay.hq, lay.hkv, lay.head_dim, lay.elem_bytes), u)
        hkv = lay.hkv * (u // math.gcd(lay.hkv, u))
        ring = bytes_sent("ring", Layout(lay.seqlen, lay.hq // u, hkv // u, lay.head_dim, lay.elem_bytes), p // u)
        return {k: [uly[k][0] + ring[k][0]] * p for k in ("fwd", "bwd")}
    raise ValueError(f"strategy={strategy!r} has no bytes formula; choose ring, allgather, ulysses, usp or none")


def kernel_rows(strategy: str, mask, seqlen: int, rows: list[np.ndarray], *,
                ulysses_degree: int | None = None) -> dict[str, list[int]]:
    """How the cpu backend (`kernels.cpu.plan`) cuts each rank's work in one attention call,
    per rank: "diagonal", rows of causal tiles (each computes whole key blocks across its
    diagonal, about half a block of keys beyond its pairs per row: why short documents cost
    more per pair); "split", rows of kernel calls cut into several tiles, whose partials are
    merged (plus the ring's own merge of every step after the first); "masked", pairs the
    kernel computes but the mask hides, in tiles run with an explicit mask (window edges,
    scattered rows: the op computes the whole tile).  Calls: ring, the
    rank's rows against every rank's rows; allgather, its rows against the gathered keys in
    ascending order; ulysses, the whole sequence in ascending order (its share of the
    heads); usp, its group's rows against every group's rows."""
    from kernels.cpu import CAUSAL, MASKED, plan

    def cut(q, k) -> tuple[int, int, int]:
        tiles = plan(mask, q, k)
        diag = sum(t.q1 - t.q0 for t in tiles if t.kind == CAUSAL)
        hidden = sum((t.q1 - t.q0) * (t.k1 - t.k0) - int(mask.allowed(q[t.q0:t.q1], k[t.k0:t.k1]).sum())
                     for t in tiles if t.kind == MASKED)
        return diag, (sum(t.q1 - t.q0 for t in tiles) if len(tiles) > 1 else 0), hidden

    def calls(q, keys) -> tuple[int, int, int]:
        parts = [cut(q, k) for k in keys]
        steps = sum(1 for k in keys if plan(mask, q, k))
        return (sum(d for d, _, _ in parts), sum(s for _, s, _ in parts) + max(steps - 1, 0) * len(q),
                sum(h for _, _, h in parts))

    world = len(rows)
    idx = [torch.as_tensor(np.sort(r)) for r in rows]
    everything = torch.arange(seqlen)
    if strategy in ("none", "ulysses") or world == 1:
        per = [cut(everything, everything)] * world
    elif strategy == "allgather":
        per = [cut(q, everything) for q in idx]
    elif strategy == "ring":
        per = [calls(q, idx) for q in idx]
    elif strategy == "usp":
        u = ulysses_degree or 1
        groups = [torch.cat(idx[g * u:(g + 1) * u]).sort().values for g in range(world // u)]
        per = [calls(groups[r // u], groups) for r in range(world)]
    else:
        raise ValueError(f"strategy={strategy!r} has no kernel cut; choose ring, allgather, ulysses, usp or none")
    return {"diagonal": [d for d, _, _ in per], "split": [s for _, s, _ in per], "masked": [h for _, _, h in per]}


def memory_per_rank(strategy: str, lay: Layout, world: int, *, ulysses_degree: int | None = None,
                    kv_head_groups: int = 1) -> dict[str, int]:
    """Peak bytes one rank allocates in one attention call (fwd + bwd) beyond its inputs
    (local q, k, v and dout): what the strategy adds to the model's own activation memory.

    L = seqlen / P local rows; q = L Hq D elem; kv = 2 L Hkv D elem (K and V); the `a` forms
    are float32 (the strategies' accumulators); lse = Hq L float32.  Every strategy returns
    out + lse (kept for backward) and dq + dk + dv; the kernel's backward keeps a float32 dq
    accumulator of the rows it is called on (flash-attn 2 and torch's CPU flash op both do).
      none:      fwd out + lse;  bwd + grads + kernel dq_a.
      ring:      fwd float32 out/lse accumulators, the K/V block held and the one arriving,
                 one block's partial out;  bwd + K/V held and arriving, the dK/dV accumulator
                 arriving and the one being sent, the home accumulator, dq_a, kernel dq_a.
      allgather: fwd the gathered K/V of all P ranks and its position-sorted copy (per head
                 group of `kv_head_groups`);  bwd + both again, dK/dV of the gathered rows and
                 their float32 rank-order buffer, kernel dq_a.
      ulysses:   the full sequence for Hq/P heads (Hkv' = Hkv repeated to a multiple of P):
                 fwd Q/K/V and out kept for backward;  bwd + dO, dQ/dK/dV, kernel dq_a.
      usp:       ulysses over u ranks on L u rows, then ring over P / u with Hq / u heads.
    Not counted: other kernel scratch and allocator slack.  {"fwd", "bwd", "peak"} in bytes."""
    p, d, e, a = world, lay.head_dim, lay.elem_bytes, lay.acc_bytes
    loc = lay.seqlen // p
    q, kv = loc * lay.hq * d * e, 2 * loc * lay.hkv * d * e
    qa, kva, lse = q // e * a, kv // e * a, lay.hq * loc * a
    grads = q + kv
    if strategy == "none" or p == 1:
        fwd = q + lse
        bwd = fwd + grads + qa
    elif strategy == "ring":
        fwd = qa + lse + 2 * kv + q
        bwd = q + lse + 2 * kv + 3 * kva + 2 * qa + grads
    elif strategy == "allgather":
        full = p * kv // kv_head_groups
        fwd = q + lse + 2 * full
        bwd = q + lse + 2 * full + 2 * (full // e * a) + qa + grads
    elif strategy == "ulysses":
        hkv = lay.hkv * (p // math.gcd(lay.hkv, p))
        qf, kvf = lay.seqlen * (lay.hq // p) * d * e, 2 * lay.seqlen * (hkv // p) * d * e
        lsef = (lay.hq // p) * lay.seqlen * a
        saved = 2 * qf + kvf + lsef  # Q, out, K/V, lse in the head-sharded layout
        fwd = saved + q
        bwd = saved + q + 2 * qf + kvf + qf // e * a + grads
    elif strategy == "usp":
        u = ulysses_degree or 1
        if p % u:
            raise ValueError(f"ulysses_degree={u} must divide the CP size {p}")
        uly = memory_per_rank("ulysses", Layout(loc * u, lay.hq, lay.hkv, lay.head_dim, e), u)
        hkv = lay.hkv * (u // math.gcd(lay.hkv, u)) // u
        ring = memory_per_rank("ring", Layout(lay.seqlen, lay.hq // u, hkv, lay.head_dim, e), p // u)
        fwd, bwd = uly["fwd"] + ring["fwd"], uly["bwd"] + ring["bwd"]
    else:
        raise ValueError(f"strategy={strategy!r} has no memory model; choose none, ring, allgather, ulysses or usp")
    return {"fwd": fwd, "bwd": bwd, "peak": max(fwd, bwd)}
