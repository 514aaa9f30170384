"""USP (hybrid): Ulysses head all-to-all inside groups of `ulysses_degree` ranks, ring
attention across `ring_degree` such groups.

Invariant.  CP rank c sits at (ulysses position u, ring position p) of the grid that
`parallel.groups.ParallelDims` defines (Ulysses innermost -- adjacent ranks -- unless
`ulysses_inner=False`).  After the all-to-all, the ranks of Ulysses group p all hold the
union of that group's rows, each for its 1/U of the heads; ring position p then runs the
exact ring of `parallel.ring` with the ranks that hold the same heads (same u) in the
other groups, and the reverse all-to-all returns rows for all heads.  The all-to-all uses
`mesh.ulysses_group` when a `ParallelGroups` is passed as mesh, else P2P messages, so
construction creates no process group.
"""
from __future__ import annotations

import torch

from .base import ContextParallel, CPStats
from .groups import ParallelDims
from .ring import RingAttention, RingPlan, ring_stats
from .ulysses import HeadExchange, PositionOrder


class USP(ContextParallel):
    name = "usp"

    def __init__(self, mask, seqlen, *, group=None, mesh=None, balancer=None, **options):
        super().__init__()
        self.setup(mask, seqlen, group, balancer, options, mesh=mesh)
        degrees = {k: options.pop(k, None) for k in ("ulysses_degree", "ring_degree")}
        inner = options.pop("ulysses_inner", True)
        self.reject_unknown(options, self.name)
        layout = ParallelDims(self.world, cp=self.world, ulysses_inner=inner, **degrees)
        self.ulysses_degree, self.ring_degree = layout.ulysses_degree, layout.ring_degree
        u, p = layout.cp_split(self.rank)
        lists = layout.rank_lists()
        uly_groups = {layout.cp_split(members[0])[1]: members for members in lists["ulysses"]}
        ring_members = next(m for m in lists["ring"] if self.rank in m)
        peers = [self.ranks[c] for c in uly_groups[p]]
        uly_group = getattr(mesh, "ulysses_group", None)
        if uly_group is not None:
            import torch.distributed as dist

            if dist.get_process_group_ranks(uly_group) != peers:
                raise ValueError(
                    f"mesh.ulysses_group holds ranks {dist.get_process_group_ranks(uly_group)} but usp with "
                    f"ulysses_degree={self.ulysses_degree}, ulysses_inner={inner} needs {peers}; build the mesh "
                    f"with the same degrees"
                )
        self.exchange = HeadExchange(peers, u, uly_group)
        positions = [torch.cat([self.indices[c] for c in uly_groups[q]]) for q in range(self.ring_degree)]
        # each ring position attends its group's rows in ascending position order (documents
        # stay whole runs for the kernel); the rows are permuted after the all-to-all and back
        self.sort = PositionOrder(positions[p])
        positions = [pos.sort().values for pos in positions]
        self.plan = RingPlan.build(mask, positions, p, [self.ranks[c] for c in ring_members])
        self.grid = [layout.cp_split(c) for c in range(self.world)]

    def compute(self, q, k, v, with_lse=True):
        self.check_inputs(q, k, v)
        kv_heads = self.exchange.kv_heads(q.shape[1], k.shape[1])
        qh, kh, vh, k = self.exchange.scatter_heads(q, k, v)
        qh, kh, vh = self.sort.rows(qh, kh, vh)
        out, lse = self.sort.back(*RingAttention.apply(qh, kh, vh, self.plan, self.mask, self.scale, self.backend,
                                                       kv_heads))
        self.stats = self.plan_stats(q, k, kh)
        lse_rows = self.exchange.lse_to_rows(lse) if with_lse else None
        return self.exchange.to_rows(out), lse_rows

    def plan_stats(self, q, k, kh):
        """Per CP rank: its all-to-all bytes plus the ring bytes of its ring position."""
        ring = ring_stats(self.plan, kh, heads_fraction=1.0 / self.ulysses_degree)
        a2a = self.exchange.bytes_moved(q, k)
        stats = CPStats()
        for _, p in self.grid:
            stats.bytes_sent.append(a2a + ring.bytes_sent[p])
            stats.bytes_recv.append(a2a + ring.bytes_recv[p])
            stats.pairs.append(ring.pairs[p])
        for key in ("bytes_bwd_sent", "bytes_bwd_recv"):
            stats.extra[key] = [a2a + ring.extra[key][p] for _, p in self.grid]
        stats.extra["ulysses_degree"], stats.extra["ring_degree"] = self.ulysses_degree, self.ring_degree
        return stats
