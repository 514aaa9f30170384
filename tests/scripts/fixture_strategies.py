"""Test-only CP strategies for the benchmark harness: one exact, one that drops a key block.

Both shard contiguously and all-gather K/V (autograd-aware, so the backward reduce-scatters
dK/dV); `DropLastBlock` then forgets the last rank's keys, which must make the harness
report the cell as WRONG.
"""
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn  # autograd-aware all_gather

import kernels
from parallel.base import ContextParallel, CPStats
from parallel.perf.cost import balancer_rows, mask_keys, pairs_per_rank


class GatherKV(ContextParallel):
    name = "fixture-gather"
    drop_last = False

    def __init__(self, mask, seqlen, *, group=None, mesh=None, balancer=None, **options):
        super().__init__()
        self.mask, self.seqlen = mask, seqlen
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        rows = balancer_rows("contiguous", seqlen, self.world)
        self.index = torch.as_tensor(rows[self.rank])
        self.stats = CPStats(pairs=pairs_per_rank(mask_keys(mask, seqlen), rows),
                             bytes_sent=[0] * self.world, bytes_recv=[0] * self.world)

    def attention(self, q, k, v):
        kvs = dist_fn.all_gather(torch.stack([k, v]))  # one collective: both ranks' backward order agrees
        if self.drop_last:
            kvs = kvs[:-1]
        kall, vall = torch.cat(kvs, dim=1)
        k_pos = torch.arange(kall.shape[0])
        return kernels.attention(q, kall, vall, self.mask, q_pos=self.index, k_pos=k_pos)[0]


class DropLastBlock(GatherKV):
    name = "fixture-drop"
    drop_last = True
