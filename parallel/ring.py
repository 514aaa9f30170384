"""Ring attention: K/V blocks travel around the CP ring while every rank keeps its queries.

Invariant.  At step s, ring position r holds the K/V block of position j = r - s (mod P)
and merges softmax(q_r k_j^T) v_j into its running (out, lse) in float32 (exact: partials
over disjoint key sets combine by lse).  Only the Hkv heads travel, packed as one [2, T,
Hkv, D] buffer; the transfer for step s+1 is posted before step s's compute (double
buffer) so communication hides behind it.  A block travels only as far as the last rank
whose queries the mask lets see it (`reach[j]`): causal, document and window masks skip
hidden blocks and stop blocks that are out of every later query's reach.  Under a mask
with S2 `heads` a hop carries only the (row, K/V head) entries its holder or a later one
needs, and the holder calls the kernel on the keys it needs with their global positions
(`parallel.ring_wire`, which says what each hop and accumulator carries).

Backward is a second ring pass: K/V go round again, and from the first hop on a float32
dK/dV accumulator of block j travels with it, each rank adding its contribution from
kernels.backward (which takes the final out/lse of its query rows); the last rank in reach
sends it straight home, where it is added to the home rank's own contribution.  Tags keep
the three kinds of messages apart for gloo (kv: s, dkv: P + s, home: 2P + 1); both sides
post them in the same order, which is how NCCL matches them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

import kernels
from kernels import MaskSpec

from .balance import default_balancer, pair_matrix
from .base import ContextParallel, CPStats
from .comm import Pending, acc_dtype, nbytes, p2p
from .perf.cost import memory_terms, ring_reach, steps_cut
from .perf.predict import compute_s, ring_time
from .ring_wire import HeadRows, WholeBlocks


@dataclass
class RingPlan:
    """Who holds what on one ring; identical on every member, built without communication."""

    rank: int                       # this rank's ring position
    peers: list[int]                # global ranks in ring order
    positions: list[torch.Tensor]   # global positions of each position's rows
    pairs: list[list[int]]          # pairs[r][j]: allowed pairs of r's queries with j's keys
    reach: list[int]                # last ring offset at which block j is needed (-1: never)
    mask: MaskSpec | None = None
    _wires: dict = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, mask, positions, rank, peers) -> "RingPlan":
        pairs = pair_matrix(mask, positions)
        n = len(positions)
        reach = [max([t for t in range(n) if pairs[(j + t) % n][j] > 0], default=-1) for j in range(n)]
        return cls(rank, list(peers), positions, pairs, reach, mask)

    def sends(self, r: int, s: int) -> bool:
        """Does position r pass its step-s block on to r + 1?"""
        return s + 1 <= self.reach[(r - s) % len(self.peers)]

    def wire(self, num_kv_heads: int, kv_heads=None) -> WholeBlocks:
        """What the blocks carry on each hop (`parallel.ring_wire`) for K/V of num_kv_heads
        heads, global indices kv_heads (None: 0..num_kv_heads-1); built once per layout."""
        heads = torch.arange(num_kv_heads) if kv_heads is None else torch.as_tensor(kv_heads).cpu()
        key = tuple(heads.tolist())
        if key not in self._wires:
            entries = self.positions[self.rank].numel() * num_kv_heads
            compact = self.mask is not None and self.mask.heads is not None
            self._wires[key] = HeadRows(self, self.mask, heads) if compact else WholeBlocks(self, entries, kv_heads)
        return self._wires[key]

    def traffic(self, r: int, wire: WholeBlocks) -> dict[str, int]:
        """Entries (row, K/V head) position r moves: K/V blocks sent/received (forward; again
        in backward), dK/dV accumulators passed on/received, and accumulators returned home
        out/in.  A step-s block is on hop s + 1 when it arrives; its accumulator leaves hop s."""
        n = len(self.peers)
        moved = dict.fromkeys(("kv_out", "kv_in", "dkv_out", "dkv_in", "home_out", "home_in"), 0)
        for s in range(n):
            for side, p in (("out", r), ("in", (r - 1) % n)):
                if self.sends(p, s):
                    j = (p - s) % n
                    moved["kv_" + side] += wire.entries(j, s + 1)
                    moved["dkv_" + side] += wire.acc_entries(j, s) if s > 0 else 0
        for j in range(n):
            if self.reach[j] > 0 and (j + self.reach[j]) % n == r:
                moved["home_out"] += wire.acc_entries(j, self.reach[j])
        moved["home_in"] = wire.acc_entries(r, self.reach[r]) if self.reach[r] > 0 else 0
        return moved


def _buffer(spare, shape, like):
    """A receive buffer of `shape`: the spare one when it fits, else a new one."""
    if spare is not None and tuple(spare.shape) == tuple(shape):
        return spare
    return torch.empty(shape, dtype=like.dtype, device=like.device)


def _q_heads(call, q, kv):
    """Query heads of a call's K/V heads (GQA: G query heads per K/V head)."""
    if call.kv == slice(None):
        return slice(None)
    g = q.shape[1] // kv.shape[2]
    return slice(call.kv.start * g, call.kv.stop * g)


