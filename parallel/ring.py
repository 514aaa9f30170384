"""Ring attention: K/V blocks travel around the CP ring while every rank keeps its queries.

Invariant.  At step s, ring position r holds the K/V block of position j = r - s (mod P)
and merges softmax(q_r k_j^T) v_j into its running (out, lse) in float32 (exact: partials
over disjoint key sets combine by lse).  Only the Hkv heads travel, packed as one [2, T,
Hkv, D] buffer; the transfer for step s+1 is posted before step s's compute (double
buffer) so communication hides behind it.  A block travels only as far as the last rank
whose queries the mask lets see it (`reach[j]`): causal, document and window masks skip
hidden blocks and stop blocks that are out of every later query's reach.

Backward is a second ring pass: K/V go round again, and from the first hop on a float32
dK/dV accumulator of block j travels with it, each rank adding its contribution from
kernels.backward (which takes the final out/lse of its query rows); the last rank in reach
sends it straight home, where it is added to the home rank's own contribution.  Tags keep
the three kinds of messages apart for gloo (kv: s, dkv: P + s, home: 2P + 1); both sides
post them in the same order, which is how NCCL matches them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

import kernels

from .balance import default_balancer, pair_matrix
from .base import ContextParallel, CPStats
from .comm import Pending, acc_dtype, nbytes, p2p
from .perf.cost import memory_terms, ring_reach, steps_cut
from .perf.predict import compute_s, ring_time


@dataclass
class RingPlan:
    """Who holds what on one ring; identical on every member, built without communication."""

    rank: int                       # this rank's ring position
    peers: list[int]                # global ranks in ring order
    positions: list[torch.Tensor]   # global positions of each position's rows
    pairs: list[list[int]]          # pairs[r][j]: allowed pairs of r's queries with j's keys
    reach: list[int]                # last ring offset at which block j is needed (-1: never)

    @classmethod
    def build(cls, mask, positions, rank, peers) -> "RingPlan":
        pairs = pair_matrix(mask, positions)
        n = len(positions)
        reach = [max([t for t in range(n) if pairs[(j + t) % n][j] > 0], default=-1) for j in range(n)]
        return cls(rank, list(peers), positions, pairs, reach)

    def sends(self, r: int, s: int) -> bool:
        """Does position r pass its step-s block on to r + 1?"""
        return s + 1 <= self.reach[(r - s) % len(self.peers)]

    def hops(self, r: int) -> dict[str, int]:
        """Messages of position r: K/V blocks sent/received (forward; again in backward),
        dK/dV accumulators passed on/received, and accumulators returned home out/in."""
        n = len(self.peers)
        return {
            "kv_out": sum(self.sends(r, s) for s in range(n)),
            "kv_in": sum(self.sends((r - 1) % n, s) for s in range(n)),
            "dkv_out": sum(self.sends(r, s) for s in range(1, n)),
            "dkv_in": sum(self.sends((r - 1) % n, s) for s in range(1, n)),
            "home_out": sum(1 for j in range(n) if self.reach[j] > 0 and (j + self.reach[j]) % n == r),
            "home_in": int(self.reach[r] > 0),
        }


def ring_forward(plan: RingPlan, q, kv, mask, scale, backend, kv_heads=None):
    n, r = len(plan.peers), plan.rank
    nxt, prv = plan.peers[(r + 1) % n], plan.peers[(r - 1) % n]
    out = lse = None
    cur, spare = kv, None
    for s in range(n):
        j = (r - s) % n
        recv = None
        if plan.sends((r - 1) % n, s):
            recv = spare if spare is not None else torch.empty_like(kv)
        pending = p2p([(cur, nxt, s + 1)] if cur is not None and plan.sends(r, s) else [],
                      [(recv, prv, s + 1)] if recv is not None else [])
        if cur is not None and plan.pairs[r][j] > 0:
            o, l = kernels.forward(q, cur[0], cur[1], mask, q_pos=plan.positions[r], k_pos=plan.positions[j],
                                   scale=scale, backend=backend, kv_heads=kv_heads)
            out, lse = (o.to(acc_dtype(q.dtype)), l) if out is None else kernels.merge(out, lse, o, l)
        pending.wait()
        spare = cur if cur is not None and cur is not kv else None
        cur = recv
    if out is None:
        out = torch.zeros(q.shape, dtype=acc_dtype(q.dtype), device=q.device)
        lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=acc_dtype(q.dtype), device=q.device)
    return out.to(q.dtype), lse


def ring_backward(plan: RingPlan, dout, q, kv, out, lse, dlse, mask, scale, backend, kv_heads=None):
    n, r = len(plan.peers), plan.rank
    nxt, prv = plan.peers[(r + 1) % n], plan.peers[(r - 1) % n]
    acc = acc_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    own = torch.zeros(kv.shape, dtype=acc, device=kv.device)
    home = torch.empty(kv.shape, dtype=acc, device=kv.device) if plan.reach[r] > 0 else None
    cur, spare, dkv_in, last = kv, None, None, Pending([])
    for s in range(n):
        j = (r - s) % n
        recv = None
        if plan.sends((r - 1) % n, s):
            recv = spare if spare is not None else torch.empty_like(kv)
        kv_pending = p2p([(cur, nxt, s + 1)] if cur is not None and plan.sends(r, s) else [],
                         [(recv, prv, s + 1)] if recv is not None else [])
        sends, recvs = [], []
        if cur is not None:
            grads = None
            if plan.pairs[r][j] > 0:
                grads = kernels.backward(dout, q, cur[0], cur[1], out, lse, mask, q_pos=plan.positions[r],
                                         k_pos=plan.positions[j], scale=scale, dlse=dlse, backend=backend,
                                         kv_heads=kv_heads)
                dq += grads[0]
            if s == 0:
                dkv = own
            elif s == 1:
                dkv = torch.zeros(kv.shape, dtype=acc, device=kv.device)
            else:
                last.wait()  # the accumulator arriving with this block
                dkv = dkv_in
            if grads is not None:
                dkv[0] += grads[1]
                dkv[1] += grads[2]
            if s > 0:
                sends.append((dkv, nxt, n + s + 1) if plan.sends(r, s) else (dkv, plan.peers[j], 2 * n + 1))
        if s > 0 and plan.sends((r - 1) % n, s):
            dkv_in = torch.empty(kv.shape, dtype=acc, device=kv.device)
            recvs.append((dkv_in, prv, n + s + 1))
        if s > 0 and s == plan.reach[r]:
            recvs.append((home, plan.peers[(r + s) % n], 2 * n + 1))
        # sends and receives of one exchange go in one batch (NCCL needs that to avoid a
        # ring deadlock, and matches P2P messages by order, so both sides post in step order)
        batch = p2p(sends, recvs)
        kv_pending.wait()
        last.wait()
        last = batch
        spare = cur if cur is not None and cur is not kv else None
        cur = recv
    last.wait()
    if home is not None:
        own += home
    return dq.to(q.dtype), own[0].to(kv.dtype), own[1].to(kv.dtype)


class RingAttention(torch.autograd.Function):
    """kv_heads: global index of each K/V head given (usp holds a subset; None: all)."""

    @staticmethod
    def forward(ctx, q, k, v, plan, mask, scale, backend, kv_heads=None):
        kv = torch.stack([k, v])
        out, lse = ring_forward(plan, q, kv, mask, scale, backend, kv_heads)
        ctx.save_for_backward(q, kv, out, lse)
        ctx.args = (plan, mask, scale, backend, kv_heads)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, kv, out, lse = ctx.saved_tensors
        if dlse is not None and not bool(dlse.any()):
            dlse = None
        plan, mask, scale, backend, kv_heads = ctx.args
        dq, dk, dv = ring_backward(plan, dout.contiguous(), q, kv, out, lse, dlse, mask, scale, backend, kv_heads)
        return dq, dk, dv, None, None, None, None, None


def ring_stats(plan: RingPlan, k, heads_fraction: float = 1.0) -> CPStats:
    """Bytes per ring position: forward K/V hops; backward (extra['bytes_bwd_*']) the K/V
    hops again plus the float32 dK/dV accumulators (passed on, and returned home).  pairs
    are token pairs times the fraction of the heads computed here."""
    n = len(plan.peers)
    block = nbytes((2, *k.shape), k.dtype)
    acc_block = nbytes((2, *k.shape), acc_dtype(k.dtype))
    hops = [plan.hops(r) for r in range(n)]
    stats = CPStats(
        bytes_sent=[h["kv_out"] * block for h in hops],
        bytes_recv=[h["kv_in"] * block for h in hops],
        pairs=[int(sum(plan.pairs[r]) * heads_fraction) for r in range(n)],
    )
    stats.extra["bytes_bwd_sent"] = [h["kv_out"] * block + (h["dkv_out"] + h["home_out"]) * acc_block for h in hops]
    stats.extra["bytes_bwd_recv"] = [h["kv_in"] * block + (h["dkv_in"] + h["home_in"]) * acc_block for h in hops]
    return stats


class Ring(ContextParallel):
    name = "ring"

    def __init__(self, mask, seqlen, *, group=None, mesh=None, balancer=None, **options):
        super().__init__()
        self.setup(mask, seqlen, group, balancer, options, mesh=mesh)
        self.reject_unknown(options, self.name)
        self.plan = RingPlan.build(mask, self.indices, self.rank, self.ranks)

    def compute(self, q, k, v, with_lse=True):
        self.check_inputs(q, k, v)
        out, lse = RingAttention.apply(q, k, v, self.plan, self.mask, self.scale, self.backend)
        self.stats = ring_stats(self.plan, k)
        return out, lse

    @classmethod
    def cost_bytes(cls, lay, world, *, reach=None, mask=None, rows=None, **_):
        """Rank r forwards its current block at `h_r` of the P steps (every step but the last
        when every block is needed by every rank; fewer when the mask lets a block stop
        early, see `ring_reach`, computed from `mask` and `rows` when given):  fwd h_r *
        block;  bwd h_r * block (K/V again) + (d_r + o_r) * acc, d_r = the hops after the
        first (a block's dK/dV accumulator starts at its first remote rank), o_r =
        accumulators it returns home.  block = K and V of L = T / P tokens, acc = the same in
        float32.  Every block needed everywhere: fwd (P-1) block, bwd (P-1)(block + acc)."""
        if reach is None and mask is not None and rows is not None:
            reach = ring_reach(mask, lay.seqlen, rows)
        m = memory_terms(lay, world)
        plan = RingPlan(0, list(range(world)), [], [], [world - 1] * world if reach is None else list(reach))
        hops = [plan.hops(r) for r in range(world)]
        return {"fwd": [h["kv_out"] * m["kv"] for h in hops],
                "bwd": [h["kv_out"] * m["kv"] + (h["dkv_out"] + h["home_out"]) * m["kva"] for h in hops]}

    @classmethod
    def cost_kernel_cut(cls, mask, seqlen, rows, **_):
        """The rank's rows against every rank's rows, one call per ring step."""
        return [steps_cut(mask, q, rows) for q in rows]

    @classmethod
    def cost_memory(cls, lay, world, **_):
        """fwd float32 out/lse accumulators, the K/V block held and the one arriving, one
        block's partial out;  bwd + K/V held and arriving, the dK/dV accumulator arriving and
        the one being sent, the home accumulator, dq_a, the kernel's dq_a."""
        m = memory_terms(lay, world)
        fwd = m["qa"] + m["lse"] + 2 * m["kv"] + m["q"]
        return fwd, m["q"] + m["lse"] + 2 * m["kv"] + 3 * m["kva"] + 2 * m["qa"] + m["grads"]

    @classmethod
    def cost_time(cls, pairs, lay, hw, **_):
        worst = max(pairs)
        return ring_time(compute_s(worst, lay.hq, lay, hw, False), compute_s(worst, lay.hq, lay, hw, True),
                         lay, len(pairs), hw, 1)

    @classmethod
    def auto_candidates(cls, world, mask, lay, balancer=None):
        """The mask's default balancer and contiguous (or only the one auto was given)."""
        if balancer is not None:
            return [(balancer, {})]
        return [(b, {}) for b in dict.fromkeys([default_balancer(mask), "contiguous"])]
