"""All-gather K/V (Llama-3 style): every rank gathers the whole K/V, keeps its queries.

Invariant.  After the all-gather, rank r holds K/V of every rank's rows; it attends its
local queries to the rows of the ranks whose keys the mask lets them see (`needed`), in
one kernel call over those keys sorted by position, so out/lse are the full-sequence rows
directly (no merge).  To bound
memory, K/V can be gathered `kv_head_groups` heads-groups at a time (with their query
heads); the backward gathers each group again rather than keeping it, computes dq and the
dK/dV of the gathered rows, and reduce-scatters dK/dV (in float32) back to their owners.
"""
from __future__ import annotations

import torch

import kernels

from .balance import pair_matrix
from .base import ContextParallel, CPStats
from .comm import acc_dtype, all_gather_rows, nbytes, reduce_scatter_rows
from .perf.cost import memory_terms, tile_cut
from .perf.predict import collective, compute_s


class _Gathered:
    """The K/V rows this rank needs, gathered for one group of K/V heads, in ascending
    position order: one copy out of the gathered buffer makes K and V each contiguous."""

    def __init__(self, cp, kv_part):
        full = all_gather_rows(kv_part, cp.group)  # [P*T, 2, h, D] in rank order
        kv = full.transpose(0, 1)  # [2, P*T, h, D]
        if cp.gather_index is not None:
            kv = kv.index_select(1, cp.gather_index)
        self.k, self.v = kv[0], kv[1]


class AllGatherAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, cp):
        hq, hkv = q.shape[1], k.shape[1]
        kv = torch.stack([k, v], dim=1)  # [T, 2, Hkv, D]: tokens first, so gathers concatenate
        out = torch.empty_like(q)
        lse = torch.empty(hq, q.shape[0], dtype=acc_dtype(q.dtype), device=q.device)
        for kh, qh in cp.head_slices(hq, hkv):
            g = _Gathered(cp, kv[:, :, kh].contiguous())
            out[:, qh], lse[qh] = kernels.forward(q[:, qh], g.k, g.v, cp.mask, q_pos=cp.index, k_pos=cp.key_pos,
                                                  scale=cp.scale, backend=cp.backend, kv_heads=torch.arange(hkv)[kh])
        ctx.save_for_backward(q, kv, out, lse)
        ctx.cp = cp
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, kv, out, lse = ctx.saved_tensors
        cp = ctx.cp
        if dlse is not None and not bool(dlse.any()):
            dlse = None
        dq = torch.empty_like(q)
        dout = dout.contiguous()
        parts = []
        for kh, qh in cp.head_slices(q.shape[1], kv.shape[2]):
            g = _Gathered(cp, kv[:, :, kh].contiguous())
            dq[:, qh], dk, dv = kernels.backward(
                dout[:, qh].contiguous(), q[:, qh], g.k, g.v, out[:, qh], lse[qh], cp.mask, q_pos=cp.index,
                k_pos=cp.key_pos, scale=cp.scale, dlse=None if dlse is None else dlse[qh], backend=cp.backend,
                kv_heads=torch.arange(kv.shape[2])[kh])
            # dK/dV back to the gathered rows' places (rank order; zero for ranks not needed),
            # accumulated in float32, and reduce-scattered to their owners
            rows = cp.world * q.shape[0]
            alloc = torch.empty if len(cp.needed) == cp.world else torch.zeros
            full = alloc((rows, 2, *dk.shape[1:]), dtype=acc_dtype(kv.dtype), device=dk.device)
            for i, d in enumerate((dk, dv)):
                if cp.gather_index is None:
                    full[:, i].copy_(d)
                else:
                    full[:, i].index_copy_(0, cp.gather_index, d.to(full.dtype))
            parts.append(reduce_scatter_rows(full, cp.group))
        dkv = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
        return dq, dkv[:, 0].to(kv.dtype), dkv[:, 1].to(kv.dtype), None


