"""The `cad` context-parallel strategy (contract 2 of DESIGN.md).

Rank r keeps tokens [r*T, (r+1)*T) for everything but core attention (the base class's
`setup` with the contiguous balancer).  At construction every rank plans the same tasks
(the planner is deterministic) and checks, with one all_gather of a plan fingerprint, that
all ranks agree.  `compute` sends Q rows and K/V rows to the servers, runs each server's
tasks as one kernel call, and sends the outputs (and, asked for, the lse rows) back;
autograd reverses it (dO out, dQ/dK/dV back, dK/dV of keys held by several servers summed).
With `pingpong=True` the tasks are split into two nano-batches whose communication and
compute overlap (see pingpong.py).

Masks: documents, causal, window, prefix, sink and S2 heads (contract 1b).  A server holds
the union of its tasks' keys and the kernel applies each KV head's mask; with S2 heads the
planner balances each KV head's real pairs, so it needs the number of KV heads.

Options: epsilon (balance tolerance), backend (kernel backend; also picks the calibrated task
overhead), pingpong, task_overhead_pairs (override the calibration), scale, num_kv_heads
(required with S2 heads; k/v must then have that many heads).
stats: pairs = pairs each rank computes as a server (with S2 heads: its KV heads' pairs
averaged over the heads, in units of all heads as CPStats counts); bytes_sent / bytes_recv =
forward traffic (Q, K/V to servers, outputs back; a K/V row travels with all its heads);
backward moves the same bytes the other way.  extra holds pairs before/after planning,
planner time and the forward/ping-pong timing breakdown.
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist

from kernels import MaskSpec

from .. import base
from ..balance import imbalance
from ..comm import group_layout
from ..perf.predict import collective, compute_s
from . import intervals as iv
from .dispatch import exchange, server_routes
from .pingpong import PingPong, nano_batches
from .planner import plan
from .server import serve


def _traffic(p, q_bytes, kv_bytes):
    """Forward bytes (sent, received) per rank: Q and K/V to servers, outputs back."""
    world, tpr = p.world, p.tokens_per_rank
    sent, recv = [0] * world, [0] * world
    for s in range(world):
        for o in range(world):
            if o == s:
                continue
            q = iv.size(iv.clip(p.q_rows[s], o * tpr, (o + 1) * tpr))
            kv = iv.size(iv.clip(p.kv_rows[s], o * tpr, (o + 1) * tpr))
            sent[o] += q * q_bytes + kv * kv_bytes
            recv[s] += q * q_bytes + kv * kv_bytes
            sent[s] += q * q_bytes  # outputs return to their owner
            recv[o] += q * q_bytes
    return sent, recv


class CAD(base.ContextParallel):
    name = "cad"
    sweeps_balancers = False  # its planner places the work; a balancer is refused

    def __init__(self, mask, seqlen, *, group=None, mesh=None, balancer=None, **options):
        super().__init__()
        if balancer not in (None, "cad"):
            raise ValueError(f"balancer={balancer!r}: the cad strategy plans its own tasks; leave balancer unset or 'cad'")
        epsilon, overhead = options.pop("epsilon", 0.1), options.pop("task_overhead_pairs", None)
        self.pingpong = bool(options.pop("pingpong", False))
        self.num_kv_heads = options.pop("num_kv_heads", None)
        self._bytes_cache = {}
        group = self.cp_group(group, mesh)
        error, fingerprint = None, -1
        try:  # rank r keeps rows [r*T, (r+1)*T) for everything but core attention
            self._check(mask, seqlen, group_layout(group)[1])
            self.setup(mask, seqlen, group, "contiguous", options, balancers=("contiguous",))
            self.reject_unknown(options, self.name)
            self.plan = self._plan(epsilon, overhead)
            fingerprint = self.plan.fingerprint()
        except ValueError as e:
            error = e
        self._check_agreement(error, fingerprint, group)
        tpr = seqlen // self.world
        self.routes = server_routes(self.plan.q_rows, self.plan.kv_rows, self.rank, tpr)
        self.nanos = [server_routes(q, kv, self.rank, tpr) for q, kv in nano_batches(self.plan, 2)] \
            if self.pingpong else None

    @staticmethod
    def _check(mask, seqlen, world):
        """What cad needs beyond the base class's checks, said in its own terms."""
        if not isinstance(seqlen, int) or seqlen <= 0 or seqlen % world:
            raise ValueError(f"seqlen={seqlen} must be a positive multiple of the CP group size {world}")
        if isinstance(mask, MaskSpec) and mask.has_docs and mask.seqlen != seqlen:
            raise ValueError(f"the mask's documents cover {mask.seqlen} tokens but seqlen={seqlen}; "
                             "every document must fit in the batch (split or trim documents longer than seqlen)")

    def _plan(self, epsilon, task_overhead_pairs):
        doc_lens = self.mask.doc_lens if self.mask.has_docs else [self.seqlen]
        if self.mask.has_docs and len(doc_lens) != self.mask.doc_of(torch.arange(self.seqlen)).unique().numel():
            raise ValueError("mask doc_ids repeat an id in separate runs; cad needs every document to be one "
                             "contiguous run of positions (renumber the runs or pass cu_seqlens)")
        backend = self.backend  # whose calibrated task overhead to plan with; "auto" -> by process-group kind
        if backend == "auto":
            backend = "default" if dist.get_backend(self.group) == "nccl" else "cpu"
        return plan(doc_lens, self.seqlen // self.world, self.mask, epsilon=epsilon, backend=backend,
                    task_overhead_pairs=task_overhead_pairs, num_kv_heads=self.num_kv_heads)

    @staticmethod
    def _check_agreement(error, fingerprint, group):
        """One all_gather every rank of the CP group enters; then every rank raises if any rank
        failed or the plans differ, so no rank is left waiting in a later collective."""
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else "cpu"
        mine = torch.tensor([fingerprint, 0 if error is None else 1], dtype=torch.long, device=device)
        every = [torch.zeros_like(mine) for _ in range(dist.get_world_size(group))]
        dist.all_gather(every, mine, group=group)
        if error is not None:
            raise error
        bad = [r for r, t in enumerate(every) if int(t[1])]
        if bad:
            raise ValueError(f"cad: ranks {bad} of the CP group rejected their settings (see their errors)")
        if len({int(t[0]) for t in every}) > 1:
            raise ValueError("cad: ranks planned different tasks; give every rank of the CP group the same "
                             "mask (documents, causal, window, prefix, sink, heads), seqlen, epsilon and "
                             "num_kv_heads")

    def compute(self, q, k, v, with_lse=True):
        self.check_inputs(q, k, v)
        if self.plan.kind.heads is not None and k.shape[1] != self.plan.kind.num_kv_heads:
            raise ValueError(f"cad planned the S2 heads for num_kv_heads={self.plan.kind.num_kv_heads} but k/v "
                             f"have {k.shape[1]} heads; build it with num_kv_heads={k.shape[1]}")
        t0 = time.perf_counter()
        if self.pingpong:
            out, lse, timing = PingPong.run(q, k, v, self, with_lse)
        else:
            lay, g = self.routes, self.group
            q_s, k_s, v_s = exchange(q, lay.q, g), exchange(k, lay.kv, g), exchange(v, lay.kv, g)
            t1 = time.perf_counter()
            out_s, lse_s = serve(q_s, k_s, v_s, lay.q_pos, lay.kv_pos, self.mask, scale=self.scale, backend=self.backend)
            t2 = time.perf_counter()
            out = exchange(out_s, lay.back, g)
            # lse [H, T] travels as rows [T, H]
            lse = exchange(lse_s.t().contiguous(), lay.back, g).t() if with_lse else None
            # blocking collectives: their time is exposed, nothing overlaps (compare ping-pong's wait)
            timing = {"fwd_compute_s": t2 - t1, "fwd_comm_s": (t1 - t0) + (time.perf_counter() - t2)}
        self._record(q, k, time.perf_counter() - t0, timing)
        return out, lse

    def _record(self, q, k, seconds, timing):
        p = self.plan
        q_bytes = q.shape[1] * q.shape[2] * q.element_size()
        kv_bytes = 2 * k.shape[1] * k.shape[2] * k.element_size()
        if (q_bytes, kv_bytes) not in self._bytes_cache:  # every layer calls with the same shapes
            self._bytes_cache[q_bytes, kv_bytes] = _traffic(p, q_bytes, kv_bytes)
        self.stats.bytes_sent, self.stats.bytes_recv = map(list, self._bytes_cache[q_bytes, kv_bytes])
        self.stats.pairs = list(p.pairs_after)
        self.stats.extra = timing  # ping-pong's backward adds its timings to this dict later
        timing.update({
            "pairs_before": list(p.pairs_before), "pairs_after": list(p.pairs_after),
            "pairs_imbalance_before": imbalance(p.pairs_before), "cost_imbalance_after": imbalance(p.cost_after),
            "planner_s": p.planning_s, "attention_fwd_s": seconds, "tasks": len(p.tasks),
        })

    @classmethod
    def shape_options(cls, num_heads, num_kv_heads, head_dim):
        """The planner counts S2 pairs per KV head (the option is read only with S2 heads)."""
        return {"num_kv_heads": num_kv_heads}

    @classmethod
    def auto_candidates(cls, world, mask, lay, balancer=None):
        """One setting; with S2 heads it carries the KV heads the planner counts."""
        return [(None, {"num_kv_heads": lay.hkv} if mask.heads is not None else {})]

    @classmethod
    def cost_time(cls, pairs, lay, hw, *, epsilon: float = 0.0, **_):
        """Every server computes (total pairs / P) * (1 + epsilon); ping-pong hides the
        shipping of Q/K/V/out behind compute."""
        p = len(pairs)
        loc = lay.seqlen // p
        ship = (p - 1) / p * loc * (2 * lay.hq + 2 * lay.hkv) * lay.head_dim * lay.elem_bytes
        bal = sum(pairs) / p * (1 + epsilon)
        return (max(compute_s(bal, lay.hq, lay, hw, False), collective(ship, p, hw)) + hw.call_overhead,
                max(compute_s(bal, lay.hq, lay, hw, True), collective(ship, p, hw)) + hw.call_overhead)
