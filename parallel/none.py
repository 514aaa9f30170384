"""No context parallelism: every rank keeps the whole sequence and runs the kernel on it.

Exact by construction (it is the single-process computation); moves no bytes.
"""
from __future__ import annotations

import torch

import kernels

from .balance import pair_counts
from .base import ContextParallel, CPStats
from .perf.cost import memory_terms, whole_cut
from .perf.predict import compute_s


class NoCP(ContextParallel):
    name = "none"

    def __init__(self, mask, seqlen, *, group=None, mesh=None, balancer=None, **options):
        super().__init__()
        self.setup(mask, seqlen, None, balancer, options, balancers=("contiguous",), single=True)
        self.reject_unknown(options, self.name)

    def compute(self, q, k, v, with_lse=True):
        out, lse = kernels.attention(q, k, v, self.mask, scale=self.scale, backend=self.backend)
        pos = torch.arange(self.seqlen)
        self.stats = CPStats([0], [0], [pair_counts(self.mask, pos, pos)])
        return out, lse

    @classmethod
    def cost_bytes(cls, lay, world, **_):
        return {"fwd": [0] * world, "bwd": [0] * world}

    @classmethod
    def cost_kernel_cut(cls, mask, seqlen, rows, num_kv_heads=None, **_):
        return whole_cut(mask, seqlen, len(rows), num_kv_heads)

    @classmethod
    def cost_memory(cls, lay, world, **_):
        """fwd out + lse;  bwd + grads + the kernel's float32 dq accumulator."""
        m = memory_terms(lay, world)
        fwd = m["q"] + m["lse"]
        return fwd, fwd + m["grads"] + m["qa"]

    @classmethod
    def cost_time(cls, pairs, lay, hw, **_):
        total = sum(pairs)
        return (compute_s(total, lay.hq, lay, hw, False) + hw.call_overhead,
                compute_s(total, lay.hq, lay, hw, True) + hw.call_overhead)
