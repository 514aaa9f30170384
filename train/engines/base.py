"""The engine contract and its plain-torch implementation.

Gradient rule under context parallelism (the loss invariant of train/loop.py): each CP rank's loss is its local
tokens' cross-entropy sum over the whole sequence's token count, so the true gradient of
a DP rank is the SUM over its CP ranks, and the step uses the MEAN over DP ranks.
`loss_scale` is what a subclass multiplies the loss by to get that from its reducer
(1 here: a single process, nothing to reduce); gradient accumulation divides by the
number of micro-batches.
"""
from __future__ import annotations

import os

import torch

from ..optim import build_optimizer, build_scheduler


class Engine:
    loss_scale = 1.0

    def __init__(self, model: torch.nn.Module, cfg, groups):
        self.model = model
        self.module = model
        self.groups = groups
        self.grad_accum = cfg.train.grad_accum
        self.grad_clip = cfg.optim.grad_clip
        self.optimizer = build_optimizer(model, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.train.steps)

    def backward(self, loss: torch.Tensor, last_micro: bool) -> None:
        (loss * (self.loss_scale / self.grad_accum)).backward()

    def step(self) -> dict:
        max_norm = self.grad_clip if self.grad_clip and self.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"grad_norm": float(grad_norm), "lr": lr}

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
        }

    def load_state_dict(self, sd: dict) -> None:
        self.model.load_state_dict(sd["model"])
        self.optimizer.load_state_dict(sd["optimizer"])
        self.scheduler.load_state_dict(sd["scheduler"])

    def save(self, path: str, client_state: dict) -> None:
        """Model and optimizer through torch.distributed.checkpoint (sharded-ready); the
        scheduler and client state (step, data position, rng) as one file from rank 0."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=path)
        self.save_client_state(path, client_state)

    def save_client_state(self, path: str, client_state: dict) -> None:
        """The scheduler and the client state (step, data position) as one file, from rank 0."""
        import torch.distributed as dist

        if not dist.is_initialized() or dist.get_rank() == 0:
            torch.save({"scheduler": self.scheduler.state_dict(), "client": client_state},
                       os.path.join(path, "client_state.pt"))

    def load_client_state(self, path: str) -> dict:
        """Restore the scheduler from save_client_state's file; returns the client state."""
        extra = torch.load(os.path.join(path, "client_state.pt"), weights_only=False)
        self.scheduler.load_state_dict(extra["scheduler"])
        return extra["client"]

    def load(self, path: str) -> dict:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        state = {"model": model_sd, "optimizer": optim_sd}
        dcp.load(state, checkpoint_id=path)
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
        return self.load_client_state(path)
