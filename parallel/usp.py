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

import math

import torch

from .base import ContextParallel, CPStats
from .groups import ParallelDims
from .perf.cost import Layout, bytes_sent, memory_per_rank, steps_cut
from .perf.predict import collective, compute_s, ring_time
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
        """Per CP rank: its all-to-all bytes plus the ring bytes of its ring position, for the
        K/V heads of its place in the Ulysses group (an S2 ring compacts per head)."""
        a2a = self.exchange.bytes_moved(q, k)
        rings = {}
        for u, _ in self.grid:
            if u not in rings:
                heads = HeadExchange(self.exchange.peers, u, None).kv_heads(q.shape[1], k.shape[1])
                rings[u] = ring_stats(self.plan, kh, heads_fraction=1.0 / self.ulysses_degree, kv_heads=heads)
        stats = CPStats()
        for u, p in self.grid:
            stats.bytes_sent.append(a2a + rings[u].bytes_sent[p])
            stats.bytes_recv.append(a2a + rings[u].bytes_recv[p])
            stats.pairs.append(rings[u].pairs[p])
        for key in ("bytes_bwd_sent", "bytes_bwd_recv"):
            stats.extra[key] = [a2a + rings[u].extra[key][p] for u, p in self.grid]
        stats.extra["ulysses_degree"], stats.extra["ring_degree"] = self.ulysses_degree, self.ring_degree
        return stats

    @staticmethod
    def _degree(world: int, ulysses_degree) -> int:
        u = ulysses_degree or 1
        if world % u:
            raise ValueError(f"ulysses_degree={u} must divide the CP size {world}")
        return u

    @classmethod
    def head_split(cls, world, options):
        return options.get("ulysses_degree") or 1

    @classmethod
    def auto_candidates(cls, world, mask, lay, balancer=None):
        """Every Ulysses x ring split with both degrees above 1."""
        return [(None, {"ulysses_degree": u, "ring_degree": world // u}) for u in range(2, world) if world % u == 0]

    @classmethod
    def cost_bytes(cls, lay, world, *, ulysses_degree=None, **_):
        """Ulysses over u ranks on u L tokens + ring over P/u ranks on the whole sequence, H/u heads."""
        u = cls._degree(world, ulysses_degree)
        loc = lay.seqlen // world
        uly = bytes_sent("ulysses", Layout(loc * u, lay.hq, lay.hkv, lay.head_dim, lay.elem_bytes), u)
        hkv = lay.hkv * (u // math.gcd(lay.hkv, u))
        ring = bytes_sent("ring", Layout(lay.seqlen, lay.hq // u, hkv // u, lay.head_dim, lay.elem_bytes), world // u)
        return {k: [uly[k][0] + ring[k][0]] * world for k in ("fwd", "bwd")}

    @classmethod
    def cost_kernel_cut(cls, mask, seqlen, rows, *, ulysses_degree=None, num_heads=None, num_kv_heads=None, **_):
        """The rank's group's rows against every group's rows, one call per ring step, for
        the KV heads of its place in the Ulysses group (S2 masks)."""
        u, world = ulysses_degree or 1, len(rows)
        groups = [torch.cat(rows[g * u:(g + 1) * u]).sort().values for g in range(world // u)]
        if mask.heads is None or num_kv_heads is None:
            return [steps_cut(mask, groups[r // u], groups, num_kv_heads) for r in range(world)]
        heads = [HeadExchange(range(u), i, None).kv_heads(num_heads or num_kv_heads, num_kv_heads) for i in range(u)]
        return [steps_cut(mask, groups[r // u], groups, kv_heads=heads[r % u]) for r in range(world)]

    @classmethod
    def cost_memory(cls, lay, world, *, ulysses_degree=None, **_):
        """Ulysses over u ranks on L u rows, then ring over P / u with Hq / u heads."""
        u = cls._degree(world, ulysses_degree)
        loc = lay.seqlen // world
        uly = memory_per_rank("ulysses", Layout(loc * u, lay.hq, lay.hkv, lay.head_dim, lay.elem_bytes), u)
        hkv = lay.hkv * (u // math.gcd(lay.hkv, u)) // u
        ring = memory_per_rank("ring", Layout(lay.seqlen, lay.hq // u, hkv, lay.head_dim, lay.elem_bytes), world // u)
        return uly["fwd"] + ring["fwd"], uly["bwd"] + ring["bwd"]

    @classmethod
    def cost_time(cls, pairs, lay, hw, *, ulysses_degree=None, **_):
        """A ring position's work: its group's rows for Hq / u heads, i.e. the mean of its u
        members' pairs (which count all Hq heads) over all Hq heads."""
        p = len(pairs)
        u = ulysses_degree or 1
        r = p // u
        uly = bytes_sent("ulysses", Layout(lay.seqlen // r, lay.hq, lay.hkv, lay.head_dim, lay.elem_bytes), u)
        ring_pairs = [sum(pairs[g * u:(g + 1) * u]) / u for g in range(r)]
        ring_lay = Layout(lay.seqlen, max(lay.hq // u, 1), max(lay.hkv // u, 1), lay.head_dim, lay.elem_bytes)
        rf, rb = ring_time(compute_s(max(ring_pairs), lay.hq, lay, hw, False),
                           compute_s(max(ring_pairs), lay.hq, lay, hw, True), ring_lay, r, hw, u)
        return (collective(uly["fwd"][0], u, hw, kind="a2a") + rf, collective(uly["bwd"][0], u, hw, kind="a2a") + rb)
