"""The GPU acceptance check: what CPU tests cannot show, run in one go when a GPU is lent.

1. kernels: each GPU backend (`triton`, `flash`) x dtype x mask x head layout against the
   `reference` backend in float64 on the same device: out, lse, dq, dk, dv, each within a
   dtype's tolerance (relative to the reference's largest value).
2. cp: a 2-process CP run sharing the one device (gloo over CUDA tensors, since nccl refuses
   two ranks on one GPU): each strategy's gathered output and gradients against
   single-process `kernels.attention`.
3. bench: forward + backward time of our backends against flash-attn's own varlen call on
   causal documents (CUDA events, median of repeats).

Every case is recorded with its error (an exception is a failed case, never a crash), and
the whole run is written to OUT/results.json and OUT/results.md; the exit code is 1 when any
case failed.  `scripts/gpu_check.sh` runs it under a time limit.  On a CPU machine the same
plumbing runs with `--device cpu --backends cpu --dtypes float32 --bench-seqlens` (no bench).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
import traceback

import torch

import kernels
from kernels import MaskSpec

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# relative to max(1, max |reference|): float32 on GPUs may run its matmuls in TF32
TOLERANCE = {torch.float32: 2e-3, torch.bfloat16: 4e-2, torch.float16: 8e-3, torch.float64: 1e-9}
HEADS = {"MHA": (8, 8), "GQA": (8, 2)}
STRATEGIES = (("ring", "headtail"), ("ring", "per_doc"), ("allgather", None), ("ulysses", None), ("cad", None))
# flash-attn computes float16 / bfloat16 only
SUPPORTED = {"flash": (torch.float16, torch.bfloat16)}


def mask_catalogue(seqlen: int) -> dict[str, MaskSpec]:
    """Every kind of contract 1 on documents of uneven lengths summing to seqlen."""
    docs = [seqlen // 8, seqlen // 2, seqlen // 8 + 3]
    docs.append(seqlen - sum(docs))
    return {
        "causal": MaskSpec(causal=True),
        "bidirectional": MaskSpec(),
        "document": MaskSpec.from_doc_lens(docs, causal=True),
        "document-bidirectional": MaskSpec.from_doc_lens(docs, causal=False),
        "window": MaskSpec(causal=True, window=seqlen // 5),
        "document+window": MaskSpec.from_doc_lens(docs, causal=True, window=seqlen // 6),
    }


def max_error(actual, expected) -> float:
    """max |a - e| / max(1, max |e|) over finite entries; inf when -inf rows or NaNs differ."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    if a.shape != e.shape or not torch.equal(torch.isneginf(a), torch.isneginf(e)) or torch.isnan(a).any():
        return float("inf")
    fin = torch.isfinite(e)
    if not fin.any():
        return 0.0
    return (a[fin] - e[fin]).abs().max().item() / max(1.0, e[fin].abs().max().item())


