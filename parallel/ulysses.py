"""Ulysses: all-to-all from sequence shards to head shards, full-sequence attention, back.

Invariant.  Before the kernel, rank u of a degree-U group holds every group member's rows
(in member order, positions `cat(indices)`) for its 1/U of the heads; attention over
heads is independent, so the kernel's result on those heads is exact, and the reverse
all-to-all returns each rank its rows for all heads.  GQA: when U exceeds Hkv, K/V heads
are repeated the fewest times that make their count a multiple of U (each query head
still meets its own K/V head); autograd sums the copies' gradients back.  Any degree that
divides Hq can serve any Hkv that way.

The exchange pieces (`HeadExchange`) are shared with the hybrid `usp` strategy.
"""
from __future__ import annotations

import math

import torch

import kernels

from .balance import pair_counts
from .base import ContextParallel, CPStats
from .comm import all_to_all, nbytes
from .perf.cost import memory_terms, whole_cut
from .perf.predict import collective, compute_s


class PositionOrder:
    """Rows taken into ascending position order and back (a no-op when already in order).

    The all-to-all gathers rows in member order; with a balancer that interleaves
    (headtail, per_doc) the kernel would otherwise see every document cut into pieces, each
    a separate tile with its own merge."""

    def __init__(self, pos: torch.Tensor):
        order = torch.argsort(pos)
        in_order = bool((order == torch.arange(order.numel())).all())
        self.order = None if in_order else order
        self.unorder = None if in_order else torch.argsort(order)
        self.pos = pos[order]

    def rows(self, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """[T, ...] tensors in ascending position order."""
        return xs if self.order is None else tuple(x.index_select(0, self.order) for x in xs)

    def back(self, out: torch.Tensor, lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """out [T, H, D] and lse [H, T] back in the original row order."""
        if self.order is None:
            return out, lse
        return out.index_select(0, self.unorder), lse.index_select(1, self.unorder)


class HeadExchange:
    """All-to-all between U ranks (global `peers`, this one at `me`) over `group` (or P2P)."""

    def __init__(self, peers, me, group):
        self.peers, self.me, self.group, self.degree = list(peers), me, group, len(peers)

    def kv_repeats(self, hq: int, hkv: int) -> int:
        """How many times each K/V head is repeated so the degree divides the K/V heads:
        U / gcd(Hkv, U), giving lcm(Hkv, U) heads, which divides Hq whenever U does."""
        if hq % self.degree:
            raise ValueError(
                f"ulysses_degree={self.degree} must divide the query heads Hq={hq}; choose a degree dividing {hq}"
            )
        return self.degree // math.gcd(hkv, self.degree)

    def scatter_heads(self, q, k, v):
        """Local rows of q, k, v -> this rank's heads over the group's rows (K/V heads
        repeated as `kv_repeats` says); returns (qh, kh, vh, k as sent)."""
        rep = self.kv_repeats(q.shape[1], k.shape[1])
        if rep > 1:
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        return self.to_heads(q), self.to_heads(k), self.to_heads(v), k

    def kv_heads(self, hq: int, hkv: int) -> torch.Tensor:
        """Global index of each K/V head this rank holds after `scatter_heads` (a repeated
        head keeps its index), for masks that depend on the head (S2)."""
        rep = self.kv_repeats(hq, hkv)
        per = hkv * rep // self.degree
        return torch.div(torch.arange(self.me * per, (self.me + 1) * per), rep, rounding_mode="floor")

    def to_heads(self, x: torch.Tensor) -> torch.Tensor:
        """[T, H, D] local rows -> [U*T, H/U, D]: every member's rows, this rank's heads."""
        t, h, d = x.shape
        chunks = x.reshape(t, self.degree, h // self.degree, d).transpose(0, 1).contiguous()
        return all_to_all(chunks, group=self.group, peers=self.peers, me=self.me).view(-1, h // self.degree, d)

    def to_rows(self, y: torch.Tensor) -> torch.Tensor:
        """Inverse of `to_heads`: [U*T, H/U, D] -> [T, H, D]."""
        n, h, d = y.shape
        back = all_to_all(y.contiguous().view(self.degree, n // self.degree, h, d), group=self.group,
                          peers=self.peers, me=self.me)
        return back.transpose(0, 1).reshape(n // self.degree, h * self.degree, d)

    def lse_to_rows(self, lse: torch.Tensor) -> torch.Tensor:
        """[H/U, U*T] lse of this rank's heads -> [H, T] of its own rows."""
        return self.to_rows(lse.t().unsqueeze(-1)).squeeze(-1).t()

    def bytes_moved(self, q, k) -> int:
        """Bytes one rank sends (= receives) in one pass: q, k, v (K/V heads as repeated)
        to head shards, the output back.  The backward moves the same amounts reversed."""
        return (self.degree - 1) * (2 * nbytes(q.shape, q.dtype) + 2 * nbytes(k.shape, k.dtype)) // self.degree


class Ulysses(ContextParallel):
    name = "ulysses"
    sweeps_balancers = False  # the benchmark runs it on its default balancer only

    def __init__(self, mask, seqlen, *, group=None, mesh=None, balancer=None, **options):
        super().__init__()
        self.setup(mask, seqlen, group, balancer, options, mesh=mesh)
        heads = (options.pop("num_heads", None), options.pop("num_kv_heads", None))
        self.reject_unknown(options, self.name)
        self.exchange = HeadExchange(self.ranks, self.rank, self.group)
        if heads[0] is not None:
            self.exchange.kv_repeats(heads[0], heads[1] or heads[0])
        self.all_pos = torch.cat(self.indices)
        self.total_pairs = pair_counts(mask, self.all_pos, self.all_pos)
        self.sort = PositionOrder(self.all_pos)  # the kernel runs on the rows in position order

    def compute(self, q, k, v, with_lse=True):
        self.check_inputs(q, k, v)
        kv_heads = self.exchange.kv_heads(q.shape[1], k.shape[1])
        qh, kh, vh, k = self.exchange.scatter_heads(q, k, v)
        qh, kh, vh = self.sort.rows(qh, kh, vh)
        out, lse = self.sort.back(*kernels.attention(qh, kh, vh, self.mask, q_pos=self.sort.pos, k_pos=self.sort.pos,
                                                     scale=self.scale, backend=self.backend, kv_heads=kv_heads))
        lse_rows = self.exchange.lse_to_rows(lse) if with_lse else None
        moved = self.exchange.bytes_moved(q, k)
        self.stats = CPStats([moved] * self.world, [moved] * self.world, [self.total_pairs // self.world] * self.world)
        self.stats.extra["bytes_bwd_sent"] = self.stats.extra["bytes_bwd_recv"] = [moved] * self.world
        return self.exchange.to_rows(out), lse_rows

    @classmethod
    def head_split(cls, world, options):
        return world

    @classmethod
    def auto_candidates(cls, world, mask, lay, balancer=None):
        """Its default balancer; the head counts let it check the split at build."""
        return [(None, {"num_heads": lay.hq, "num_kv_heads": lay.hkv})]

    @classmethod
    def cost_bytes(cls, lay, world, **_):
        """All-to-all keeps 1/P of every tensor at home; Q, K, V out and the output back
        (bwd: dO out, dQ, dK, dV back): (P-1) * L * (2 Hq + 2 Hkv') * D * elem // P each way,
        Hkv' = Hkv repeated to a multiple of P."""
        hkv = lay.hkv * (world // math.gcd(lay.hkv, world))
        one_way = (world - 1) * (lay.seqlen // world) * (2 * lay.hq + 2 * hkv) * lay.head_dim * lay.elem_bytes // world
        return {"fwd": [one_way] * world, "bwd": [one_way] * world}

    @classmethod
    def cost_kernel_cut(cls, mask, seqlen, rows, num_heads=None, num_kv_heads=None, **_):
        """The whole sequence in ascending order, for the rank's share of the heads (S2 masks:
        each rank's own KV heads, as `HeadExchange.kv_heads` hands them to the kernel)."""
        world = len(rows)
        if mask.heads is None or num_kv_heads is None:
            return whole_cut(mask, seqlen, world, num_kv_heads)
        heads = [HeadExchange(range(world), r, None).kv_heads(num_heads or num_kv_heads, num_kv_heads)
                 for r in range(world)]
        return whole_cut(mask, seqlen, world, head_sets=heads)

    @classmethod
    def cost_memory(cls, lay, world, **_):
        """The full sequence for Hq/P heads (Hkv' = Hkv repeated to a multiple of P): fwd
        Q/K/V and out kept for backward;  bwd + dO, dQ/dK/dV, the kernel's dq_a."""
        m, d, e = memory_terms(lay, world), lay.head_dim, lay.elem_bytes
        hkv = lay.hkv * (world // math.gcd(lay.hkv, world))
        qf, kvf = lay.seqlen * (lay.hq // world) * d * e, 2 * lay.seqlen * (hkv // world) * d * e
        saved = 2 * qf + kvf + (lay.hq // world) * lay.seqlen * lay.acc_bytes  # Q, out, K/V, lse head-sharded
        return saved + m["q"], saved + m["q"] + 2 * qf + kvf + qf // e * lay.acc_bytes + m["grads"]

    @classmethod
    def cost_time(cls, pairs, lay, hw, **_):
        p, total = len(pairs), sum(pairs)
        sent = cls.cost_bytes(lay, p)
        return (collective(sent["fwd"][0], p, hw, kind="a2a") + compute_s(total / p, lay.hq, lay, hw, False)
                + hw.call_overhead,
                collective(sent["bwd"][0], p, hw, kind="a2a") + compute_s(total / p, lay.hq, lay, hw, True)
                + hw.call_overhead)
