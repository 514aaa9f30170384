"""DeepSpeed ZeRO stage 0-3 as an engine.

The DeepSpeed config is generated from the Hydra config (`deepspeed_config`): micro-batch 1
packed sequence, `train.grad_accum` accumulation steps, `optim.grad_clip` clipping, ZeRO
stage from `engine.options.zero_stage`; `engine.options.config` is merged on top for any
other DeepSpeed setting. The optimizer and LR schedule are ours (torch AdamW, handed in as
a client optimizer, so nothing needs compiling); DeepSpeed owns accumulation, gradient
reduction, clipping, the step and checkpoints.

Gradient rule (base.py): DeepSpeed averages gradients over its data-parallel group, which
we make the dp x cp group through an `mpu`; the loss is multiplied by cp, so the result is
SUM over CP and MEAN over DP. DeepSpeed divides by the accumulation steps itself.
"""
from __future__ import annotations

import copy
import os

import torch
import torch.distributed as dist

from ..quiet import known_prints
from .base import Engine

ZERO_STAGES = (0, 1, 2, 3)


def validate_config(cfg) -> None:
    """Settings checked on every rank before any process group exists."""
    opts = cfg.engine.options
    stage = opts.get("zero_stage", 1)
    if stage not in ZERO_STAGES:
        raise ValueError(f"engine.options.zero_stage={stage!r} must be one of 0, 1, 2, 3")
    if cfg.parallel.tp != 1:
        raise ValueError(f"engine=deepspeed does not do tensor parallelism (parallel.tp={cfg.parallel.tp}); "
                         "use engine=megatron for tp > 1")
    extra = opts.get("config", {})
    if not isinstance(extra, dict):
        raise ValueError(f"engine.options.config must be a mapping of DeepSpeed settings, got {extra!r}")


def _merge(base: dict, extra: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def deepspeed_config(cfg, dp_world: int) -> dict:
    """The DeepSpeed JSON config for this run, derived from the Hydra config."""
    validate_config(cfg)
    opts = cfg.engine.options
    accum = cfg.train.grad_accum
    generated = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": accum,
        "train_batch_size": accum * dp_world,
        "gradient_clipping": float(cfg.optim.grad_clip or 0.0),
        "zero_optimization": {"stage": opts.get("zero_stage", 1)},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    return _merge(generated, dict(opts.get("config", {})))


class _GroupsMPU:
    """What DeepSpeed asks of a model-parallel unit, answered from our rank grid: its data
    parallel group is dp x cp; its model-parallel group is tp (size 1 here)."""

    def __init__(self, groups):
        self.groups = groups

    def get_data_parallel_group(self):
        return self.groups.dp_cp_group

    def get_data_parallel_world_size(self):
        return dist.get_world_size(self.groups.dp_cp_group)

    def get_data_parallel_rank(self):
        return dist.get_rank(self.groups.dp_cp_group)

    def get_data_parallel_group_ranks(self):
        return dist.get_process_group_ranks(self.groups.dp_cp_group)

    def get_model_parallel_group(self):
        return self.groups.tp_group

    def get_model_parallel_world_size(self):
        return dist.get_world_size(self.groups.tp_group)

    def get_model_parallel_rank(self):
        return dist.get_rank(self.groups.tp_group)


class DeepSpeedEngine(Engine):
    needs_process_group = True  # a single process gets a 1-rank group from the loop

    def __init__(self, model, cfg, groups):
        validate_config(cfg)
        if groups is None or not dist.is_initialized():
            raise ValueError("engine=deepspeed needs a process group (train.loop.run makes a 1-rank one for "
                             "a single process)")
        super().__init__(model, cfg, groups)
        import deepspeed

        os.environ.setdefault("LOCAL_RANK", str(dist.get_rank()))
        self.stage = cfg.engine.options.get("zero_stage", 1)
        self.loss_scale = float(groups.dims.cp)
        mpu = _GroupsMPU(groups)
        self.config = deepspeed_config(cfg, mpu.get_data_parallel_world_size())
        with known_prints():
            self.ds, _, _, _ = deepspeed.initialize(
                model=model, optimizer=self.optimizer, lr_scheduler=self.scheduler, config=self.config,
                mpu=mpu, dist_init_required=False,
            )
        self.module = self.ds

    def backward(self, loss, last_micro: bool) -> None:
        self.ds.set_gradient_accumulation_boundary(last_micro)
        self.ds.backward(loss * self.loss_scale)

    def step(self) -> dict:
        lr = self.optimizer.param_groups[0]["lr"]
        own_norm = None
        if self.stage == 0:  # ZeRO-0 clips but does not report the norm; gradients are reduced by now
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            own_norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
        self.ds.step()
        norm = self.ds.get_global_grad_norm() if own_norm is None else own_norm
        return {"grad_norm": float(norm) if norm is not None else float("nan"), "lr": lr}

    def skip_step(self) -> None:
        """Drop this step's gradients (non-finite loss). ZeRO 1-3 do it themselves: their
        overflow check finds the non-finite gradients, clears them and skips the optimizer and
        LR step. ZeRO-0 would apply them, so its gradients are dropped here."""
        if self.stage == 0:
            self.ds.zero_grad()
            return
        skipped = self.ds.skipped_steps
        self.ds.step()
        if self.ds.skipped_steps == skipped:
            raise FloatingPointError("the loss was not finite but DeepSpeed found finite gradients and applied the "
                                     "step; use faults.nan_policy=raise or rewind")

    def state_dict(self) -> dict:
        """Model (gathered), this rank's optimizer partition, scheduler."""
        return {"model": self.ds.module_state_dict(), "optimizer": self.ds.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, sd: dict) -> None:
        raise ValueError("engine=deepspeed restores state through engine.load(path) (DeepSpeed's own sharded "
                         "checkpoint, what checkpoint.resume uses); in-memory load_state_dict is not supported")

    def save(self, path: str, client_state: dict) -> None:
        """DeepSpeed's own sharded checkpoint (model, ZeRO partitions, scheduler) in path/deepspeed."""
        self.ds.save_checkpoint(path, tag="deepspeed", client_state={"client": client_state}, save_latest=False)

    def load(self, path: str) -> dict:
        loaded, extra = self.ds.load_checkpoint(path, tag="deepspeed", load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
        if loaded is None:
            raise ValueError(f"no DeepSpeed checkpoint under {path}/deepspeed")
        return extra["client"]
