"""No context parallelism: every rank keeps the whole sequence and runs the kernel on it.

Exact by construction (it is the single-process computation); moves no bytes.
"""
from __future__ import annotations

import torch

import kernels

from .balance import pair_counts
from .base import ContextParallel, CPStats


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