def attention_and_grads(fn, q, k, v, dout):
    """(out, lse, dq, dk, dv) of fn(q, k, v) -> (out, lse) with out's cotangent dout."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out, lse = fn(q, k, v)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout.to(out.dtype))
    return out, lse, dq, dk, dv


def compare(got, want, dtype) -> dict:
    errors = {n: max_error(g, w) for n, g, w in zip(("out", "lse", "dq", "dk", "dv"), got, want)}
    worst = max(errors.values())
    return {"errors": errors, "max_error": worst, "tolerance": TOLERANCE[dtype], "ok": worst <= TOLERANCE[dtype]}


def guarded(record: dict, fn) -> dict:
    """Run one case; an exception fails the case with its message instead of ending the run."""
    try:
        record.update(fn())
    except Exception as e:  # noqa: BLE001 - every failure of a case is a result to report
        record.update(ok=False, error=f"{type(e).__name__}: {e}".splitlines()[0])
        traceback.print_exc(file=sys.stderr)
    return record


def inputs(seqlen, hq, hkv, d, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(seqlen, h, d, generator=g, dtype=torch.float64) for h in (hq, hkv, hkv))
    dout = torch.randn(seqlen, hq, d, generator=g, dtype=torch.float64)
    return [t.to(device=device, dtype=dtype) for t in (q, k, v, dout)]


def check_kernels(device, backends, dtypes, seqlen, head_dim) -> list[dict]:
    cases = []
    for name, mask in mask_catalogue(seqlen).items():
        for heads, (hq, hkv) in HEADS.items():
            q64, k64, v64, d64 = inputs(seqlen, hq, hkv, head_dim, device, torch.float64)
            want = attention_and_grads(lambda q, k, v: kernels.attention(q, k, v, mask, backend="reference"),
                                       q64, k64, v64, d64)
            for backend in backends:
                for dtype in dtypes:
                    record = {"backend": backend, "dtype": str(dtype).replace("torch.", ""), "mask": name,
                              "heads": heads}
                    if dtype not in SUPPORTED.get(backend, (dtype,)):
                        cases.append(dict(record, ok=None, skipped=f"{backend} does not compute {record['dtype']}"))
                        continue
                    q, k, v, dout = (t.to(dtype) for t in (q64, k64, v64, d64))
                    run = lambda: compare(attention_and_grads(
                        lambda q, k, v: kernels.attention(q, k, v, mask, backend=backend), q, k, v, dout), want, dtype)
                    cases.append(guarded(record, run))
    return cases


def _cp_rank(rank, world, port, device, backend, dtype, seqlen, head_dim, results):
    import torch.distributed as dist

    import parallel

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        for mask_name, mask in mask_catalogue(seqlen).items():
            q, k, v, dout = inputs(seqlen, 8, 2, head_dim, device, dtype)
            want = attention_and_grads(lambda q, k, v: kernels.attention(q, k, v, mask, backend="reference"),
                                       *(t.double() for t in (q, k, v, dout)))
            for strategy, balancer in STRATEGIES:
                record = {"strategy": strategy, "balancer": balancer or "default", "mask": mask_name,
                          "backend": backend, "dtype": str(dtype).replace("torch.", "")}

                def run():
                    cp = parallel.build(strategy, mask, seqlen, balancer=balancer, backend=backend)
                    got = attention_and_grads(lambda q, k, v: cp.attention_with_lse(*(cp.shard(t) for t in (q, k, v))),
                                              q, k, v, cp.shard(dout))
                    # each rank's full-size gradients are exact on its own rows only
                    gather = lambda x: cp.unshard(cp.shard(x.detach()) if x.shape[0] == seqlen else x.detach())
                    out, lse, *grads = got
                    gathered = (gather(out), gather(lse.t().contiguous()).t(), *map(gather, grads))
                    return compare(gathered, want, dtype)

                record = guarded(record, run)
                if rank == 0:
                    results.append(record)
    finally:
        dist.destroy_process_group()


def check_cp(device, backend, dtype, seqlen, head_dim) -> list[dict]:
    """Both ranks compute on `device`; gloo carries the messages."""
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.get_context("spawn").Manager() as manager:
        results = manager.list()
        mp.spawn(_cp_rank, args=(2, port, device, backend, dtype, seqlen, head_dim, results), nprocs=2)
        return list(results)


def cuda_time(step, repeats: int) -> float:
    """Median milliseconds of step() by CUDA events, after one warm-up."""
    step()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def bench(backends, seqlens, head_dim, repeats) -> list[dict]:
    """fwd+bwd ms of our backends and of flash-attn's varlen call, causal 4 documents, bf16, 32/8 heads."""
    rows = []
    for seqlen in seqlens:
        docs = [seqlen // 4] * 4
        mask = MaskSpec.from_doc_lens(docs, causal=True)
        q, k, v, dout = inputs(seqlen, 32, 8, head_dim, "cuda", torch.bfloat16)
        runs = {b: (lambda b=b: kernels.attention(q, k, v, mask, backend=b)) for b in backends}
        try:
            from flash_attn import flash_attn_varlen_func

            cu = torch.tensor([0, *torch.tensor(docs).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
            runs["flash-attn (direct)"] = lambda: (flash_attn_varlen_func(q, k, v, cu, cu, seqlen // 4, seqlen // 4,
                                                                          causal=True), None)
        except ImportError:
            rows.append({"seqlen": seqlen, "impl": "flash-attn (direct)", "ok": None, "skipped": "not installed"})
        for impl, fn in runs.items():
            def timed(fn=fn):
                def step():
                    for t in (q, k, v):
                        t.requires_grad_(True).grad = None
                    fn()[0].backward(dout)
                return {"ms": cuda_time(step, repeats), "ok": True}

            rows.append(guarded({"seqlen": seqlen, "impl": impl}, timed))
    return rows


def markdown(report: dict) -> str:
    lines = [f"# GPU check ({report['device_name']}, torch {report['torch']}, {report['date']})", ""]
    for section in ("kernels", "cp", "bench"):
        rows = report[section]
        if not rows:
            continue
        keys = [k for k in rows[0] if k not in ("errors",)]
        keys += [k for r in rows for k in r if k not in keys and k != "errors"]
        keys = list(dict.fromkeys(keys))
        lines += [f"## {section}", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        for r in rows:
            cells = [f"{r[k]:.3g}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k in keys]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    failed = [r for s in ("kernels", "cp", "bench") for r in report[s] if r.get("ok") is False]
    lines.append(f"**{len(failed)} failed** of {sum(len(report[s]) for s in ('kernels', 'cp', 'bench'))} cases.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="gpu_check_out", help="folder for results.json / results.md")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--backends", nargs="+", default=["triton", "flash"])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=sorted(DTYPES))
    ap.add_argument("--seqlen", type=int, default=512, help="tokens of the exactness cases")
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--cp-backend", default="triton", help="kernel backend of the 2-process CP run")
    ap.add_argument("--bench-seqlens", type=int, nargs="*", default=[4096, 16384, 65536])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: --device cuda but torch sees no CUDA device "
              f"(torch {torch.__version__}); run on a GPU machine or pass --device cpu", file=sys.stderr)
        return 2
    dtypes = [DTYPES[d] for d in args.dtypes]
    t0 = time.time()
    report = {"device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M"),
              "available_backends": kernels.available_backends(device)}
    os.makedirs(args.out, exist_ok=True)

    def save() -> str:
        """Written after every section, so a run stopped by its time limit keeps what it did."""
        report["seconds"] = round(time.time() - t0, 1)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(report, f, indent=1, default=str)
        text = markdown(report)
        with open(os.path.join(args.out, "results.md"), "w") as f:
            f.write(text)
        return text

    report.update(kernels=[], cp=[], bench=[])
    report["kernels"] = check_kernels(device, args.backends, dtypes, args.seqlen, args.head_dim)
    save()
    report["cp"] = check_cp(device, args.cp_backend, dtypes[0], args.seqlen, args.head_dim)
    save()
    if args.bench_seqlens and device.type == "cuda":
        report["bench"] = bench(args.backends, args.bench_seqlens, args.head_dim, args.repeats)
    text = save()
    print(text)
    print(f"written to {args.out}/results.md and results.json in {report['seconds']} s")
    return 1 if any(r.get("ok") is False for s in ("kernels", "cp", "bench") for r in report[s]) else 0


if __name__ == "__main__":
    sys.exit(main())
