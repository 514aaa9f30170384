"""What the trainer does when something goes wrong: a non-finite loss, or a request to stop.

Non-finite loss (`faults.nan_policy`), decided on the step's loss after it was reduced over
the dp x cp group, so every rank takes the same branch (no rank waits in a collective the
others skipped):
  raise   stop with FloatingPointError naming the step, this rank's sequences (global
          sequence indices from the loader) and whether its own local loss was finite;
  skip    discard the step's gradients: no optimizer or LR-schedule step;
  rewind  reload model, optimizer and RNG from the newest checkpoint and carry on with the
          next unseen data (the loader position is kept, so the bad batch is not replayed).
More than `faults.max_bad_steps` non-finite steps in a row stop the run under any policy.

Stop requests (preemption): slurm/train.sbatch traps Slurm's warning signal and creates
the file named by $LONGCTX_STOP_FILE; the loop checks it every step (ranks agree through a
MAX all-reduce), saves a checkpoint and returns, and the batch script requeues the job.
Dead peers are handled elsewhere: collective timeouts (train/dist.py) and torchrun
--max-restarts with automatic resume (train/checkpoint.py).
"""
from __future__ import annotations

import math
import os

import torch
import torch.distributed as dist

POLICIES = ("raise", "skip", "rewind")
STOP_FILE_ENV = "LONGCTX_STOP_FILE"


def validate(faults_cfg, checkpoint_cfg) -> None:
    """Checked on every rank before any process group exists."""
    if faults_cfg.nan_policy not in POLICIES:
        raise ValueError(f"faults.nan_policy={faults_cfg.nan_policy!r} is unknown; choose one of {', '.join(POLICIES)}")
    if faults_cfg.max_bad_steps < 1:
        raise ValueError(f"faults.max_bad_steps={faults_cfg.max_bad_steps} must be >= 1")
    if faults_cfg.nan_policy == "rewind" and not checkpoint_cfg.every:
        raise ValueError("faults.nan_policy=rewind reloads the last checkpoint, so it needs checkpoint.every > 0 "
                         "(e.g. checkpoint=default)")


class LossGuard:
    """Decides, identically on every rank, what to do with a step whose loss is not finite."""

    def __init__(self, cfg, rank: int = 0):
        self.policy, self.max_bad, self.rank = cfg.nan_policy, cfg.max_bad_steps, rank
        self.bad_in_a_row = 0

    def check(self, loss: float, step: int, sequences: list[int], local_finite: bool) -> str:
        """'ok', 'skip' or 'rewind'; raises FloatingPointError for policy raise or too many bad steps."""
        if math.isfinite(loss):
            self.bad_in_a_row = 0
            return "ok"
        self.bad_in_a_row += 1
        where = (f"loss is {loss} at step {step}; rank {self.rank} trained on global sequences {sequences}, "
                 f"its local loss was {'finite' if local_finite else 'NOT finite'}")
        if self.policy == "raise":
            raise FloatingPointError(f"{where} (faults.nan_policy=raise; 'skip' or 'rewind' carry on)")
        if self.bad_in_a_row > self.max_bad:
            raise FloatingPointError(f"{where}: {self.bad_in_a_row} non-finite steps in a row exceed "
                                     f"faults.max_bad_steps={self.max_bad} (faults.nan_policy={self.policy})")
        return self.policy


def discard_gradients(engine) -> None:
    """Drop the accumulated gradients without stepping (engines may know better: skip_step)."""
    if hasattr(engine, "skip_step"):
        engine.skip_step()
    else:
        engine.optimizer.zero_grad(set_to_none=True)


class StopRequest:
    """True on every rank once any rank sees the stop file ($LONGCTX_STOP_FILE)."""

    def __init__(self, path: str | None = None):
        self.path = path if path is not None else os.environ.get(STOP_FILE_ENV)

    def requested(self, device: torch.device | str = "cpu") -> bool:
        if not self.path:
            return False
        flag = torch.tensor([1.0 if os.path.exists(self.path) else 0.0], device=device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
