"""One rank of a benchmark launch: run every cell of one world size, append JSON lines.

Started by `scripts.bench_cp` as `torchrun --nproc_per_node P -m scripts.bench_worker
CELLS.json RESULTS.jsonl`.  Per cell every rank builds the same global q/k/v/dout (same
seed), shards them with the strategy, runs forward and backward once, gathers outputs and
gradients by global position to rank 0 and compares them with single-process
`kernels.attention`.  A cell whose result is not exact is written with correct=false and
its errors, and is not timed (reported as WRONG); a right one is timed over warm-up +
repeats (the checked step counts as the first warm-up; the slowest rank's time per repeat).
Peers (`peer:<name>`, scripts.bench_peers) run through the same steps; one that fails at run
time is recorded as WRONG with its error.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

import kernels
import parallel
from parallel.perf.calibrate import PEERS_MODELLED_AS
from parallel.perf.cost import Layout, bytes_sent, has_hook, mask_keys
from parallel.perf.probes import max_over_ranks, run_probes, sync
from parallel.perf.workload import make_mask
from scripts.bench_peers import build_peer

TOL = {torch.float32: 2e-4, torch.float64: 1e-9, torch.bfloat16: 3e-2, torch.float16: 3e-3}


class PeakRSS:
    """Peak resident memory of this process while inside the block, minus its level at entry
    (CPU); torch.cuda.max_memory_allocated on GPU.

    On CPU the kernel's own high-water mark is used: writing "5" to /proc/self/clear_refs
    resets VmHWM, which is read back at exit.  No sampling thread runs, so the measurement
    takes no CPU from a rank that has one core to itself (a thread waking every few ms did,
    and only in the multi-rank cells: the 1-rank baseline's sampler had the idle core).
    Where the reset is refused, the peak since process start is reported instead."""

    def __init__(self, device):
        self.device, self.peak = device, 0

    @staticmethod
    def _status_kb(field: str) -> int:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        return 0

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
            except OSError:
                pass
            self.base = self._status_kb("VmRSS") * 1024
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.peak = torch.cuda.max_memory_allocated(self.device)
        else:
            self.peak = self._status_kb("VmHWM") * 1024
        self.mb = max(self.peak - self.base, 0) / 2**20


def _inputs(cell, device, dtype):
    g = torch.Generator().manual_seed(cell["seed"])
    t, hq, hkv, d = cell["seqlen"], cell["hq"], cell["hkv"], cell["head_dim"]
    q, k, v, dout = (torch.randn(t, h, d, generator=g) for h in (hq, hkv, hkv, hq))
    return [x.to(device=device, dtype=dtype) for x in (q, k, v, dout)]


class KernelBaseline:
    """The 1-rank reference point: single-process kernels.attention on the whole sequence."""

    def __init__(self, mask, seqlen):
        self.mask, self.positions, self.stats = mask, torch.arange(seqlen), None

    def shard(self, x):
        return x

    def attention(self, q, k, v):
        return kernels.attention(q, k, v, self.mask)[0]


def _build(cell, mask, device):
    if cell["strategy"] == "kernel":
        return KernelBaseline(mask, cell["seqlen"])
    if cell["strategy"].startswith("peer:"):
        return build_peer(cell["strategy"][5:], mask, cell, device, cell.get("extra_peers"))
    return parallel.build(cell["strategy"], mask, cell["seqlen"], balancer=cell.get("balancer"), **cell.get("options", {}))


def _gather_rows(pos, tensors):
    """Gather (global positions, tensors) from every rank to rank 0, scattered into global order."""
    world, rank = dist.get_world_size(), dist.get_rank()
    sizes = [None] * world
    dist.all_gather_object(sizes, int(pos.numel()))
    most = max(sizes)
    out = []
    for x in [pos] + tensors:
        pad = torch.zeros((most,) + tuple(x.shape[1:]), dtype=x.dtype)
        pad[: x.shape[0]] = x.detach().cpu()
        bufs = [torch.empty_like(pad) for _ in range(world)] if rank == 0 else None
        dist.gather(pad, bufs, dst=0)
        out.append(None if bufs is None else torch.cat([b[:n] for b, n in zip(bufs, sizes)]))
    if rank:
        return None
    order = torch.argsort(out[0])
    return [x[order] for x in out[1:]]


_REFERENCE: dict = {}


def _reference(cell, mask, inputs, dtype):
    """Single-process out/dq/dk/dv of this shape, computed once per launch and reused by
    every strategy of the same (mask, seqlen, heads, seed)."""
    key = (cell["mask"], cell["seqlen"], cell["hq"], cell["hkv"], cell["head_dim"], cell["dtype"], cell["seed"],
           cell.get("window"), tuple(cell.get("doc_lens") or ()))
    if key not in _REFERENCE:
        _REFERENCE.clear()
        q, k, v, dout = (x.detach().cpu().to(torch.float64 if dtype == torch.float64 else torch.float32)
                         .requires_grad_(True) for x in inputs)
        out, _ = kernels.attention(q, k, v, mask)
        out.backward(dout.detach())
        _REFERENCE[key] = [out.detach(), q.grad, k.grad, v.grad]
    return _REFERENCE[key]


def _check(cell, mask, inputs, got, dtype):
    """Max error of out/dq/dk/dv, relative to the reference's largest magnitude (rank 0)."""
    errs = {}
    for name, ref, val in zip(("out", "dq", "dk", "dv"), _reference(cell, mask, inputs, dtype), got):
        scale = float(ref.detach().abs().max()) or 1.0
        errs[name] = float((val.to(ref.dtype) - ref).abs().max()) / scale
    return errs, all(e <= TOL[dtype] for e in errs.values()) and all(e == e for e in errs.values())


class _closing:
    """Leave what a peer holds between calls (torch CP's patched SDPA dispatcher) when its
    cell is done, so the next cell runs plain."""

    def __init__(self, cp):
        self.cp = cp

    def __enter__(self):
        return self.cp

    def __exit__(self, *exc):
        getattr(self.cp, "close", lambda: None)()


def _step(cp, local, device):
    """One forward + backward on fresh leaves: ([out, dq, dk, dv], fwd s, bwd s), the times
    being the slowest rank's."""
    ql, kl, vl = (x.clone().requires_grad_(True) for x in local[:3])
    dist.barrier()
    sync(device)
    t0 = time.perf_counter()
    out = cp.attention(ql, kl, vl)
    sync(device)
    t1 = time.perf_counter()
    out.backward(local[3])
    sync(device)
    t2 = time.perf_counter()
    return [out, ql.grad, kl.grad, vl.grad], max_over_ranks(t1 - t0), max_over_ranks(t2 - t1)


def _agree(ok: bool) -> bool:
    """Rank 0's verdict, on every rank."""
    flag = torch.tensor([int(bool(ok))])
    dist.broadcast(flag, 0)
    return bool(flag.item())


def run_cell(cell, device) -> dict | None:
    """Check one cell, then time it if it is right; returns the JSON record on rank 0 (None
    elsewhere).  The checked step is the first warm-up; a wrong cell is not timed."""
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = getattr(torch, cell["dtype"])
    mask = make_mask(cell)
    q, k, v, dout = _inputs(cell, device, dtype)
    cp = _build(cell, mask, device)
    local = [cp.shard(x) for x in (q, k, v, dout)]
    fwd_t, bwd_t = [], []
    with _closing(cp):
        result, _, _ = _step(cp, local, device)
        got = _gather_rows(cp.positions.cpu(), result)
        errs, ok = {}, True  # the 1-rank baseline is the reference computation itself
        if rank == 0 and cell["strategy"] != "kernel":
            errs, ok = _check(cell, mask, (q, k, v, dout), got, dtype)
        ok = _agree(ok)
        with PeakRSS(device) as mem:
            for it in range(max(cell["warmup"] - 1, 0) + cell["repeats"] if ok else 0):
                _, f, b = _step(cp, local, device)
                if it >= cell["warmup"] - 1:
                    fwd_t.append(f)
                    bwd_t.append(b)
    peak = max_over_ranks(mem.mb)
    stats = getattr(cp, "stats", None)
    if rank != 0:
        return None
    keys = mask_keys(mask, cell["seqlen"])
    lay = Layout(cell["seqlen"], cell["hq"], cell["hkv"], cell["head_dim"], torch.finfo(dtype).bits // 8)
    rec = dict(cell, correct=ok, errors=errs, peak_mb_max=peak, total_pairs=int(keys.sum()),
               fwd_s_all=fwd_t, bwd_s_all=bwd_t, device=str(device), world_actual=world)
    if ok:
        rec.update(fwd_s=statistics.median(fwd_t), bwd_s=statistics.median(bwd_t))
    if hasattr(cp, "describe"):  # a peer: which version and kernel ran
        rec["peer_version"] = cp.describe()
    if stats is not None and stats.pairs:
        bwd = stats.extra.get("bytes_bwd_sent", [0] * world)
        rec.update(pairs=list(stats.pairs), bytes_sent=[f + b for f, b in zip(stats.bytes_sent, bwd)],
                   pairs_imbalance=stats.imbalance("pairs"),
                   extra={k: v for k, v in stats.extra.items() if isinstance(v, (int, float, str))})
    kind = PEERS_MODELLED_AS.get(cell["strategy"], (cell["strategy"],))[0]
    if world > 1 and has_hook(kind, "cost_bytes"):
        rows = [r.numpy() for r in cp.indices] if hasattr(cp, "indices") else None
        formula = bytes_sent(kind, lay, world, mask=mask, rows=rows, **cell.get("options", {}))
        rec["bytes_formula"] = [f + b for f, b in zip(formula["fwd"], formula["bwd"])]
    return rec


def main(argv=None):
    cells_path, out_path = (argv or sys.argv[1:])[:2]
    cells = json.load(open(cells_path))
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    for name, target in cells[0].get("extra_strategies", {}).items() if cells else ():
        parallel.STRATEGIES[name] = target
    link = run_probes(device)
    for cell in cells:
        try:
            rec = run_cell(cell, device)
            rec = None if rec is None else dict(rec, **link)
        except ValueError as e:  # the strategy refused this cell: record why, on every rank alike
            rec = dict(cell, correct=None, skipped=f"{type(e).__name__}: {e}") if dist.get_rank() == 0 else None
            dist.barrier()
        except Exception as e:  # noqa: BLE001  a peer failing at run time (all ranks alike): WRONG, with why
            if not cell["strategy"].startswith("peer:"):
                raise
            rec = dict(cell, correct=False, errors={}, error=f"{type(e).__name__}: {e}"[:500]) \
                if dist.get_rank() == 0 else None
            dist.barrier()
        if rec is not None:
            with open(out_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
    dist.barrier()
    dist.destroy_process_group()
    # Every record is written and closed.  Leave without running interpreter teardown: about
    # one launch in ten, a C++ thread torch left behind (seen after the autograd-aware
    # all_gather of the test fixtures) aborts the process during teardown ("terminate called
    # without an active exception"), which would fail a launch whose work is all done.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
