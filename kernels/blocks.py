"""Block classification shared by the fused backends: which (query block, key block)
tiles are hidden, fully visible, or partially visible under a `MaskSpec`.

A block of rows is summarised by the range of its global positions and document ids.
From two summaries alone we can prove a tile *hidden* (no allowed pair: skip it) or
*full* (every pair allowed: no mask needed); anything else is *partial* and the kernel
evaluates the mask per pair.  The classification is conservative: `hidden` and `full`
are only claimed when they hold for every pair, so skipping never changes a result.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .mask import MaskSpec

HIDDEN, FULL, PARTIAL = 0, 1, 2


@dataclass
class RowInfo:
    """Global positions and document ids of a set of rows, plus their runs: a run is a
    maximal stretch of rows whose positions increase by exactly 1 inside one document."""

    pos: torch.Tensor   # [T] long
    doc: torch.Tensor   # [T] long (all zeros without documents)
    run: torch.Tensor   # [T] long, run index of every row

    @classmethod
    def of(cls, mask: MaskSpec, pos: torch.Tensor) -> "RowInfo":
        pos = pos.to("cpu", torch.long).contiguous()
        doc = mask.doc_of(pos).contiguous() if mask.has_docs else torch.zeros_like(pos)
        brk = torch.ones_like(pos, dtype=torch.bool)
        brk[1:] = (pos[1:] - pos[:-1] != 1) | (doc[1:] != doc[:-1])
        return cls(pos, doc, torch.cumsum(brk.long(), 0) - 1)

    def runs(self) -> list[tuple[int, int]]:
        """[start, end) row ranges of the runs, in order."""
        counts = torch.unique_consecutive(self.run, return_counts=True)[1].tolist()
        bounds, start = [], 0
        for c in counts:
            bounds.append((start, start + c))
            start += c
        return bounds

    def block_stats(self, block: int) -> torch.Tensor:
        """[nblocks, 4] long: (min pos, max pos, min doc, max doc) of each block of `block`
        rows (the last block may be shorter)."""
        n = self.pos.numel()
        nb = -(-n // block)
        pad = nb * block - n
        def fold(x, fill, reduce):
            x = torch.cat([x, x.new_full((pad,), fill)]).view(nb, block)
            return reduce(x, dim=1).values
        big = torch.iinfo(torch.long).max
        return torch.stack([fold(self.pos, big, torch.min), fold(self.pos, -1, torch.max),
                            fold(self.doc, big, torch.min), fold(self.doc, -1, torch.max)], dim=1)

    def range_stats(self, a: int, b: int) -> torch.Tensor:
        """(min pos, max pos, min doc, max doc) of rows [a, b) as a [4] long tensor."""
        p, d = self.pos[a:b], self.doc[a:b]
        return torch.stack([p.min(), p.max(), d.min(), d.max()])

    def is_run(self, a: int, b: int) -> bool:
        """True when rows [a, b) are consecutive positions of one document."""
        return bool(self.run[a] == self.run[b - 1])


def classify(mask: MaskSpec, q_stats: torch.Tensor, k_stats: torch.Tensor) -> torch.Tensor:
    """Tile kinds (HIDDEN / FULL / PARTIAL) for query and key block statistics.

    q_stats [..., 4] and k_stats [..., 4] (see `RowInfo.block_stats`) broadcast against
    each other, e.g. [nq, 1, 4] with [1, nk, 4] gives the [nq, nk] table of all tiles.
    """
    qmin, qmax, qdmin, qdmax = q_stats.unbind(-1)
    kmin, kmax, kdmin, kdmax = k_stats.unbind(-1)
    hidden = torch.zeros(torch.broadcast_shapes(qmin.shape, kmin.shape), dtype=torch.bool)
    full = torch.ones_like(hidden)
    if mask.is_causal:
        hidden |= qmax < kmin
        full &= qmin >= kmax
    if mask.window is not None:
        hidden |= (qmin - kmax) >= mask.window
        full &= (qmax - kmin) < mask.window
    if mask.has_docs:
        hidden |= (qdmax < kdmin) | (kdmax < qdmin)
        full &= (qdmin == qdmax) & (kdmin == kdmax) & (qdmin == kdmin)
    kind = torch.full(hidden.shape, PARTIAL, dtype=torch.int8)
    kind[full] = FULL
    kind[hidden] = HIDDEN
    return kind
