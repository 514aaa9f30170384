"""CAD tasks and their cost: exact (query, key) pair counts, plus calibration.

A task is a contiguous range of query tokens of ONE document; the keys it needs follow from
the mask (contract 1b of DESIGN.md): the whole document when not causal; else the document up
to the last query, from the window start of the first query under a sliding window, from the
document start (and on to the prefix end) when a query lies in the prefix, plus the
document's first `sink` tokens.  Positions are global; `doc_start` / `doc_len` place the
document in the packed sequence.  With S2 `heads` the server holds the union of the heads'
keys (every key of those ranges, since the heads cover) and the kernel applies each head's
mask, so the cost counts each KV head's real pairs.

Counting pairs never materialises a mask.  For causal / window masks a query at document
offset i holds
    L                 keys (not causal),
    i + 1             keys (causal),
    min(i + 1, w)     keys (window w, which is causal by definition),
and the sums over i in [a, b) are arithmetic series.  With a prefix, sinks or heads a row's
keys are the interval [0, e) (the prefix for a query inside it, else the sinks up to the
query) plus the row's causal / window keys past e that its head's S2 pattern keeps (the
local band, then the strided blocks, whose count summed over the heads is O(1) per row);
those row counts are tabulated once per (document length, prefix) as a running sum.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from kernels import HeadStride

# Fixed cost of one task, in units of (query, key) pairs, per backend: the time one more
# task adds to a server's batched kernel call divided by the time of one pair.
# "cpu": fitted by scripts/profile_cad_cost.py --backend cpu (Hq=8, Hkv=2, D=64, float32,
#   fwd+bwd, 1 thread, 4096 tokens per call as 1..128 causal documents; 2026-11-23 on the
#   shared 2-core build machine: per_task 24 ms, per_pair 513 ns -> 47659 pairs).
# "reference" computes dense scores whatever the mask, so pairs do not predict its time;
#   it and "default" (GPU backends, not measured here) use one 64 x 64 tile, 4096 pairs.
TASK_OVERHEAD_PAIRS = {
    "cpu": 47659,
    "reference": 4096,
    "default": 4096,
}


@dataclass(frozen=True)
class MaskKind:
    """The document-independent part of a mask: causal, sliding window, sinks and S2 heads
    (counted over `num_kv_heads` KV heads).  A prefix belongs to its document (`Task.prefix`).

    Pair counts (`row_pairs`) are in KV-head units: summed over the KV heads when `heads` is
    set (`head_weight` = num_kv_heads), plain token pairs otherwise; `token_pairs` converts
    back to token pairs in units of all heads, as CPStats counts them."""

    causal: bool = True
    window: int | None = None
    sink: int | None = None
    heads: HeadStride | None = None
    num_kv_heads: int | None = None

    def __post_init__(self):
        if self.heads is not None:
            if self.num_kv_heads is None:
                raise ValueError("strategy 'cad' counts each KV head's pairs under heads=HeadStride(...): pass "
                                 "num_kv_heads= (the model's KV heads; option num_kv_heads of parallel.build)")
            self.heads.check_cover(self.num_kv_heads)

    @classmethod
    def of(cls, mask, num_kv_heads: int | None = None) -> "MaskKind":
        """The kind of a kernels.MaskSpec (num_kv_heads is needed, and read, only with heads)."""
        heads = mask.heads
        return cls(causal=bool(mask.is_causal), window=mask.window, sink=mask.sink, heads=heads,
                   num_kv_heads=num_kv_heads if heads is not None else None)

    @property
    def head_weight(self) -> int:
        return self.num_kv_heads if self.heads is not None else 1

    def token_pairs(self, count: int) -> int | float:
        """A KV-head pair count in token pairs of all heads (its mean over the KV heads)."""
        return count if self.heads is None else count / self.num_kv_heads


def _series(a: int, b: int) -> int:
    """sum_{i=a}^{b-1} (i + 1) for 0 <= a <= b."""
    return (b - a) * (a + b + 1) // 2


def _strided_below(n: torch.Tensor, hs: HeadStride, sparse_heads: range) -> torch.Tensor:
    """Keys j in [0, n) of the blocks each sparse head h sees by stride ((j // block + h) %
    vert_stride == 0), summed over the heads: a head of residue r = -h mod vert_stride sees
    q + (m > r) whole blocks below block n // block = q * vert_stride + m, and the partial
    block when m == r."""
    residues = torch.tensor([(-h) % hs.vert_stride for h in sparse_heads], dtype=torch.long)
    m_values = torch.arange(hs.vert_stride).view(-1, 1)
    below = (residues.view(1, -1) < m_values).sum(1)  # per m: heads with r < m
    equal = (residues.view(1, -1) == m_values).sum(1)  # per m: heads with r == m
    blocks = torch.div(n, hs.block, rounding_mode="floor")
    q, m = torch.div(blocks, hs.vert_stride, rounding_mode="floor"), blocks % hs.vert_stride
    return hs.block * (len(sparse_heads) * q + below[m]) + (n - blocks * hs.block) * equal[m]


def row_counts(doc_len: int, prefix: int, kind: MaskKind) -> torch.Tensor:
    """Allowed keys of every query of a document, [doc_len], in KV-head units."""
    i = torch.arange(doc_len)
    sink = kind.sink or 0
    bypass = torch.where(i < prefix, prefix, torch.clamp(i + 1, max=sink))  # keys [0, e): prefix or sinks
    if kind.causal:
        lo = (i - kind.window + 1).clamp_min(0) if kind.window is not None else torch.zeros_like(i)
        hi = i
    else:
        lo, hi = torch.zeros_like(i), torch.full_like(i, doc_len - 1)
    lo = torch.maximum(lo, bypass)  # the row's own keys [lo, hi] past the bypass interval
    own = (hi - lo + 1).clamp_min(0)
    if kind.heads is None:
        return bypass + own
    hs, heads = kind.heads, kind.num_kv_heads
    sparse = range(min(hs.dense_heads, heads), heads)
    band = ((torch.div(i, hs.block, rounding_mode="floor") - hs.local_blocks + 1) * hs.block).clamp_min(0)
    near = (hi - torch.maximum(lo, band) + 1).clamp_min(0)  # the local band, the same for every head
    below = torch.maximum(torch.minimum(hi + 1, band), lo)  # strided keys in [lo, below)
    strided = _strided_below(below, hs, sparse) - _strided_below(lo, hs, sparse)
    return heads * bypass + (heads - len(sparse)) * own + len(sparse) * near + strided


@lru_cache(maxsize=1024)
def _running(doc_len: int, prefix: int, kind: MaskKind) -> list[int]:
    """Running sum of `row_counts`: entry i is the pairs of queries [0, i)."""
    return [0] + torch.cumsum(row_counts(doc_len, prefix, kind), 0).tolist()


def row_pairs(a: int, b: int, doc_len: int, kind: MaskKind, prefix: int = 0) -> int:
    """Allowed pairs of the queries at document offsets [a, b) of a document of doc_len tokens
    whose prefix holds `prefix` tokens (KV-head units)."""
    if b <= a:
        return 0
    if prefix or kind.sink is not None or kind.heads is not None:
        running = _running(doc_len, prefix, kind)
        return running[b] - running[a]
    if not kind.causal:
        return (b - a) * doc_len
    if kind.window is None:
        return _series(a, b)
    w = kind.window
    ramp_end = min(b, w)  # offsets i < w see i + 1 keys, the rest see w
    ramp = _series(a, ramp_end) if a < ramp_end else 0
    return ramp + w * max(0, b - max(a, w))


def doc_pairs(lens, causal: bool = True, window: int | None = None) -> int:
    """Allowed pairs of a packed sequence of documents `lens`, each attending only itself."""
    kind = MaskKind(causal=causal, window=window)
    return sum(row_pairs(0, n, n, kind) for n in lens)


def key_ranges(a: int, b: int, doc_len: int, kind: MaskKind, prefix: int = 0) -> list[tuple[int, int]]:
    """Document offsets [lo, hi) (merged, ascending) of the keys that queries [a, b) may attend
    under some head: every such key is needed by one of the queries."""
    if not kind.causal:
        return [(0, doc_len)]
    lo = max(0, a - kind.window + 1) if kind.window is not None else 0
    hi = b
    if a < prefix:  # the first query sees the whole prefix, both ways
        lo, hi = 0, max(b, prefix)
    sinks = min(kind.sink or 0, b)
    if sinks >= lo:
        return [(0, hi)]
    return [(0, sinks), (lo, hi)] if sinks else [(lo, hi)]


def split_for_pairs(a: int, b: int, doc_len: int, kind: MaskKind, target: int, tail: bool, prefix: int = 0) -> int:
    """Cut point m in (a, b) so the tail [m, b) (or the head [a, m)) holds about `target`
    pairs, without exceeding it unless one row alone does.  Binary search on a monotone count."""
    lo, hi = a + 1, b - 1
    if lo > hi:
        return b if tail else a
    if tail:  # largest piece [m, b) with pairs <= target: smallest m with pairs(m, b) <= target
        best = b
        while lo <= hi:
            mid = (lo + hi) // 2
            if row_pairs(mid, b, doc_len, kind, prefix) <= target:
                best, hi = mid, mid - 1
            else:
                lo = mid + 1
        return best if best < b else b - 1
    best = a
    while lo <= hi:
        mid = (lo + hi) // 2
        if row_pairs(a, mid, doc_len, kind, prefix) <= target:
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    return best if best > a else a + 1


@dataclass
class Task:
    """Queries [q_lo, q_hi) (global positions) of document `doc`, computed on `server`;
    `prefix`: the document's prefix length (0: none).

    The queries always lie inside one owner rank's token range, so they travel from a
    single rank; the keys they need may span several ranks.
    """

    doc: int
    doc_start: int
    doc_len: int
    q_lo: int
    q_hi: int
    server: int
    prefix: int = 0

    def span_pairs(self, a: int, b: int, kind: MaskKind) -> int:
        """Pairs of this document's queries at offsets [a, b) (KV-head units)."""
        return row_pairs(a, b, self.doc_len, kind, self.prefix)

    def pairs(self, kind: MaskKind) -> int:
        s = self.doc_start
        return self.span_pairs(self.q_lo - s, self.q_hi - s, kind)

    def keys(self, kind: MaskKind) -> list[tuple[int, int]]:
        """Global [lo, hi) intervals of the keys this task needs."""
        s = self.doc_start
        return [(s + lo, s + hi) for lo, hi in key_ranges(self.q_lo - s, self.q_hi - s, self.doc_len, kind,
                                                           self.prefix)]
