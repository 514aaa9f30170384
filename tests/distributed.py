"""Run a function on N CPU ranks (gloo) in spawned processes and collect the results.

Multi-process tests call `run_ranks(fn, world, *args)` once and loop over their case
matrix inside `fn`, so the cost of starting processes is paid once per test.
"""
from __future__ import annotations

import os
import socket
import traceback

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world, port, fn, args, queue, env):
    import datetime

    import torch
    import torch.distributed as dist

    os.environ.update(env)
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
            timeout=datetime.timedelta(seconds=120),
        )
        result = fn(rank, world, *args)
        dist.barrier()
        dist.destroy_process_group()
        queue.put((rank, True, result))
    except BaseException:  # noqa: BLE001 - shipped back to the parent verbatim
        queue.put((rank, False, traceback.format_exc()))


def run_ranks(fn, world: int, *args, timeout: float = 300.0, env: dict | None = None):
    """Call fn(rank, world, *args) on `world` gloo ranks; return results ordered by rank.

    Raises AssertionError with the child's traceback if any rank fails, and
    TimeoutError (after killing the ranks) if they do not finish in `timeout` seconds.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    env = {"OMP_NUM_THREADS": "1", **(env or {})}
    procs = [ctx.Process(target=_entry, args=(r, world, port, fn, args, queue, env), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    results, failures = {}, []
    try:
        for _ in range(world):
            rank, ok, payload = queue.get(timeout=timeout)
            if ok:
                results[rank] = payload
            else:
                failures.append(f"rank {rank}:\n{payload}")
                break
    except Exception as e:  # queue.Empty on timeout
        for p in procs:
            p.kill()
        raise TimeoutError(f"ranks did not finish within {timeout}s (finished: {sorted(results)})") from e
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
    if failures:
        raise AssertionError("\n".join(failures))
    return [results[r] for r in range(world)]
