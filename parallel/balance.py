"""Sequence balancers: which global rows each CP rank owns, and how much attention that is.

A balancer is a pure function `(seqlen, world, doc_lens) -> [LongTensor per rank]` of
global row indices, ascending on every rank, that together cover every row exactly once
with the same count on every rank (equal shards are what lets ring, all-gather and
Ulysses exchange fixed-size buffers).

- contiguous: rank r owns [r*T/P, (r+1)*T/P).  Balanced for full/document masks only.
- headtail (zigzag): 2P equal chunks; rank r owns chunks r and 2P-1-r, so under a causal
  mask every rank holds one cheap and one expensive chunk.
- stripe: stripes of `stripe` tokens dealt round-robin (stripe=1: token i -> rank i % P).
- per_doc: head-tail inside every document.  A document of length L gives each rank two
  mirrored pieces of floor(L / 2P) tokens; the rows left over (the middle L mod 2P of every
  document, so whole documents shorter than 2P) are pooled in global order and dealt
  head-tail as one sequence, which keeps shards equal.

Default (balancer=None): per_doc for causal/window masks with documents, headtail for
causal/window masks without, contiguous otherwise.

`imbalance` is the one measure of how uneven per-rank work is (max / mean).

`pair_counts` / `pair_matrix` count the (query, key) pairs a mask allows between row sets
without a dense matrix: for every query the allowed keys form one interval of positions
(document start or window start .. query or document end; the whole prefix for a query
inside it) plus, with sinks, the document's first tokens, so a binary search, or a
running count of each rank's keys, counts them.
"""
from __future__ import annotations

import torch

BALANCERS = ("contiguous", "headtail", "stripe", "per_doc")


def _check(name: str, seqlen: int, world: int, multiple: int) -> None:
    if not isinstance(seqlen, int) or seqlen < 1:
        raise ValueError(f"seqlen={seqlen!r} must be a positive integer")
    if seqlen % multiple:
        raise ValueError(
            f"balancer={name!r} needs seqlen divisible by {multiple} for a CP size of {world}, got "
            f"seqlen={seqlen}; pad the sequence to a multiple of {multiple} or pick another balancer"
        )


def contiguous(seqlen: int, world: int, doc_lens=None) -> list[torch.Tensor]:
    _check("contiguous", seqlen, world, world)
    return list(torch.arange(seqlen).view(world, -1).unbind(0))


def headtail(seqlen: int, world: int, doc_lens=None) -> list[torch.Tensor]:
    _check("headtail", seqlen, world, 2 * world)
    chunks = torch.arange(seqlen).view(2 * world, -1)
    return [torch.cat([chunks[r], chunks[2 * world - 1 - r]]) for r in range(world)]


def stripe(seqlen: int, world: int, doc_lens=None, *, stripe: int = 1) -> list[torch.Tensor]:
    if not isinstance(stripe, int) or stripe < 1:
        raise ValueError(f"stripe={stripe!r} must be a positive integer (tokens per stripe)")
    _check("stripe", seqlen, world, world * stripe)
    stripes = torch.arange(seqlen).view(-1, world, stripe)  # [round, rank, token]
    return [stripes[:, r].reshape(-1) for r in range(world)]


def per_doc(seqlen: int, world: int, doc_lens=None) -> list[torch.Tensor]:
    _check("per_doc", seqlen, world, 2 * world)
    lens = [seqlen] if doc_lens is None else [int(n) for n in doc_lens]
    if sum(lens) != seqlen:
        raise ValueError(f"per_doc: document lengths sum to {sum(lens)} but seqlen={seqlen}")
    owned = [[] for _ in range(world)]
    leftover = []
    start = 0
    for length in lens:
        piece = length // (2 * world)
        for r in range(world):
            owned[r].append(torch.arange(start + r * piece, start + (r + 1) * piece))
            owned[r].append(torch.arange(start + length - (r + 1) * piece, start + length - r * piece))
        leftover.append(torch.arange(start + world * piece, start + length - world * piece))
        start += length
    pool = torch.cat(leftover)
    for r, rows in enumerate(headtail(pool.numel(), world) if pool.numel() else [None] * world):
        if rows is not None:
            owned[r].append(pool[rows])
    return [torch.sort(torch.cat(rows)).values for rows in owned]


def imbalance(values) -> float:
    """max / mean of per-rank work (1.0 for no work at all)."""
    vals = [float(v) for v in values]
    mean = sum(vals) / max(len(vals), 1)
    return max(vals) / mean if mean > 0 else 1.0


def default_balancer(mask) -> str:
    if mask.is_causal:
        return "per_doc" if mask.has_docs else "headtail"
    return "contiguous"