class AllGather(ContextParallel):
    name = "allgather"

    def __init__(self, mask, seqlen, *, group=None, mesh=None, balancer=None, **options):
        super().__init__()
        self.setup(mask, seqlen, group, balancer, options, mesh=mesh)
        self.kv_head_groups = options.pop("kv_head_groups", 1)
        self.reject_unknown(options, self.name)
        if not isinstance(self.kv_head_groups, int) or self.kv_head_groups < 1:
            raise ValueError(f"kv_head_groups={self.kv_head_groups!r} must be a positive integer")
        self.pairs = pair_matrix(mask, self.indices)
        self.needed = [j for j in range(self.world) if self.pairs[self.rank][j] > 0] or [self.rank]
        gathered = torch.cat([self.indices[j] for j in self.needed])
        # Keys are attended in ascending position order (the kernel then sees each document
        # as one run instead of one piece per rank and balancer chunk); key order does not
        # change attention.  `gather_index` picks those rows out of the all-gathered buffer
        # (rank order), and puts their dK/dV back; None when that is every row, in order.
        order = torch.argsort(gathered)
        shard = len(self.indices[self.rank])
        slots = torch.cat([torch.arange(j * shard, (j + 1) * shard) for j in self.needed])[order]
        identity = len(slots) == self.world * shard and bool((slots == torch.arange(len(slots))).all())
        self.gather_index = None if identity else slots
        self.key_pos = gathered[order]

    def head_slices(self, hq: int, hkv: int):
        """(kv heads, q heads) of each head group; GQA groups stay whole."""
        n, per = self.kv_head_groups, hkv // self.kv_head_groups
        ratio = hq // hkv
        return [(slice(i * per, (i + 1) * per), slice(i * per * ratio, (i + 1) * per * ratio)) for i in range(n)]

    def compute(self, q, k, v, with_lse=True):
        self.check_inputs(q, k, v)
        if k.shape[1] % self.kv_head_groups:
            raise ValueError(f"kv_head_groups={self.kv_head_groups} must divide the K/V heads Hkv={k.shape[1]}")
        if self.world == 1:
            out, lse = kernels.attention(q, k, v, self.mask, q_pos=self.index, k_pos=self.index,
                                         scale=self.scale, backend=self.backend)
        else:
            out, lse = AllGatherAttention.apply(q, k, v, self)
        self.stats = self.plan_stats(k)
        return out, lse

    def plan_stats(self, k) -> CPStats:
        """Forward: the all-gather moves (P-1) local K/V shards in and out of every rank.
        Backward (extra): the same gather again plus a float32 reduce-scatter of dK/dV."""
        moved = (self.world - 1) * nbytes((2, *k.shape), k.dtype)
        grads = (self.world - 1) * nbytes((2, *k.shape), acc_dtype(k.dtype))
        stats = CPStats([moved] * self.world, [moved] * self.world, [sum(row) for row in self.pairs])
        stats.extra["bytes_bwd_sent"] = stats.extra["bytes_bwd_recv"] = [moved + grads] * self.world
        return stats

    @classmethod
    def cost_bytes(cls, lay, world, **_):
        """fwd (P-1) * block (gather K/V);  bwd (P-1) * (block + acc) (re-gather K/V,
        reduce-scatter dK/dV in float32)."""
        m = memory_terms(lay, world)
        return {"fwd": [(world - 1) * m["kv"]] * world, "bwd": [(world - 1) * (m["kv"] + m["kva"])] * world}

    @classmethod
    def cost_kernel_cut(cls, mask, seqlen, rows, num_kv_heads=None, **_):
        """The rank's rows against the gathered keys in ascending order, every KV head."""
        everything = torch.arange(seqlen)
        return [tile_cut(mask, q, everything, num_kv_heads) for q in rows]

    @classmethod
    def cost_memory(cls, lay, world, *, kv_head_groups: int = 1, **_):
        """fwd the gathered K/V of all P ranks and its position-sorted copy (per head group
        of `kv_head_groups`);  bwd + both again, dK/dV of the gathered rows and their
        float32 rank-order buffer, the kernel's dq_a."""
        m = memory_terms(lay, world)
        full = world * m["kv"] // kv_head_groups
        fwd = m["q"] + m["lse"] + 2 * full
        return fwd, fwd + 2 * (full // lay.elem_bytes * lay.acc_bytes) + m["qa"] + m["grads"]

    @classmethod
    def cost_time(cls, pairs, lay, hw, **_):
        p, worst = len(pairs), max(pairs)
        sent = cls.cost_bytes(lay, p)
        return (collective(sent["fwd"][0], p, hw) + compute_s(worst, lay.hq, lay, hw, False) + hw.call_overhead,
                collective(sent["bwd"][0], p, hw) + compute_s(worst, lay.hq, lay, hw, True) + hw.call_overhead)
