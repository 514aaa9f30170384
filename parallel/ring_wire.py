"""What a ring block carries on each hop: the whole block, or for masks that depend on the
KV head (S2 `heads`) only the (row, KV head) entries some later query needs.

Under S2 a KV head sees, beyond its local band, only the key blocks on its stride, so most
rows of a remote block are needed by few heads.  Entries: block j's K/V `[2, L, Hkv, D]`
is read as the table `[2, L * Hkv, D]` (a view), entry e = row * Hkv + head; a compacted
block is the entries of a sorted index list, in that order (each head's rows stay in
position order, as the kernel's tiling likes them).

Invariant.  need(j, t): the entries of block j that some query of its holder on hop t
(ring position j + t) may see under the mask, exactly (`block_need`).  On hop t block j
carries travel(j, t) = the union of need(j, u) over u = t .. reach[j], what this holder
and every later one needs, so each hop only drops entries of the one before.  The dK/dV
accumulator that hop t passes on (or sends home from the last hop) holds grads(j, t) =
the union of need(j, u) over u = 1 .. t, the entries the holders so far wrote.  A holder
runs the kernel on need(j, t) only, one call per run of KV heads with the same rows, with
those rows' global key positions: the kernel sees exactly the keys of the whole block that
matter, so results and gradients are those of the uncompacted ring.
"""
from __future__ import annotations

from dataclasses import replace
from typing import NamedTuple

import torch

from .balance import key_intervals, sink_intervals


def _cover(seqlen: int, intervals) -> torch.Tensor:
    """BoolTensor [seqlen]: positions inside at least one of the inclusive [lo, hi] intervals
    (a difference array, O(seqlen + intervals))."""
    diff = torch.zeros(seqlen + 1, dtype=torch.long)
    for lo, hi in intervals:
        lo, hi = lo.clamp(0, seqlen), hi.clamp(-1, seqlen - 1)
        ok = lo <= hi
        diff.index_add_(0, lo[ok], torch.ones_like(lo[ok]))
        diff.index_add_(0, hi[ok] + 1, -torch.ones_like(hi[ok]))
    return diff.cumsum(0)[:seqlen] > 0


