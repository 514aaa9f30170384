"""Block classification shared by the fused backends: which (query block, key block)
tiles are hidden, fully visible, or partially visible under a `MaskSpec`.

A block of rows is summarised by the min and max of a few per-row columns (`COLUMNS`):
global position, document id, position inside the document, and three flags: inside the
document's prefix, a sink token, and a key the KV head sees at any distance (dense or on
its S2 stride).  From two summaries alone we can prove a tile *hidden* (no allowed pair:
skip it) or *full* (every pair allowed: no mask needed); anything else is *partial* and the
kernel evaluates the mask per pair.  The classification is conservative: each term of
`allowed = same and (pre or snk or (local and sparse))` is bounded from below ("all") and
above ("some") separately, so `hidden` and `full` only hold when they hold for every pair,
and skipping never changes a result.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from .mask import MaskSpec

HIDDEN, FULL, PARTIAL = 0, 1, 2
COLUMNS = ("pos", "doc", "rel", "pre", "snk", "seen")
_N = len(COLUMNS)


@dataclass
class RowInfo:
    """Per-row columns of a set of rows (`COLUMNS`, [T, 6] long) plus their runs: a run is a
    maximal stretch of rows whose positions increase by exactly 1 inside one document,
    without crossing the end of a prefix or of the sink tokens."""

    cols: torch.Tensor  # [T, 6] long
    run: torch.Tensor   # [T] long, run index of every row
    _ranges: dict = field(default_factory=dict, repr=False)  # range_stats already computed

    @classmethod
    def of(cls, mask: MaskSpec, pos: torch.Tensor, head: int | None = None) -> "RowInfo":
        """Rows at `pos`; `head` (global KV-head index) fills the `seen` flag of S2 masks."""
        pos = pos.to("cpu", torch.long).contiguous()
        doc = mask.doc_of(pos).contiguous() if mask.has_docs else torch.zeros_like(pos)
        rel = mask.relative(pos)
        pre, snk = mask.in_prefix(pos).long(), mask.in_sink(pos).long()
        seen = torch.ones_like(pos)
        if mask.heads is not None and head is not None:
            seen = mask.heads.sees_block(torch.tensor(head), rel).long()
        brk = torch.ones_like(pos, dtype=torch.bool)
        brk[1:] = (pos[1:] - pos[:-1] != 1) | (doc[1:] != doc[:-1]) | (pre[1:] != pre[:-1]) | (snk[1:] != snk[:-1])
        return cls(torch.stack([pos, doc, rel, pre, snk, seen], 1), torch.cumsum(brk.long(), 0) - 1)

    @property
    def pos(self) -> torch.Tensor:
        return self.cols[:, 0]

    @functools.cached_property
    def pos_list(self) -> list[int]:
        """Positions as Python ints (binary search, one tile at a time)."""
        return self.pos.tolist()

    @functools.cached_property
    def run_list(self) -> list[int]:
        return self.run.tolist()

    @property
    def doc(self) -> torch.Tensor:
        return self.cols[:, 1]

    def runs(self) -> list[tuple[int, int]]:
        """[start, end) row ranges of the runs, in order."""
        counts = torch.unique_consecutive(self.run, return_counts=True)[1].tolist()
        bounds, start = [], 0
        for c in counts:
            bounds.append((start, start + c))
            start += c
        return bounds

    def block_stats(self, block: int) -> torch.Tensor:
        """[nblocks, 12] long: min of every column, then max of every column, for each block
        of `block` rows (the last block may be shorter)."""
        n = self.cols.shape[0]
        nb = -(-n // block)
        pad = nb * block - n
        big = torch.iinfo(torch.long).max
        lo = torch.cat([self.cols, self.cols.new_full((pad, _N), big)]).view(nb, block, _N).min(1).values
        hi = torch.cat([self.cols, self.cols.new_full((pad, _N), -1)]).view(nb, block, _N).max(1).values
        return torch.cat([lo, hi], 1)

    def range_stats(self, a: int, b: int) -> list[int]:
        """Column mins then maxes of rows [a, b) as 12 Python ints (cheap to classify one
        tile at a time)."""
        if (a, b) not in self._ranges:
            c = self.cols[a:b]
            self._ranges[a, b] = torch.cat([c.min(0).values, c.max(0).values]).tolist()
        return self._ranges[a, b]

    def is_run(self, a: int, b: int) -> bool:
        """True when rows [a, b) are consecutive positions of one document (one run)."""
        return self.run_list[a] == self.run_list[b - 1]


def bounds(mask: MaskSpec, q_stats, k_stats) -> dict:
    """(all, some) of every term of the formula over the tiles: `all` is True only where the
    term holds for every pair of the tile, `some` is False only where it holds for none.
    Stats are [..., 12] tensors (a table of tiles) or lists of 12 ints (one tile)."""
    q = q_stats.unbind(-1) if isinstance(q_stats, torch.Tensor) else q_stats
    k = k_stats.unbind(-1) if isinstance(k_stats, torch.Tensor) else k_stats
    (qmin, qdmin, qrmin, qpmin, _, _), (qmax, qdmax, qrmax, qpmax, _, _) = q[:_N], q[_N:]
    (kmin, kdmin, krmin, kpmin, ksmin, kvmin), (kmax, kdmax, krmax, kpmax, ksmax, kvmax) = k[:_N], k[_N:]
    terms = {}
    if mask.has_docs:
        terms["same"] = ((qdmin == qdmax) & (kdmin == kdmax) & (qdmin == kdmin), (qdmax >= kdmin) & (kdmax >= qdmin))
    local_all = local_some = True
    if mask.is_causal:
        local_all, local_some = qmin >= kmax, qmax >= kmin
    if mask.window is not None:
        local_all, local_some = local_all & ((qmax - kmin) < mask.window), local_some & ((qmin - kmax) < mask.window)
    terms["local"] = (local_all, local_some)
    if mask.heads is not None:
        b, lb = mask.heads.block, mask.heads.local_blocks
        near_all, near_some = qrmax // b - krmin // b < lb, qrmin // b - krmax // b < lb
        terms["sparse"] = ((kvmin == 1) | near_all, (kvmax == 1) | near_some)
    if mask.prefix is not None:
        terms["pre"] = ((qpmin == 1) & (kpmin == 1), (qpmax == 1) & (kpmax == 1))
    if mask.sink is not None:
        terms["snk"] = ((ksmin == 1) & (kmax <= qmin), (ksmax == 1) & (kmin <= qmax))
    return terms


def classify(mask: MaskSpec, q_stats, k_stats):
    """Tile kinds (HIDDEN / FULL / PARTIAL) for query and key block statistics.

    q_stats [..., 12] and k_stats [..., 12] (see `RowInfo.block_stats`) broadcast against
    each other, e.g. [nq, 1, 12] with [1, nk, 12] gives the [nq, nk] int8 table of all
    tiles; two lists of 12 ints (`RowInfo.range_stats`) give one kind as an int.  Key
    statistics taken with a `head` classify the tiles of that KV head.
    """
    terms = bounds(mask, q_stats, k_stats)
    all_, some = terms["local"]
    if "sparse" in terms:
        all_, some = all_ & terms["sparse"][0], some & terms["sparse"][1]
    for name in ("pre", "snk"):
        if name in terms:
            all_, some = all_ | terms[name][0], some | terms[name][1]
    if "same" in terms:
        all_, some = all_ & terms["same"][0], some & terms["same"][1]
    if not isinstance(q_stats, torch.Tensor):
        return HIDDEN if not some else FULL if all_ else PARTIAL
    shape = torch.broadcast_shapes(q_stats.shape[:-1], k_stats.shape[:-1])
    all_, some = (torch.as_tensor(x).expand(shape) for x in (all_, some))
    kind = torch.full(shape, PARTIAL, dtype=torch.int8)
    kind[all_] = FULL
    kind[~some] = HIDDEN
    return kind


def only_local(mask: MaskSpec, q_stats: list[int], k_stats: list[int]) -> bool:
    """True when on this tile the mask is just documents and causal/window: no prefix or
    sink pair, and the head sees every key of the tile at any distance."""
    terms = bounds(mask, q_stats, k_stats)
    if any(terms[name][1] for name in ("pre", "snk") if name in terms):
        return False
    return "sparse" not in terms or bool(terms["sparse"][0])