def ring_forward(plan: RingPlan, q, kv, mask, scale, backend, kv_heads=None):
    n, r = len(plan.peers), plan.rank
    nxt, prv = plan.peers[(r + 1) % n], plan.peers[(r - 1) % n]
    wire = plan.wire(kv.shape[2], kv_heads)
    out = torch.zeros(q.shape, dtype=acc_dtype(q.dtype), device=q.device)
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=acc_dtype(q.dtype), device=q.device)
    cur, spare = kv, None
    for s in range(n):
        j = (r - s) % n
        recv = None
        if plan.sends((r - 1) % n, s):
            recv = _buffer(spare, wire.shape(kv, (j - 1) % n, s + 1), kv)
        pending = p2p([(wire.onward(cur, j, s), nxt, s + 1)] if cur is not None and plan.sends(r, s) else [],
                      [(recv, prv, s + 1)] if recv is not None else [])
        if cur is not None and plan.pairs[r][j] > 0:
            for call in wire.calls(j, s):
                k, v = wire.keys(cur, call)
                qh = _q_heads(call, q, kv)
                o, l = kernels.forward(q[:, qh], k, v, mask, q_pos=plan.positions[r], k_pos=call.k_pos, scale=scale,
                                       backend=backend, kv_heads=call.kv_heads)
                out[:, qh], lse[qh] = kernels.merge(out[:, qh], lse[qh], o, l)
        pending.wait()
        spare = cur if cur is not None and cur is not kv else None
        cur = recv
    return out.to(q.dtype), lse


def ring_backward(plan: RingPlan, dout, q, kv, out, lse, dlse, mask, scale, backend, kv_heads=None):
    n, r = len(plan.peers), plan.rank
    nxt, prv = plan.peers[(r + 1) % n], plan.peers[(r - 1) % n]
    wire = plan.wire(kv.shape[2], kv_heads)
    acc = acc_dtype(q.dtype)
    dq = torch.zeros(q.shape, dtype=acc, device=q.device)
    own = torch.zeros(kv.shape, dtype=acc, device=kv.device)
    home = None
    if plan.reach[r] > 0:
        home = torch.empty(wire.acc_shape(kv, r, plan.reach[r]), dtype=acc, device=kv.device)
    cur, spare, dkv_in, last = kv, None, None, Pending([])
    for s in range(n):
        j = (r - s) % n
        recv = None
        if plan.sends((r - 1) % n, s):
            recv = _buffer(spare, wire.shape(kv, (j - 1) % n, s + 1), kv)
        kv_pending = p2p([(wire.onward(cur, j, s), nxt, s + 1)] if cur is not None and plan.sends(r, s) else [],
                         [(recv, prv, s + 1)] if recv is not None else [])
        sends, recvs = [], []
        if cur is not None:
            if s == 0:
                dkv = own
            elif s == 1 or wire.acc_entries(j, s - 1) == 0:  # no holder before wrote to it
                dkv = torch.zeros(wire.acc_shape(kv, j, s), dtype=acc, device=kv.device)
            else:
                last.wait()  # the accumulator arriving with this block
                dkv = wire.widen(dkv_in, j, s)
            if plan.pairs[r][j] > 0:
                for call in wire.calls(j, s):
                    k, v = wire.keys(cur, call)
                    qh = _q_heads(call, q, kv)
                    grads = kernels.backward(dout[:, qh], q[:, qh], k, v, out[:, qh], lse[qh], mask,
                                             q_pos=plan.positions[r], k_pos=call.k_pos, scale=scale,
                                             dlse=None if dlse is None else dlse[qh], backend=backend,
                                             kv_heads=call.kv_heads)
                    dq[:, qh] += grads[0]
                    wire.add_grads(dkv, call, grads[1], grads[2])
            if s > 0 and wire.acc_entries(j, s) > 0:
                sends.append((dkv, nxt, n + s + 1) if plan.sends(r, s) else (dkv, plan.peers[j], 2 * n + 1))
        i = (j - 1) % n  # the block the previous position holds at step s
        if s > 0 and plan.sends((r - 1) % n, s) and wire.acc_entries(i, s) > 0:
            dkv_in = torch.empty(wire.acc_shape(kv, i, s), dtype=acc, device=kv.device)
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
        wire.add_home(own, home, r)
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


