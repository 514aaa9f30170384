"""Ring attention: K/V blocks travel around the CP ring while every rank keeps its queries.

Invariant.  At step s, ring position r holds the K/V block of position j = r - s (mod P)
and merges softmax(q_r k_j^T) v_j into its running (out, lse) in float32 (exact: partials
over disjoint key sets combine by lse).  Only the Hkv heads travel, packed as one [2, T,
Hkv, D] buffer; the transfer for step s+1 is posted before step s's compute (double
buffer) so communication hides behind it.  A block travels only as far as the last rank
whose queries the mask lets see it (`reach[j]`): causal, document and window masks skip
hidden blocks and stop blocks that are out of every later query's reach.

Backward is a second ring pass: K/V go round again, and the dK/dV of block j (float32)
travel with it, each rank adding its contribution from kernels.backward (which takes the
final out/lse of its query rows); after the last rank in reach the accumulator is sent
straight home.  Tags keep the three kinds of messages apart: kv (s), dkv (P + s),
home (2P + 1).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

import kernels

from .balance import pair_matrix
from .base import ContextParallel, CPStats
from .comm import nbytes, p2p


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

    def hops(self, r: int) -> tuple[int, int, int, int]:
        """(blocks sent, blocks received, home returns sent, home returns received) by r."""
        n = len(self.peers)
        sent = sum(self.sends(r, s) for s in range(n))
        recv = sum(self.sends((r - 1) % n, s) for s in range(n))
        home_out = sum(1 for j in range(n) if self.reach[j] > 0 and (j + self.reach[j]) % n == r)
        return sent, recv, home_out, int(self.reach[r] > 0)


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def ring_forward(plan: RingPlan, q, kv, mask, scale, backend):
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
                                   scale=scale, backend=backend)
            out, lse = (o.to(_acc(q.dtype)), l) if out is None else kernels.merge(out, lse, o, l)
        pending.wait()
        spare = cur if cur is not None and cur is not kv else None
        cur = recv
    if out is None:
        out = torch.zeros(q.shape, dtype=_acc(q.dtype), device=q.device)
        lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=_acc(q.dtype), device=q.device)
    return out.to(q.dtype), lse


def ring_backward(plan: RingPlan, dout, q, kv, out, lse, dlse, mask, scale, backend):
    n, r = len(plan.peers), plan.rank
    nxt, prv = plan.peers[(r + 1) % n], plan.peers[(r - 1) % n]
    acc = _acc(q.dtype)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    home = None
    if plan.reach[r] > 0:
        home = torch.empty(kv.shape, dtype=acc, device=kv.device)
        home_pending = p2p(recvs=[(home, plan.peers[(r + plan.reach[r]) % n], 2 * n + 1)])
    sent, own = [], None
    cur, spare, dkv_in, dkv_pending = kv, None, None, None
    for s in range(n):
        j = (r - s) % n
        recv = None
        if plan.sends((r - 1) % n, s):
            recv = spare if spare is not None else torch.empty_like(kv)
        kv_pending = p2p([(cur, nxt, s + 1)] if cur is not None and plan.sends(r, s) else [],
                         [(recv, prv, s + 1)] if recv is not None else [])
        sends = []
        if cur is not None:
            grads = None
            if plan.pairs[r][j] > 0:
                grads = kernels.backward(dout, q, cur[0], cur[1], out, lse, mask, q_pos=plan.positions[r],
                                         k_pos=plan.positions[j], scale=scale, dlse=dlse, backend=backend)
                dq += grads[0]
            if s == 0:
                dkv = torch.zeros(kv.shape, dtype=acc, device=kv.device)
            else:
                dkv_pending.wait()
                dkv = dkv_in
            if grads is not None:
                dkv[0] += grads[1]
                dkv[1] += grads[2]
            if plan.sends(r, s):
                sends.append((dkv, nxt, n + s + 1))
            elif s > 0:
                sends.append((dkv, plan.peers[j], 2 * n + 1))
            else:
                own = dkv
        recvs = []
        if plan.sends((r - 1) % n, s):
            dkv_in = torch.empty(kv.shape, dtype=acc, device=kv.device)
            recvs.append((dkv_in, prv, n + s + 1))
        sent.append(p2p(sends, []))
        dkv_pending = p2p([], recvs)
        kv_pending.wait()
        spare = cur if cur is not None and cur is not kv else None
        cur = recv
    for pending in sent:
        pending.wait()
    if home is not None:
        home_pending.wait()
        own = home
    return dq.to(q.dtype), own[0].to(kv.dtype), own[1].to(kv.dtype)


class RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan, mask, scale, backend):
        kv = torch.stack([k, v])
        out, lse = ring_forward(plan, q, kv, mask, scale, backend)
        ctx.save_for_backward(q, kv, out, lse)
        ctx.args = (plan, mask, scale, backend)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, kv, out, lse = ctx.saved_tensors
        if dlse is not None and not bool(dlse.any()):
            dlse = None
        plan, mask, scale, backend = ctx.args
        dq, dk, dv = ring_backward(plan, dout.contiguous(), q, kv, out, lse, dlse, mask, scale, backend)
        return dq, dk, dv, None, None, None, None


def ring_stats(plan: RingPlan, k, heads_fraction: float = 1.0) -> CPStats:
    """Bytes per ring position: forward kv hops; backward (extra['bytes_bwd']) kv + dkv hops
    and home returns.  pairs are token pairs times the fraction of heads computed here."""
    n = len(plan.peers)
    block = nbytes((2, *k.shape), k.dtype)
    acc_block = nbytes((2, *k.shape), _acc(k.dtype))
    hops = [plan.hops(r) for r in range(n)]
    stats = CPStats(
        bytes_sent=[h[0] * block for h in hops],
        bytes_recv=[h[1] * block for h in hops],
        pairs=[int(sum(plan.pairs[r]) * heads_fraction) for r in range(n)],
    )
    stats.extra["bytes_bwd_sent"] = [h[0] * (block + acc_block) + h[2] * acc_block for h in hops]
    stats.extra["bytes_bwd_recv"] = [h[1] * (block + acc_block) + h[3] * acc_block for h in hops]
    return stats


class Ring(ContextParallel):
    name = "ring"

    def __init__(self, mask, seqlen, *, group=None, mesh=None, balancer=None, **options):
        super().__init__()
        self.setup(mask, seqlen, group, balancer, options)
        self.reject_unknown(options, self.name)
        self.plan = RingPlan.build(mask, self.indices, self.rank, self.ranks)

    def attention_with_lse(self, q, k, v):
        self.check_inputs(q, k, v)
        out, lse = RingAttention.apply(q, k, v, self.plan, self.mask, self.scale, self.backend)
        self.stats = ring_stats(self.plan, k)
        return out, lse
