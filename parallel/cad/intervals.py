"""Sets of token positions as sorted, disjoint half-open intervals [lo, hi).

CAD moves contiguous ranges (query shards, key prefixes, windows), so a server's rows are a
few intervals; counting and routing on intervals keeps planning independent of seqlen.
"""
from __future__ import annotations

import torch


def union(intervals) -> list[tuple[int, int]]:
    """Sorted, merged, non-empty intervals covering the same positions."""
    out: list[list[int]] = []
    for lo, hi in sorted(iv for iv in intervals if iv[1] > iv[0]):
        if out and lo <= out[-1][1]:
            out[-1][1] = max(out[-1][1], hi)
        else:
            out.append([lo, hi])
    return [(lo, hi) for lo, hi in out]


def clip(intervals, lo: int, hi: int) -> list[tuple[int, int]]:
    """The parts of merged `intervals` inside [lo, hi)."""
    return [(max(a, lo), min(b, hi)) for a, b in intervals if min(b, hi) > max(a, lo)]


def size(intervals) -> int:
    return sum(b - a for a, b in intervals)


def uncovered(lo: int, hi: int, covered) -> int:
    """How many positions of [lo, hi) the merged `covered` intervals miss."""
    return (hi - lo) - size(clip(covered, lo, hi))


def positions(intervals, offset: int = 0) -> torch.Tensor:
    """LongTensor of every position in the intervals, ascending, minus `offset`."""
    if not intervals:
        return torch.zeros(0, dtype=torch.long)
    return torch.cat([torch.arange(a - offset, b - offset) for a, b in intervals])