def assign(balancer: str | None, seqlen: int, world: int, mask, **options) -> list[torch.Tensor]:
    """Rows of every rank for the named balancer (None: the mask's default)."""
    name = default_balancer(mask) if balancer is None else balancer
    fns = {"contiguous": contiguous, "headtail": headtail, "stripe": stripe, "per_doc": per_doc}
    if name not in fns:
        raise ValueError(f"balancer={name!r} is unknown; choose one of {', '.join(BALANCERS)} (or None)")
    if mask.has_docs and mask.seqlen != seqlen:
        raise ValueError(f"the mask's documents cover {mask.seqlen} tokens but seqlen={seqlen}")
    extra = {"stripe": options["stripe"]} if name == "stripe" and "stripe" in options else {}
    return fns[name](seqlen, world, mask.doc_lens, **extra)


def key_intervals(mask, q_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inclusive [lo, hi] range of key positions each query position may attend, apart from
    its document's sink tokens (`sink_intervals`).  A query inside a prefix sees the whole
    prefix (and, bidirectional, its usual keys, which lie inside or start there).  With S2
    `heads` this is the union over the heads (the mask without heads, since heads cover)."""
    q_pos = q_pos.to("cpu", torch.long)
    big = torch.iinfo(torch.long).max
    lo = torch.zeros_like(q_pos)
    hi = torch.full_like(q_pos, big)
    starts = torch.zeros_like(q_pos)
    if mask.has_docs:
        n = mask.seqlen
        if q_pos.numel() and int(q_pos.max()) >= n:
            raise ValueError(f"positions reach {int(q_pos.max())} but the mask's documents cover seqlen={n}")
        lens = torch.tensor(mask.doc_lens)
        ends = torch.repeat_interleave(torch.cumsum(lens, 0) - 1, lens)
        starts = mask.cu_doc_starts[q_pos]
        lo, hi = starts, ends[q_pos]
    if mask.is_causal:
        hi = torch.minimum(hi, q_pos)
    if mask.window is not None:
        lo = torch.maximum(lo, q_pos - mask.window + 1)
    if mask.prefix is not None:
        inside = mask.in_prefix(q_pos)
        prefix_end = q_pos - mask.relative(q_pos) + mask.prefix_len(q_pos) - 1
        lo = torch.where(inside, starts, lo)
        hi = torch.where(inside, torch.maximum(hi, prefix_end), hi)
    return lo, hi


def sink_intervals(mask, q_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inclusive [lo, hi] of the sink keys each query sees (its document's first `sink`
    tokens up to itself; hi < lo: none)."""
    q_pos = q_pos.to("cpu", torch.long)
    if mask.sink is None:
        return torch.zeros_like(q_pos), torch.full_like(q_pos, -1)
    start = q_pos - mask.relative(q_pos)
    return start, torch.minimum(start + mask.sink - 1, q_pos)


def _count(keys_sorted: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> int:
    n = torch.searchsorted(keys_sorted, hi, right=True) - torch.searchsorted(keys_sorted, lo, right=False)
    return int(n.clamp_min(0).sum())


def _intervals(mask, q_pos: torch.Tensor) -> list[tuple[int, tuple[torch.Tensor, torch.Tensor]]]:
    """(sign, [lo, hi]) whose signed key counts add up to each query's allowed keys: the
    main interval, plus the sink interval, minus their overlap."""
    lo, hi = key_intervals(mask, q_pos)
    if mask.sink is None:
        return [(1, (lo, hi))]
    s_lo, s_hi = sink_intervals(mask, q_pos)
    return [(1, (lo, hi)), (1, (s_lo, s_hi)), (-1, (torch.maximum(lo, s_lo), torch.minimum(hi, s_hi)))]


def pair_counts(mask, q_pos: torch.Tensor, k_pos: torch.Tensor) -> int:
    """Allowed (query, key) pairs between the rows at q_pos and k_pos (any order); with S2
    `heads`, pairs some head allows."""
    keys = torch.sort(k_pos.to("cpu", torch.long)).values
    return sum(sign * _count(keys, lo, hi) for sign, (lo, hi) in _intervals(mask, q_pos))


def pair_matrix(mask, index: list[torch.Tensor]) -> list[list[int]]:
    """pairs[r][j]: allowed pairs between rank r's queries and rank j's keys, where `index`
    partitions the positions 0..T-1.  One pass: a running count of every rank's keys
    ([T+1, P]) turns each query's key intervals into its pairs with every rank.  With S2
    `heads`: pairs some head allows (what decides whether a block travels; an upper bound
    of the per-head work)."""
    seqlen, world = sum(int(ix.numel()) for ix in index), len(index)
    owner = torch.empty(seqlen, dtype=torch.long)
    for r, ix in enumerate(index):
        owner[ix.to("cpu", torch.long)] = r
    running = torch.zeros(seqlen + 1, world, dtype=torch.long)
    running[1:] = torch.nn.functional.one_hot(owner, world).cumsum(0)
    per_query = torch.zeros(seqlen, world, dtype=torch.long)
    for sign, (lo, hi) in _intervals(mask, torch.arange(seqlen)):
        lo, hi = lo.clamp(0, seqlen), hi.clamp(-1, seqlen - 1)
        per_query += sign * (running[hi + 1] - running[lo]).clamp_min(0)
    return [per_query[ix.to("cpu", torch.long)].sum(0).tolist() for ix in index]
