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

from dataclasses import dataclass, replace

import numpy as np
import torch

from kernels import MaskSpec

from .. import STRATEGIES, load_entry
from ..balance import assign, key_intervals, sink_intervals
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


def mask_keys(mask, seqlen: int, num_kv_heads: int | None = None) -> np.ndarray:
    """keys(i): number of keys query i may attend, [seqlen], in closed form per query: the
    mask's key interval (document start / window start .. query / document end, the whole
    prefix inside a prefix) plus its document's sink tokens.  With S2 `heads` and
    `num_kv_heads`, the mean over the KV heads of each head's own keys (float64: pairs in
    units of all heads, so FLOPs = 4 * pairs * Hq * D hold); without num_kv_heads, the keys
    some head sees (the union, int64)."""
    if mask.heads is not None and num_kv_heads is not None:
        return head_keys(mask, seqlen, num_kv_heads).sum(0) / num_kv_heads
    pos = torch.arange(seqlen)
    lo, hi = key_intervals(mask, pos)
    keys = (hi.clamp_max(seqlen - 1) - lo + 1).clamp_min(0)
    if mask.sink is not None:
        s_lo, s_hi = sink_intervals(mask, pos)
        keys += (s_hi - s_lo + 1).clamp_min(0) - (torch.minimum(hi, s_hi) - torch.maximum(lo, s_lo) + 1).clamp_min(0)
    return keys.numpy()


