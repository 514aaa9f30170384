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
Dead peers are handled elsewhere: the peer watchdog (train/watchdog.py), collective
timeouts (train/dist.py) and torchrun --max-restarts with automatic resume
(train/checkpoint.py); the trainer reports each step to them with `train.dist.beat`.

`python -m train.faults root-cause FOLDER` prints the earliest error among the torchrun
error records in FOLDER (slurm/launch.sh: one per node), so a multi-node job's root cause is
the last thing in its log.

Test-only fault injection: `faults.inject=raise@1:3` raises InjectedFault on rank 1 when
step 3 begins, so the failure path can be tested end to end; leave it unset in real runs.
"""
from __future__ import annotations

import glob
import json
import math
import os
import re
import sys

import torch
import torch.distributed as dist


POLICIES = ("raise", "skip", "rewind")
STOP_FILE_ENV = "LONGCTX_STOP_FILE"
INJECT = re.compile(r"^raise@(\d+):(\d+)$")


class InjectedFault(RuntimeError):
    """Raised by faults.inject=raise@<rank>:<step> (tests only)."""


def validate(faults_cfg, checkpoint_cfg) -> None:
    """Checked on every rank before any process group exists."""
    if faults_cfg.nan_policy not in POLICIES:
        raise ValueError(f"faults.nan_policy={faults_cfg.nan_policy!r} is unknown; choose one of {', '.join(POLICIES)}")
    if faults_cfg.max_bad_steps < 1:
        raise ValueError(f"faults.max_bad_steps={faults_cfg.max_bad_steps} must be >= 1")
    if faults_cfg.nan_policy == "rewind" and not checkpoint_cfg.every:
        raise ValueError("faults.nan_policy=rewind reloads the last checkpoint, so it needs checkpoint.every > 0 "
                         "(e.g. checkpoint=default)")
    if faults_cfg.inject is not None and not INJECT.match(faults_cfg.inject):
        raise ValueError(f"faults.inject={faults_cfg.inject!r} must look like raise@<rank>:<step> "
                         f"(a test-only setting; leave it unset otherwise)")


def begin_step(faults_cfg, rank: int, step: int) -> None:
    """Called as each step begins (after train.dist.beat): fire the test-only fault
    faults.inject names for this rank and step."""
    found = INJECT.match(faults_cfg.inject or "")
    if found and (int(found.group(1)), int(found.group(2))) == (rank, step):
        raise InjectedFault(f"faults.inject={faults_cfg.inject}: rank {rank} raised at step {step}")


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


def root_cause(folder: str) -> str | None:
    """The last lines (exception and notes) of the earliest torchrun error record in folder."""
    records = []
    for path in glob.glob(os.path.join(folder, "*.json")):
        try:
            with open(path) as f:
                message = json.load(f)["message"]
            records.append((int(message["extraInfo"]["timestamp"]), path, message["extraInfo"]["py_callstack"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    if not records:
        return None
    _, path, callstack = min(records)
    lines = [line.strip() for line in callstack.splitlines() if line.strip()]
    tail = [line for line in lines[-4:] if not line.startswith(("File ", "^", "raise "))]
    return f"root cause (torchrun's record {os.path.basename(path)}, the earliest):\n  " + "\n  ".join(tail)


if __name__ == "__main__":
    if sys.argv[1:2] != ["root-cause"] or len(sys.argv) < 3:
        raise SystemExit("usage: python -m train.faults root-cause FOLDER [HEADLINE]")
    cause = root_cause(sys.argv[2])
    print(" ".join(sys.argv[3:]) + ("; " + cause if cause else "; no torchrun error record was written"), flush=True)