def seen_keys(mask, q_pos: torch.Tensor, seqlen: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Which of the keys 0..seqlen-1 some query at q_pos sees, for a mask with `heads`:
    (any_head, every_head), BoolTensors [seqlen].  any_head: under the mask without heads
    (what a dense head sees); every_head: whatever the head, i.e. prefix and sink keys and
    keys in the local band.  By the formula of contract 1b, KV head h then needs key k iff
    every_head[k] or (any_head[k] and h sees k's block at any distance)."""
    q_pos = q_pos.to("cpu", torch.long)
    lo, hi = key_intervals(mask, q_pos)
    sinks = sink_intervals(mask, q_pos)
    local_lo, local_hi = key_intervals(replace(mask, prefix=None), q_pos)
    rel = mask.relative(q_pos)
    start = q_pos - rel
    b, lb = mask.heads.block, mask.heads.local_blocks
    band_lo = torch.maximum(local_lo, start + (torch.div(rel, b, rounding_mode="floor") - lb + 1) * b)
    prefix_hi = torch.where(mask.in_prefix(q_pos), start + mask.prefix_len(q_pos) - 1, start - 1)
    any_head = _cover(seqlen, [(lo, hi), sinks])
    every_head = _cover(seqlen, [(band_lo, local_hi), sinks, (start, prefix_hi)])
    return any_head, every_head


def head_sees(mask, k_pos: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
    """BoolTensor [L, Hkv]: KV head heads[h] sees the key at k_pos[k] at any distance (a
    dense head, or the key's block on its stride)."""
    rel = mask.relative(k_pos.to("cpu", torch.long))
    return mask.heads.sees_block(heads.view(1, -1), rel.view(-1, 1))


def block_need(mask, seen: tuple[torch.Tensor, torch.Tensor], k_pos: torch.Tensor, heads: torch.Tensor):
    """BoolTensor [L * Hkv] in entry order: entries of the block at k_pos (KV heads `heads`,
    global indices) that the queries summarised by `seen` (`seen_keys`) need."""
    any_head, every_head = seen
    k_pos = k_pos.to("cpu", torch.long)
    sees = head_sees(mask, k_pos, heads)
    return (every_head[k_pos].view(-1, 1) | (any_head[k_pos].view(-1, 1) & sees)).flatten()


class Call(NamedTuple):
    """One kernel call of a block's holder: K/V heads `kv` (a slice of the local heads, with
    their query heads; global indices `kv_heads`), keys at global positions `k_pos`;
    `keys` / `acc`: entry numbers [n, g] of those keys in the block as carried and in the
    accumulator (None: the whole uncompacted block)."""

    kv: slice
    kv_heads: torch.Tensor | None
    k_pos: torch.Tensor
    keys: torch.Tensor | None = None
    acc: torch.Tensor | None = None


class WholeBlocks:
    """Masks without heads: every hop carries the whole block; one kernel call per block."""

    def __init__(self, plan, entries: int, kv_heads: torch.Tensor | None = None):
        self.plan, self.block_entries, self.kv_heads = plan, entries, kv_heads

    def entries(self, j: int, t: int) -> int:
        """Entries (row, KV head) of block j's K/V on hop t >= 1."""
        return self.block_entries

    def acc_entries(self, j: int, t: int) -> int:
        """Entries of the dK/dV accumulator of block j that hop t >= 1 passes on."""
        return self.block_entries

    def shape(self, kv: torch.Tensor, j: int, t: int) -> tuple[int, ...]:
        return tuple(kv.shape)

    def acc_shape(self, kv: torch.Tensor, j: int, t: int) -> tuple[int, ...]:
        return tuple(kv.shape)

    def onward(self, buf: torch.Tensor, j: int, t: int) -> torch.Tensor:
        """What hop t sends on to hop t + 1, from block j as held on hop t (t=0: the owner's)."""
        return buf

    def widen(self, acc: torch.Tensor, j: int, t: int) -> torch.Tensor:
        """The accumulator arriving from hop t - 1, on hop t's entries."""
        return acc

    def calls(self, j: int, t: int) -> list[Call]:
        return [Call(slice(None), self.kv_heads, self.plan.positions[j])]

    @staticmethod
    def keys(buf: torch.Tensor, call: Call) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of one call from the block as carried."""
        if call.keys is None:
            return buf[0][:, call.kv], buf[1][:, call.kv]
        return buf[0][call.keys], buf[1][call.keys]

    @staticmethod
    def add_grads(acc: torch.Tensor, call: Call, dk: torch.Tensor, dv: torch.Tensor) -> None:
        if call.acc is None:
            acc[0][:, call.kv] += dk
            acc[1][:, call.kv] += dv
            return
        d = acc.shape[-1]
        acc[0].index_add_(0, call.acc.flatten(), dk.reshape(-1, d).to(acc.dtype))
        acc[1].index_add_(0, call.acc.flatten(), dv.reshape(-1, d).to(acc.dtype))

    def add_home(self, own: torch.Tensor, home: torch.Tensor, j: int) -> None:
        """Add block j's accumulator, returned from its last hop, to the owner's dK/dV."""
        own += home


class HeadRows(WholeBlocks):
    """Masks with heads: hop t carries travel(j, t), accumulators grads(j, t) (module docstring).

    Built from every entry's first and last hop (`first`, `last`: [L * Hkv] per block; an
    entry is in travel(j, t) iff last >= t and in grads(j, t) iff first <= t), which each
    ring position's `seen_keys` update once over all keys, so a plan costs O(P * seqlen)
    time and O(seqlen * Hkv) memory; entry lists are formed only for this rank's hops."""

    def __init__(self, plan, mask, kv_heads: torch.Tensor):
        n, hkv = len(plan.peers), kv_heads.numel()
        super().__init__(plan, 0, kv_heads)
        self.mask, self.hkv, self._calls, self._lists, self.mine = mask, hkv, {}, {}, None
        seqlen = sum(p.numel() for p in plan.positions)  # the positions partition 0..seqlen-1
        owner = torch.empty(seqlen, dtype=torch.int32)  # int32: hop arithmetic is most of the cost
        for j, p in enumerate(plan.positions):
            owner[p.to("cpu", torch.long)] = j
        reach = torch.tensor(plan.reach, dtype=torch.int32)[owner.long()]
        # per key, for [any head, every head]: the last hop whose holder sees it (0: none)
        # and the first (n: never)
        last = torch.zeros(2, seqlen, dtype=torch.int32)
        first = torch.full((2, seqlen), n, dtype=torch.int32)
        for r in range(n):
            hop = (r - owner) % n
            held = (hop > 0) & (hop <= reach)
            if not bool(held.any()):
                continue
            seen = seen_keys(mask, plan.positions[r], seqlen)
            self.mine = seen if r == plan.rank else self.mine
            sees = torch.stack(seen) & held
            torch.maximum(last, sees * hop, out=last)
            torch.minimum(first, torch.where(sees, hop, n), out=first)
        self.last, self.first, self.travel_sizes, self.grads_sizes = {}, {}, {}, {}
        for j in range(n):
            pos = plan.positions[j].to("cpu", torch.long)
            sees = head_sees(mask, pos, kv_heads)
            self.last[j] = torch.where(sees, last[0, pos].view(-1, 1), last[1, pos].view(-1, 1)).flatten()
            self.first[j] = torch.where(sees, first[0, pos].view(-1, 1), first[1, pos].view(-1, 1)).flatten()
            by_last = torch.bincount(self.last[j].long(), minlength=n + 1)
            by_first = torch.bincount(self.first[j].long(), minlength=n + 1)
            self.travel_sizes[j] = by_last.flip(0).cumsum(0).flip(0).tolist()  # [t]: entries with last >= t
            self.grads_sizes[j] = by_first.cumsum(0).tolist()                   # [t]: entries with first <= t

    def travel(self, j: int, t: int) -> torch.Tensor:
        """Entry numbers block j carries on hop t, ascending."""
        if ("travel", j, t) not in self._lists:
            self._lists["travel", j, t] = (self.last[j] >= t).nonzero().flatten()
        return self._lists["travel", j, t]

    def grads(self, j: int, t: int) -> torch.Tensor:
        """Entry numbers of block j's dK/dV accumulator leaving hop t, ascending."""
        if ("grads", j, t) not in self._lists:
            self._lists["grads", j, t] = (self.first[j] <= t).nonzero().flatten()
        return self._lists["grads", j, t]

    def entries(self, j: int, t: int) -> int:
        return self.travel_sizes[j][t]

    def acc_entries(self, j: int, t: int) -> int:
        return self.grads_sizes[j][t]

    def shape(self, kv, j, t):
        return (2, self.entries(j, t), kv.shape[-1])

    def acc_shape(self, kv, j, t):
        return (2, self.acc_entries(j, t), kv.shape[-1])

    def onward(self, buf, j, t):
        if t == 0:
            return buf.flatten(1, 2)[:, self.travel(j, 1)]
        return buf[:, torch.searchsorted(self.travel(j, t), self.travel(j, t + 1))]

    def widen(self, acc, j, t):
        wide = acc.new_zeros((2, self.acc_entries(j, t), acc.shape[-1]))
        wide[:, torch.searchsorted(self.grads(j, t), self.grads(j, t - 1))] = acc
        return wide

    def calls(self, j, t):
        if t == 0:
            return super().calls(j, t)
        if (j, t) not in self._calls:
            self._calls[j, t] = self._head_calls(j, t)
        return self._calls[j, t]

    def _head_calls(self, j: int, t: int) -> list[Call]:
        """One call per run of KV heads that need the same rows of block j (this rank holds
        it on hop t)."""
        need = block_need(self.mask, self.mine, self.plan.positions[j], self.kv_heads).view(-1, self.hkv)
        calls, h0 = [], 0
        while h0 < self.hkv:
            h1 = h0 + 1
            while h1 < self.hkv and torch.equal(need[:, h1], need[:, h0]):
                h1 += 1
            rows = need[:, h0].nonzero().flatten()
            if rows.numel():
                entries = rows.view(-1, 1) * self.hkv + torch.arange(h0, h1).view(1, -1)
                calls.append(Call(slice(h0, h1), self.kv_heads[h0:h1], self.plan.positions[j][rows],
                                  torch.searchsorted(self.travel(j, t), entries),
                                  torch.searchsorted(self.grads(j, t), entries)))
            h0 = h1
        return calls

    def add_home(self, own, home, j):
        own.flatten(1, 2).index_add_(1, self.grads(j, self.plan.reach[j]), home)
