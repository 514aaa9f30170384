"""CAD tasks and their cost: exact (query, key) pair counts in closed form, plus calibration.

A task is a contiguous range of query tokens of ONE document; the keys it needs follow from
the mask (whole document when not causal; the document prefix up to the last query when
causal; the last `window` positions of each query under a sliding window).  Positions are
global; `doc_start` / `doc_len` place the document in the packed sequence.  Counting pairs
never materialises a mask: for a query at document offset i the row holds
    L                 keys (not causal),
    i + 1             keys (causal),
    min(i + 1, w)     keys (window w, which is causal by definition),
and the sums over i in [a, b) are arithmetic series.
"""
from __future__ import annotations

from dataclasses import dataclass

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
    """The document-independent part of a mask: causal and sliding window."""

    causal: bool = True
    window: int | None = None

    @classmethod
    def of(cls, mask) -> "MaskKind":
        """The kind of a kernels.MaskSpec; prefix, sink and per-head (S2) masks are refused:
        CAD's tasks and pair counts know only causal and window keys."""
        unsupported = [name for name in ("prefix", "sink", "heads") if getattr(mask, name, None) is not None]
        if unsupported:
            raise ValueError(f"strategy 'cad' does not support masks with {', '.join(unsupported)} yet; "
                             "use ring, allgather, ulysses or usp for them")
        return cls(causal=bool(mask.is_causal), window=mask.window)


def _series(a: int, b: int) -> int:
    """sum_{i=a}^{b-1} (i + 1) for 0 <= a <= b."""
    return (b - a) * (a + b + 1) // 2


def row_pairs(a: int, b: int, doc_len: int, kind: MaskKind) -> int:
    """Allowed pairs of the queries at document offsets [a, b) of a document of doc_len tokens."""
    if b <= a:
        return 0
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


def key_range(a: int, b: int, doc_len: int, kind: MaskKind) -> tuple[int, int]:
    """Document offsets [lo, hi) of the keys that queries [a, b) may attend."""
    if not kind.causal:
        return 0, doc_len
    if kind.window is None:
        return 0, b
    return max(0, a - kind.window + 1), b


def split_for_pairs(a: int, b: int, doc_len: int, kind: MaskKind, target: int, tail: bool) -> int:
    """Cut point m in (a, b) so the tail [m, b) (or the head [a, m)) holds about `target`
    pairs, without exceeding it unless one row alone does.  Binary search on a monotone count."""
    lo, hi = a + 1, b - 1
    if lo > hi:
        return b if tail else a
    if tail:  # largest piece [m, b) with pairs <= target: smallest m with pairs(m, b) <= target
        best = b
        while lo <= hi:
            mid = (lo + hi) // 2
            if row_pairs(mid, b, doc_len, kind) <= target:
                best, hi = mid, mid - 1
            else:
                lo = mid + 1
        return best if best < b else b - 1
    best = a
    while lo <= hi:
        mid = (lo + hi) // 2
        if row_pairs(a, mid, doc_len, kind) <= target:
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    return best if best > a else a + 1


@dataclass
class Task:
    """Queries [q_lo, q_hi) (global positions) of document `doc`, computed on `server`.

    The queries always lie inside one owner rank's token range, so they travel from a
    single rank; the keys they need may span several ranks.
    """

    doc: int
    doc_start: int
    doc_len: int
    q_lo: int
    q_hi: int
    server: int

    def pairs(self, kind: MaskKind) -> int:
        s = self.doc_start
        return row_pairs(self.q_lo - s, self.q_hi - s, self.doc_len, kind)

    def keys(self, kind: MaskKind) -> tuple[int, int]:
        """Global [lo, hi) of the keys this task needs."""
        s = self.doc_start
        lo, hi = key_range(self.q_lo - s, self.q_hi - s, self.doc_len, kind)
        return s + lo, s + hi
