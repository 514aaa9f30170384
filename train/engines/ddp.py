"""torch DistributedDataParallel over the DP x CP ranks.

DDP all-reduces (averages) gradients over the dp_cp group of dp*cp ranks; multiplying
the loss by cp turns that average into SUM over CP, MEAN over DP (base.py's rule).
Tensor parallelism is the megatron engine's job.
"""
from __future__ import annotations

import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from .base import Engine


class DDPEngine(Engine):
    def __init__(self, model, cfg, groups):
        super().__init__(model, cfg, groups)
        if groups is None or not dist.is_initialized():
            return
        if groups.dims.tp != 1:
            raise ValueError(f"engine=ddp does not do tensor parallelism (parallel.tp={groups.dims.tp}); use engine=megatron")
        self.loss_scale = float(groups.dims.cp)
        self.module = DistributedDataParallel(model, process_group=groups.dp_cp_group)

    def backward(self, loss, last_micro: bool) -> None:
        if isinstance(self.module, DistributedDataParallel) and not last_micro:
            with self.module.no_sync():
                super().backward(loss, last_micro)
        else:
            super().backward(loss, last_micro)
