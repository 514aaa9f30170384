"""Exact work and traffic of one CP attention call, from the mask alone (no process group).

Two counts drive every prediction in `parallel.perf.predict` and `parallel.auto`:

* attention pairs per rank: the number of allowed (query, key) pairs whose query row a
  rank owns.  For the masks of `kernels.MaskSpec` a query at global position i sees
  `keys(i)` keys, a closed form (below), so a rank's pairs are a sum over its rows and the
  whole sequence costs O(seqlen) -- 1M tokens and 1024 ranks run on a laptop.
* bytes sent per rank by each strategy (forward and backward), closed forms in the layout
  (tokens per rank, heads, head_dim, element size) that `cp.stats` must reproduce exactly.

Each strategy class carries its own formulas as hooks (`cost_bytes`, `cost_kernel_cut`,
`cost_memory`, `cost_time`, `auto_candidates`, `head_split`; see `parallel.base`); the
functions here look the class up in `parallel.STRATEGIES` and call them.

Invariant: sum over ranks of pairs_per_rank == MaskSpec.pairs(all, all) for every
balancer, because a balancer is a permutation of query rows.  Rows come from
`parallel.balance` (the balancers the strategies use), never from a copy here.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kernels import MaskSpec

from .. import STRATEGIES, load_entry
from ..balance import assign, key_intervals
from ..base import ContextParallel


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


def strategy_class(name: str):
    """The registered class of a strategy (its cost hooks are classmethods)."""
    return load_entry(STRATEGIES, name, "strategy")


def has_hook(name: str, hook: str) -> bool:
    """Whether strategy `name` is registered, importable and overrides the base class's `hook`."""
    try:
        cls = strategy_class(name)
    except ValueError:
        return False
    return getattr(cls, hook).__func__ is not getattr(ContextParallel, hook).__func__


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


def attention_flops(pairs: int, hq: int, head_dim: int, backward: bool = False) -> float:
    """4 * pairs * Hq * D forward (QK^T and PV), 2.5x that backward (DESIGN.md)."""
    fwd = 4.0 * pairs * hq * head_dim
    return 2.5 * fwd if backward else fwd


def bytes_sent(strategy: str, lay: Layout, world: int, **options) -> dict[str, list[int]]:
    """Bytes each rank sends in one attention call: {"fwd": [per rank], "bwd": [per rank]}
    (the strategy's `cost_bytes`; options such as `reach`, `mask` + `rows` or
    `ulysses_degree` go to it).  One rank sends nothing."""
    impl = strategy_class(strategy)
    if world == 1:
        return {"fwd": [0], "bwd": [0]}
    return impl.cost_bytes(lay, world, **options)


def tile_cut(mask, q, k) -> tuple[int, int, int]:
    """How `kernels.cpu.plan` cuts one kernel call (query rows q, key rows k): rows of causal
    tiles, rows of a call cut into several tiles (0 for one tile), and pairs it computes in
    explicitly masked tiles although the mask hides them."""
    from kernels.cpu import CAUSAL, MASKED, plan

    tiles = plan(mask, q, k)
    diag = sum(t.q1 - t.q0 for t in tiles if t.kind == CAUSAL)
    hidden = sum((t.q1 - t.q0) * (t.k1 - t.k0) - int(mask.allowed(q[t.q0:t.q1], k[t.k0:t.k1]).sum())
                 for t in tiles if t.kind == MASKED)
    return diag, (sum(t.q1 - t.q0 for t in tiles) if len(tiles) > 1 else 0), hidden


def whole_cut(mask, seqlen: int, world: int) -> list[tuple[int, int, int]]:
    """`tile_cut` of one call over the whole sequence in order, on each of `world` ranks."""
    everything = torch.arange(seqlen)
    return [tile_cut(mask, everything, everything)] * world


def steps_cut(mask, q, keys) -> tuple[int, int, int]:
    """`tile_cut` summed over one kernel call per key block (a ring), plus the merge of every
    step's partial after the first."""
    from kernels.cpu import plan

    parts = [tile_cut(mask, q, k) for k in keys]
    steps = sum(1 for k in keys if plan(mask, q, k))
    return (sum(d for d, _, _ in parts), sum(s for _, s, _ in parts) + max(steps - 1, 0) * len(q),
            sum(h for _, _, h in parts))


def kernel_rows(strategy: str, mask, seqlen: int, rows: list[np.ndarray], **options) -> dict[str, list[int]]:
    """How the cpu backend (`kernels.cpu.plan`) cuts each rank's work in one attention call,
    per rank: "diagonal", rows of causal tiles (each computes whole key blocks across its
    diagonal, about half a block of keys beyond its pairs per row: why short documents cost
    more per pair); "split", rows of kernel calls cut into several tiles, whose partials are
    merged (plus the ring's own merge of every step after the first); "masked", pairs the
    kernel computes but the mask hides, in tiles run with an explicit mask (window edges,
    scattered rows: the op computes the whole tile).  The strategy's `cost_kernel_cut`
    says which calls it makes; one rank makes the single whole-sequence call."""
    impl = strategy_class("none" if len(rows) == 1 else strategy)
    per = impl.cost_kernel_cut(mask, seqlen, [torch.as_tensor(np.sort(r)) for r in rows], **options)
    return {"diagonal": [d for d, _, _ in per], "split": [s for _, s, _ in per], "masked": [h for _, _, h in per]}


def memory_per_rank(strategy: str, lay: Layout, world: int, **options) -> dict[str, int]:
    """Peak bytes one rank allocates in one attention call (fwd + bwd) beyond its inputs
    (local q, k, v and dout): what the strategy adds to the model's own activation memory
    (the strategy's `cost_memory`; one rank is the plain kernel).

    L = seqlen / P local rows; q = L Hq D elem; kv = 2 L Hkv D elem (K and V); the `a` forms
    are float32 (the strategies' accumulators); lse = Hq L float32.  Every strategy returns
    out + lse (kept for backward) and dq + dk + dv; the kernel's backward keeps a float32 dq
    accumulator of the rows it is called on (flash-attn 2 and torch's CPU flash op both do).
    Not counted: other kernel scratch and allocator slack.  {"fwd", "bwd", "peak"} in bytes."""
    impl = strategy_class(strategy)
    fwd, bwd = strategy_class("none").cost_memory(lay, 1) if world == 1 else impl.cost_memory(lay, world, **options)
    return {"fwd": fwd, "bwd": bwd, "peak": max(fwd, bwd)}


def memory_terms(lay: Layout, world: int) -> dict[str, int]:
    """The byte sizes every `cost_memory` is written in (see `memory_per_rank`)."""
    d, e, a = lay.head_dim, lay.elem_bytes, lay.acc_bytes
    loc = lay.seqlen // world
    q, kv = loc * lay.hq * d * e, 2 * loc * lay.hkv * d * e
    return dict(loc=loc, q=q, kv=kv, qa=q // e * a, kva=kv // e * a, lse=lay.hq * loc * a, grads=q + kv)
