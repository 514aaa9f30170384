"""Joining and leaving the torchrun process group, and how a failed job ends.

`run_joined` is what `python -m train` runs: join, train, leave. `init` picks the backend
(nccl on CUDA, gloo on CPU), sets the collective timeout and starts the peer watchdog
(train/watchdog.py), so a peer that stopped answering ends the job after
train.dist_timeout_s with a message naming it. A rank that fails does not wait for its
peers: it skips the leaving barrier, its error gets a note naming the rank and step, and
main.py's torchrun error record (`record`) makes it the root cause torchrun prints last,
while the agent stops the other ranks at once. `describe_timeout` turns a backend's timeout
or lost-peer error into a message that says which setting to change. Under torchrun, a rank
that dies makes the agent restart the whole group (--max-restarts), and the restarted ranks
resume from the newest checkpoint.
"""
from __future__ import annotations

import datetime
import gc
import os

import torch
import torch.distributed as dist

from .watchdog import COLLECTIVE_GRACE_S, Watchdog, step_text

DEFAULT_TIMEOUT_S = 600.0
_progress = {"step": 0, "watchdog": None}


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def export_submitit_env() -> None:
    """Under Hydra's submitit launcher every Slurm task is one rank: turn the job's Slurm
    variables into torch's env:// ones (MASTER_ADDR = first node, RANK, WORLD_SIZE, ...)."""
    if launched_by_torchrun() or "SUBMITIT_EXECUTOR" not in os.environ:
        return
    from submitit.helpers import TorchDistributedEnvironment

    env = TorchDistributedEnvironment()
    if env.world_size > 1:
        env.export(set_cuda_visible_devices=False)


def init_from_config(cfg) -> bool:
    """Validate the whole config for this world size, then join: no process group exists
    while a bad setting can still raise, so every rank fails with the same ValueError."""
    from omegaconf import DictConfig, OmegaConf

    from .validate import validate

    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_object(cfg)
    export_submitit_env()
    validate(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    return init(cfg.train.device, cfg.train.dist_timeout_s)


def build_groups(cfg, dims):
    """megatron takes its rank grid from megatron-core's parallel_state; the others from ParallelDims."""
    if cfg.engine.name == "megatron":
        from .engines.megatron import build_groups as megatron_groups

        return megatron_groups(dims)
    return dims.build()


def join_single_process() -> None:
    """A 1-rank gloo group for an engine that needs one (DeepSpeed) in a plain single process."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


def backend_for(device: str) -> str:
    """nccl when the run uses CUDA, gloo on CPU."""
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    return "nccl" if use_cuda else "gloo"


def init(device: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """Join the process group torchrun describes (env://); False for a single process."""
    if timeout_s is None or timeout_s <= 0:
        raise ValueError(f"train.dist_timeout_s={timeout_s} must be a positive number of seconds")
    if not launched_by_torchrun() or dist.is_initialized():
        return False
    backend = backend_for(device)
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    timeout = datetime.timedelta(seconds=timeout_s + COLLECTIVE_GRACE_S)
    store = _restart_scoped_store(timeout)
    if store is None:
        dist.init_process_group(backend, timeout=timeout)
    else:
        dist.init_process_group(backend, store=store, rank=int(os.environ["RANK"]),
                                world_size=int(os.environ["WORLD_SIZE"]), timeout=timeout)
    _progress["step"] = 0
    _progress["watchdog"] = Watchdog.connect(dist.get_rank(), dist.get_world_size(), timeout_s).start()
    return True


def beat(step: int) -> None:
    """The trainer is at `step` (called once per step): named in failure messages and heartbeats."""
    _progress["step"] = step
    if _progress["watchdog"] is not None:
        _progress["watchdog"].beat(step)


def run_joined(train, cfg) -> None:
    """Join the process group when torchrun launched us, run train(cfg), leave. On an error
    this rank leaves at once (no barrier: the peers may be blocked in a collective), and the
    error gets a note naming the rank, the step and, for a lost peer, who stopped answering."""
    joined = init_from_config(cfg)
    try:
        train(cfg)
    except BaseException as e:
        if joined:
            e.add_note(failure_note(e))
            _leave_watchdog()
        raise
    if joined:
        shutdown()


def failure_note(error: BaseException) -> str:
    note = f"[longctx] rank {dist.get_rank()} failed at {step_text(_progress['step'])}"
    watchdog = _progress["watchdog"]
    if watchdog is not None and is_timeout(error):
        silent = watchdog.silent_ranks()
        if silent:
            note += f"; rank(s) {', '.join(map(str, silent))} stopped answering"
    return note + "; the other ranks are stopped by the launcher"


def _leave_watchdog() -> None:
    if _progress["watchdog"] is not None:
        _progress["watchdog"].leave()
        _progress["watchdog"] = None


def _restart_scoped_store(timeout: datetime.timedelta):
    """The torchrun agent's key-value store, under a prefix unique to this restart attempt.

    After torchrun --max-restarts restarts the ranks, they meet in the same agent store as
    the attempt that failed; process groups get the same names again, so a rank could read
    a dead peer's address left by the earlier attempt (gloo: "Connection refused" or a hang
    while creating groups). A per-attempt prefix keeps attempts apart."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    agent_store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                                timeout=timeout)
    return dist.PrefixStore(f"longctx/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", agent_store)


def shutdown() -> None:
    """Leave the process group. Call it after the engine (and its DDP reducer) is gone: with
    torch 2.13 on CPU, destroying the group while a reducer is alive sometimes aborts the
    process at exit ("terminate called without an active exception"); the collected
    garbage and a barrier first make every rank leave together."""
    gc.collect()
    _leave_watchdog()
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


PEER_FAILURE = ("timed out", "timeout", "connection closed", "connection reset", "broken pipe")


def is_timeout(error: BaseException) -> bool:
    """Whether a collective failed because a peer is gone or too slow (not a bug of ours)."""
    return any(text in str(error).lower() for text in PEER_FAILURE)


def describe_timeout(error: BaseException, step: int, timeout_s: float) -> str:
    rank = dist.get_rank() if dist.is_initialized() else 0
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return (
        f"rank {rank}: a collective failed at step {step}: a peer rank died, or hung for longer than "
        f"train.dist_timeout_s={timeout_s:g}s (see the other ranks' logs; raise train.dist_timeout_s if "
        f"steps are legitimately that slow). Backend said: {first_line}"
    )
