"""Exact work and traffic of one CP attention call, from the mask alone (no process group).

Two counts drive every prediction in `parallel.simulator` and `parallel.auto`:

* attention pairs per rank: the number of allowed (query, key) pairs whose query row a
  rank owns.  For the masks of `kernels.MaskSpec` a query at global position i sees
  `keys(i)` keys, a closed form (below), so a rank's pairs are a sum over its rows and the
  whole sequence costs O(seqlen) -- 1M tokens and 1024 ranks run on a laptop.
* bytes sent per rank by each strategy (forward and backward), closed forms in the layout
  (tokens per rank, heads, head_dim, element size) that `cp.stats` must reproduce exactly.

Invariant: sum over ranks of pairs_per_rank == MaskSpec.pairs(all, all) for every
balancer, because a balancer is a permutation of query rows.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BALANCERS = ("contiguous", "headtail", "stripe")


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


def doc_starts(seqlen: int, doc_lens) -> np.ndarray:
    """Start position of the document of every global position (zeros without documents)."""
    if doc_lens is None:
        return np.zeros(seqlen, dtype=np.int64)
    lens = np.asarray(list(doc_lens), dtype=np.int64)
    if lens.sum() != seqlen or (lens <= 0).any():
        raise ValueError(f"doc_lens must be positive and sum to seqlen={seqlen}, got sum {int(lens.sum())}")
    starts = np.concatenate([[0], np.cumsum(lens)[:-1]])
    return np.repeat(starts, lens)


def keys_per_query(seqlen: int, *, causal: bool, doc_lens=None, window: int | None = None) -> np.ndarray:
    """keys(i): number of keys query i may attend (int64 [seqlen]).

    causal (or window):  keys(i) = i - max(doc_start(i), i - window + 1) + 1
    bidirectional:       keys(i) = length of i's document (seqlen without documents)
    """
    pos = np.arange(seqlen, dtype=np.int64)
    start = doc_starts(seqlen, doc_lens)
    if causal or window is not None:
        if window is not None:
            start = np.maximum(start, pos - window + 1)
        return pos - start + 1
    if doc_lens is None:
        return np.full(seqlen, seqlen, dtype=np.int64)
    lens = np.asarray(list(doc_lens), dtype=np.int64)
    return np.repeat(lens, lens)


def mask_keys(mask, seqlen: int) -> np.ndarray:
    """keys_per_query for a kernels.MaskSpec."""
    return keys_per_query(seqlen, causal=mask.causal, doc_lens=mask.doc_lens, window=mask.window)


def balancer_rows(balancer: str, seqlen: int, world: int) -> list[np.ndarray]:
    """Global query rows each rank owns under a standard balancer.

    contiguous: rank r owns [r*T/P, (r+1)*T/P);  headtail (zigzag): chunks of T/(2P), rank r
    owns chunks r and 2P-1-r;  stripe: rank r owns r, r+P, r+2P, ...
    """
    if balancer not in BALANCERS:
        raise ValueError(f"balancer={balancer!r} has no closed form here; choose one of {', '.join(BALANCERS)}")
    div = 2 * world if balancer == "headtail" else world
    if seqlen % div:
        raise ValueError(f"seqlen={seqlen} must be divisible by {div} for balancer={balancer} on {world} ranks")
    if balancer == "contiguous":
        return [np.arange(r * seqlen // world, (r + 1) * seqlen // world) for r in range(world)]
    if balancer == "stripe":
        return [np.arange(r, seqlen, world) for r in range(world)]
    c = seqlen // (2 * world)
    return [np.concatenate([np.arange(r * c, (r + 1) * c), np.arange((2 * world - 1 - r) * c, (2 * world - r) * c)])
            for r in range(world)]


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


def bytes_sent(strategy: str, lay: Layout, world: int, *, ulysses_degree: int | None = None) -> dict[str, int]:
    """Bytes one rank sends in one attention call: {"fwd": ..., "bwd": ...}.

    With P ranks, L = seqlen / P local tokens, kv = L * Hkv * D * elem (one of K or V):
      ring:      fwd (P-1) * 2kv (K and V passed P-1 hops);
                 bwd (P-1) * 2kv (K, V again) + (P-1) * 2kv (dK, dV travel with them) = 4(P-1)kv
      allgather: fwd all-gather of K, V: (P-1) * 2kv;  bwd reduce-scatter of dK, dV: (P-1) * 2kv
      ulysses:   all-to-all keeps 1/P of every tensor local; fwd sends Q, K, V and the output,
                 bwd sends dO and dQ, dK, dV:  each = (P-1)/P * L * (2 Hq + 2 Hkv) * D * elem
      usp:       ulysses over u ranks on L tokens, then ring over r = P/u ranks on u*L tokens
                 with Hkv/u heads.
      none:      0.
    """
    p = world
    loc = lay.seqlen // p
    kv = loc * lay.hkv * lay.head_dim * lay.elem_bytes
    if strategy == "none" or p == 1:
        return {"fwd": 0, "bwd": 0}
    if strategy == "ring":
        return {"fwd": (p - 1) * 2 * kv, "bwd": (p - 1) * 4 * kv}
    if strategy == "allgather":
        return {"fwd": (p - 1) * 2 * kv, "bwd": (p - 1) * 2 * kv}
    if strategy == "ulysses":
        one_way = (p - 1) * loc * (2 * lay.hq + 2 * lay.hkv) * lay.head_dim * lay.elem_bytes // p
        return {"fwd": one_way, "bwd": one_way}
    if strategy == "usp":
        u = ulysses_degree or 1
        if p % u:
            raise ValueError(f"ulysses_degree={u} must divide the CP size {p}")
        uly = bytes_sent("ulysses", Layout(loc * u, lay.hq, lay.hkv, lay.head_dim, lay.elem_bytes), u)
        ring_lay = Layout(loc * p, max(lay.hq // u, 1), max(lay.hkv // u, 1), lay.head_dim, lay.elem_bytes)
        ring = bytes_sent("ring", ring_lay, p // u)
        return {k: uly[k] + ring[k] for k in ("fwd", "bwd")}
    raise ValueError(f"strategy={strategy!r} has no bytes formula; choose ring, allgather, ulysses, usp or none")
