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


class _Gathered:
    """The rows of the ranks this rank needs, gathered for one group of K/V heads."""

    def __init__(self, cp, kv_part):
        full = all_gather_rows(kv_part, cp.group)  # [P*T, 2, h, D] in rank order
        self.rows = full.view(cp.world, -1, *kv_part.shape[1:])[cp.needed].flatten(0, 1)
        if cp.key_order is not None:  # ascending positions: documents become runs, tiles stay few
            self.rows = self.rows.index_select(0, cp.key_order)
        self.k, self.v = self.rows[:, 0], self.rows[:, 1]


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
                                                  scale=cp.scale, backend=cp.backend)
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
        dkv = torch.empty(kv.shape, dtype=acc_dtype(kv.dtype), device=kv.device)
        dout = dout.contiguous()
        for kh, qh in cp.head_slices(q.shape[1], kv.shape[2]):
            g = _Gathered(cp, kv[:, :, kh].contiguous())
            dq[:, qh], dk, dv = kernels.backward(
                dout[:, qh].contiguous(), q[:, qh], g.k, g.v, out[:, qh], lse[qh], cp.mask, q_pos=cp.index,
                k_pos=cp.key_pos, scale=cp.scale, dlse=None if dlse is None else dlse[qh], backend=cp.backend)
            if cp.key_order is not None:  # back from ascending positions to the gathered order
                dk, dv = dk.index_select(0, cp.key_unorder), dv.index_select(0, cp.key_unorder)
            full = torch.zeros((cp.world, q.shape[0], 2, dk.shape[1], dk.shape[2]), dtype=dkv.dtype, device=dk.device)
            full[cp.needed] = torch.stack([dk, dv], dim=1).to(dkv.dtype).view(len(cp.needed), q.shape[0], 2, *dk.shape[1:])
            dkv[:, :, kh] = reduce_scatter_rows(full.flatten(0, 1), cp.group)
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
        # change attention, so only the gathered rows are permuted, and dK/dV permuted back.
        order = torch.argsort(gathered)
        sorted_already = bool((order == torch.arange(order.numel())).all())
        self.key_order = None if sorted_already else order
        self.key_unorder = None if sorted_already else torch.argsort(order)
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