def head_keys(mask, seqlen: int, num_kv_heads: int) -> np.ndarray:
    """[Hkv, seqlen] int64: the keys each query sees under each KV head of an S2 mask
    (contract 1b), counted per query in O(1), never pair by pair.

    A query's keys are B | (L & S_h): B = the bypass keys (its prefix when it lies in one,
    the sink tokens up to itself), which start at its document's start, so B is one
    interval; L = the local interval (document, causal, window); S_h = the keys head h
    sees: inside the local band (relative block >= the band's first) or on its stride.
    |B| + |L & S_h| - |B & L & S_h|, where S_h is counted on an interval by the band part
    plus the strided blocks below the band."""
    mask.heads.check_cover(num_kv_heads)
    pos = torch.arange(seqlen)
    plain = replace(mask, prefix=None, sink=None, heads=None)
    l_lo, l_hi = (x.numpy() for x in key_intervals(plain, pos))
    l_hi = np.minimum(l_hi, seqlen - 1)
    rel = mask.relative(pos).numpy()
    start = pos.numpy() - rel
    bypass = np.where(mask.in_prefix(pos).numpy(), mask.prefix_len(pos).numpy(), 0)
    if mask.sink is not None:
        bypass = np.maximum(bypass, np.minimum(mask.sink, rel + 1))
    b_lo, b_hi = start, start + bypass - 1
    x_lo, x_hi = np.maximum(l_lo, b_lo), np.minimum(l_hi, b_hi)  # B & L
    hs = mask.heads
    band = np.maximum((rel // hs.block - hs.local_blocks + 1) * hs.block, 0)  # relative start of the band
    per_residue = {}
    out = np.empty((num_kv_heads, seqlen), dtype=np.int64)
    for h in range(num_kv_heads):
        kind = _head_class(hs, h)
        if kind not in per_residue:
            seen = (lambda a, b: np.maximum(b - a + 1, 0)) if kind == -1 else \
                (lambda a, b, h=h: _head_seen(hs, h, a - start, b - start, band))
            per_residue[kind] = (b_hi - b_lo + 1) + seen(l_lo, l_hi) - seen(x_lo, x_hi)
        out[h] = per_residue[kind]
    return out


def _head_class(hs, h: int) -> int:
    """Heads of one class see the same keys: -1 for the dense heads, else h % vert_stride."""
    return -1 if h < hs.dense_heads else h % hs.vert_stride


def _head_seen(hs, h: int, lo: np.ndarray, hi: np.ndarray, band: np.ndarray) -> np.ndarray:
    """Keys of relative positions [lo, hi] (empty when hi < lo) that sparse head h sees:
    those inside the band [band, ...), plus the ones below it on h's stride."""
    near = np.maximum(hi - np.maximum(lo, band) + 1, 0)
    top = np.minimum(hi, band - 1)
    strided = np.where(top >= lo, _strided_below(hs, h, top + 1) - _strided_below(hs, h, np.maximum(lo, 0)), 0)
    return near + strided


def _strided_below(hs, h: int, n: np.ndarray) -> np.ndarray:
    """Relative positions r in [0, n) on head h's stride ((r // block + h) % vert_stride == 0)."""
    whole, rest = n // hs.block, n % hs.block
    first = (-h) % hs.vert_stride  # the first block on the stride
    return (whole - first + hs.vert_stride - 1) // hs.vert_stride * hs.block + \
        np.where((whole + h) % hs.vert_stride == 0, rest, 0)


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

    A run of consecutive keys [a, b] is seen exactly by the queries in [a, last(a..b)]
    (causal: last = document end / window end / sequence end of each key; the document end
    for sink keys; at least the prefix end for prefix keys, which the prefix's earlier
    queries see too, so those runs start at the document start) or [doc_start(a),
    doc_end(b)] (bidirectional), so only the owners of that interval matter; they are
    found on the runs of the owner map, never token by token.
    """
    world = len(rows)
    owner = np.empty(seqlen, dtype=np.int64)
    for r, idx in enumerate(rows):
        owner[idx] = r
    run_start = np.flatnonzero(np.r_[True, owner[1:] != owner[:-1]])
    run_owner = owner[run_start]
    lo_all, hi_all = (t.numpy() for t in key_intervals(mask, torch.arange(seqlen)))
    doc_lo = lo_all if not mask.is_causal else np.where(mask.in_prefix(torch.arange(seqlen)).numpy(), lo_all,
                                                         np.arange(seqlen))
    # causal: the last query that sees key k is where the window or the document closes
    last_seer = _last_seer(mask, seqlen) if mask.is_causal else np.minimum(hi_all, seqlen - 1)
    reach = []
    for j, idx in enumerate(rows):
        cut = np.flatnonzero(np.diff(idx) != 1)
        starts, ends = idx[np.r_[0, cut + 1]], idx[np.r_[cut, idx.size - 1]]
        offsets = []
        for a, b in zip(starts, ends):
            lo, hi = doc_lo[a], last_seer[a:b + 1].max()
            first = np.searchsorted(run_start, lo, side="right") - 1
            last = np.searchsorted(run_start, hi, side="right") - 1
            offsets.append(((run_owner[first:last + 1] - j) % world).max())
        reach.append(int(max(offsets)) if offsets else -1)
    return reach


def _last_seer(mask, seqlen: int) -> np.ndarray:
    """Causal masks: the largest query position that sees key k (document end / window; the
    document end for a sink key, at least the prefix end for a prefix key)."""
    pos = np.arange(seqlen)
    doc_end = np.full(seqlen, seqlen - 1)
    if mask.has_docs:
        lens = np.asarray(mask.doc_lens)
        doc_end = np.repeat(np.cumsum(lens) - 1, lens)
    last = doc_end if mask.window is None else np.minimum(doc_end, pos + mask.window - 1)
    keys = torch.arange(seqlen)
    if mask.sink is not None:
        last = np.where(mask.in_sink(keys).numpy(), doc_end, last)
    if mask.prefix is not None:
        prefix_end = pos - mask.relative(keys).numpy() + mask.prefix_len(keys).numpy() - 1
        last = np.where(mask.in_prefix(keys).numpy(), np.maximum(last, prefix_end), last)
    return last


def pairs_per_rank(keys: np.ndarray, rows: list[np.ndarray]) -> list[int | float]:
    """Attention pairs each rank's query rows cover (float for the per-head means of S2)."""
    return [keys[r].sum().item() for r in rows]


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


def tile_cut(mask, q, k, num_kv_heads: int | None = None, kv_heads=None) -> tuple[float, float, float]:
    """How `kernels.cpu` cuts one kernel call (query rows q, key rows k): rows of causal
    tiles, rows of a call cut into several tiles (0 for one tile), and pairs it computes in
    explicitly masked tiles although the mask hides them.  Masks with S2 `heads` are run per
    KV head over that head's compacted keys (`kernels.cpu.units`): the mean over the heads
    (`kv_heads`, global indices, else all `num_kv_heads`); without a head count, the tiles
    of the keys some head sees."""
    from kernels.cpu import units

    if mask.heads is None or (num_kv_heads is None and kv_heads is None):
        return _unit_cut(mask.without_heads(), q, [(k, None)])
    heads = mask.kv_heads_for(num_kv_heads, kv_heads)
    per_class, total = {}, np.zeros(3)
    for h in heads.tolist():
        kind = _head_class(mask.heads, h)
        if kind not in per_class:
            parts = units(mask, k, 1, [h])
            per_class[kind] = _unit_cut(mask, q, [(k if u.keys is None else k[u.keys], u.head) for u in parts])
        total += per_class[kind]
    return tuple((total / len(heads)).tolist())


def _unit_cut(mask, q, keys) -> tuple[int, int, int]:
    """`tile_cut` of the calls over each (key rows, KV head) of `keys` for the same queries."""
    from kernels.cpu import CAUSAL, MASKED, plan

    tiles = [(t, p) for k, head in keys for p in [plan(mask, q, k, head)] for t in p]
    diag = sum(t.q1 - t.q0 for t, _ in tiles if t.kind == CAUSAL)
    hidden = sum((t.q1 - t.q0) * (t.k1 - t.k0) - int(p.allowed[t].sum()) for t, p in tiles if t.kind == MASKED)
    return diag, (sum(t.q1 - t.q0 for t, _ in tiles) if len(tiles) > 1 else 0), hidden


def whole_cut(mask, seqlen: int, world: int, num_kv_heads: int | None = None,
              head_sets=None) -> list[tuple[float, float, float]]:
    """`tile_cut` of one call over the whole sequence in order, on each of `world` ranks
    (S2 masks: over all `num_kv_heads`, or `head_sets[r]`, the global KV heads rank r computes)."""
    everything = torch.arange(seqlen)
    if mask.heads is None or head_sets is None:
        return [tile_cut(mask, everything, everything, num_kv_heads)] * world
    return [tile_cut(mask, everything, everything, kv_heads=heads) for heads in head_sets]


def steps_cut(mask, q, keys, num_kv_heads: int | None = None, kv_heads=None) -> tuple[float, float, float]:
    """`tile_cut` summed over one kernel call per key block (a ring), plus the merge of every
    step's partial after the first (a step runs when some head has a pair in it)."""
    from kernels.cpu import plan

    parts = [tile_cut(mask, q, k, num_kv_heads, kv_heads) for k in keys]
    steps = sum(1 for k in keys if plan(mask.without_heads(), q, k))
    return (sum(d for d, _, _ in parts), sum(s for _, s, _ in parts) + max(steps - 1, 0) * len(q),
            sum(h for _, _, h in parts))


def kernel_rows(strategy: str, mask, seqlen: int, rows: list[np.ndarray], heads: tuple[int, int] | None = None,
                **options) -> dict[str, list[float]]:
    """How the cpu backend (`kernels.cpu.plan`) cuts each rank's work in one attention call,
    per rank: "diagonal", rows of causal tiles (each computes whole key blocks across its
    diagonal, about half a block of keys beyond its pairs per row: why short documents cost
    more per pair); "split", rows of kernel calls cut into several tiles, whose partials are
    merged (plus the ring's own merge of every step after the first); "masked", pairs the
    kernel computes but the mask hides, in tiles run with an explicit mask (window edges,
    scattered rows: the op computes the whole tile).  The strategy's `cost_kernel_cut`
    says which calls it makes; one rank makes the single whole-sequence call.  S2 masks:
    the mean over the KV heads, each head's own cut (`tile_cut`); `heads` = (Hq, Hkv) go to
    the hook as num_heads / num_kv_heads."""
    impl = strategy_class("none" if len(rows) == 1 else strategy)
    if heads is not None:
        options = dict(options, num_heads=heads[0], num_kv_heads=heads[1])
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