def ring_stats(plan: RingPlan, k, heads_fraction: float = 1.0, kv_heads=None) -> CPStats:
    """Bytes per ring position: forward K/V hops; backward (extra['bytes_bwd_*']) the K/V
    hops again plus the float32 dK/dV accumulators (passed on, and returned home), counted
    in entries of the wire (whole blocks, or the compacted (row, head) entries of a mask with
    heads; kv_heads: their global indices, as given to the ring).  pairs are token pairs
    times the fraction of the heads computed here."""
    n = len(plan.peers)
    entry, acc = nbytes((2, k.shape[2]), k.dtype), nbytes((2, k.shape[2]), acc_dtype(k.dtype))
    wire = plan.wire(k.shape[1], kv_heads)
    moved = [plan.traffic(r, wire) for r in range(n)]
    stats = CPStats(
        bytes_sent=[m["kv_out"] * entry for m in moved],
        bytes_recv=[m["kv_in"] * entry for m in moved],
        pairs=[int(sum(plan.pairs[r]) * heads_fraction) for r in range(n)],
    )
    stats.extra["bytes_bwd_sent"] = [m["kv_out"] * entry + (m["dkv_out"] + m["home_out"]) * acc for m in moved]
    stats.extra["bytes_bwd_recv"] = [m["kv_in"] * entry + (m["dkv_in"] + m["home_in"]) * acc for m in moved]
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
        float32.  Every block needed everywhere: fwd (P-1) block, bwd (P-1)(block + acc).
        A mask with heads (S2) and `rows`: the same hops, each carrying only its entries
        (`parallel.ring_wire`: K and V of one row of one K/V head each, 2 D elem bytes)."""
        if reach is None and mask is not None and rows is not None:
            reach = ring_reach(mask, lay.seqlen, rows)
        positions = [] if rows is None else [torch.as_tensor(r) for r in rows]
        plan = RingPlan(0, list(range(world)), positions, [], [world - 1] * world if reach is None else list(reach), mask)
        compact = mask is not None and mask.heads is not None and rows is not None
        wire = plan.wire(lay.hkv) if compact else WholeBlocks(plan, lay.seqlen // world * lay.hkv)
        entry, acc = 2 * lay.head_dim * lay.elem_bytes, 2 * lay.head_dim * lay.acc_bytes
        moved = [plan.traffic(r, wire) for r in range(world)]
        return {"fwd": [m["kv_out"] * entry for m in moved],
                "bwd": [m["kv_out"] * entry + (m["dkv_out"] + m["home_out"]) * acc for m in moved]}

    @classmethod
    def cost_kernel_cut(cls, mask, seqlen, rows, num_kv_heads=None, **_):
        """The rank's rows against every rank's rows, one call per ring step (S2 masks: each
        KV head over its own keys, as the wire hands them to the kernel)."""
        return [steps_cut(mask, q, rows, num_kv_heads) for q in rows]

    @classmethod
    def cost_memory(cls, lay, world, **_):
        """fwd float32 out/lse accumulators, the K/V block held and the one arriving, one
        block's partial out;  bwd + K/V held and arriving, the dK/dV accumulator arriving and
        the one being sent, the home accumulator, dq_a, the kernel's dq_a."""
        m = memory_terms(lay, world)
        fwd = m["qa"] + m["lse"] + 2 * m["kv"] + m["q"]
        return fwd, m["q"] + m["lse"] + 2 * m["kv"] + 3 * m["kva"] + 2 * m["qa"] + m["grads"]

    @classmethod
    def cost_time(cls, pairs, lay, hw, sent=None, **_):
        worst = max(pairs)
        return ring_time(compute_s(worst, lay.hq, lay, hw, False), compute_s(worst, lay.hq, lay, hw, True),
                         lay, len(pairs), hw, 1, sent)

    @classmethod
    def auto_candidates(cls, world, mask, lay, balancer=None):
        """The mask's default balancer and contiguous (or only the one auto was given)."""
        if balancer is not None:
            return [(balancer, {})]
        return [(b, {}) for b in dict.fromkeys([default_balancer(mask), "contiguous"])]
