"""Peak memory per token of context, and the longest context that fits a memory budget,
for each combination of train.activation_checkpoint / loss_chunk / mlp_chunk.

    python -m scripts.bench_memory --seqlens 4096 8192 --budget-gb 24 --out bench_memory
    python -m scripts.bench_memory --time-seqlen 8192 --rounds 2 --out bench_memory
    MALLOC_MMAP_THRESHOLD_=131072 python -m scripts.bench_memory --seqlens 262144 \
        --settings full+loss2048+mlp2048 --doc-len 2048 --out big

Each (setting, seqlen) is one training step of `model=small data=synthetic
data.vocab_size=32000` in a fresh process (documents from the ProLong mix scaled to the
seqlen, or all --doc-len tokens long: attention then costs O(T x doc-len), not O(T^2)),
whose peak is the loop's `memory/peak_mb` (VmHWM on CPU, max_memory_allocated on CUDA).
Per token = the slope between the two shortest seqlens; the longest context = where that
line reaches --budget-gb.  Beside each measurement: the step time and
`models.memory.predict_peak_bytes`.  --time-seqlen times
forward+backward of none / selective / full interleaved in one process (ratios to none).
Results: <out>/results.jsonl (appended), results.md, memory_vs_seqlen.png.
"""
from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SETUP = ["model=small", "data=synthetic", "data.vocab_size=32000", "train.progress=false", "logger=disabled",
         "train.dtype=float32"]
MODES = ("none", "selective", "full")


def all_settings(chunk: int) -> dict[str, dict]:
    """name -> memory options, every combination of the three settings."""
    out = {}
    for mode, loss, mlp in itertools.product(MODES, (0, chunk), (0, chunk)):
        name = mode + (f"+loss{loss}" if loss else "") + (f"+mlp{mlp}" if mlp else "")
        out[name] = {"activation_checkpoint": mode, "loss_chunk": loss, "mlp_chunk": mlp}
    return out


def doc_len_overrides(doc_len: int, seqlen: int, out_dir: str) -> list[str]:
    """Data settings for documents of exactly `doc_len` tokens (none when 0): a one-length
    list, unscaled (data.doclens_context = seqlen)."""
    if not doc_len:
        return []
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(os.path.abspath(out_dir), f"doclens_{doc_len}.json")
    with open(path, "w") as f:
        json.dump([doc_len], f)
    return [f"data.doclens={path}", f"data.doclens_context={seqlen}"]


def compose(seqlen: int, options: dict, device: str, out_dir: str, doc_len: int = 0):
    from hydra import compose as hydra_compose, initialize_config_dir
    from omegaconf import OmegaConf

    from train.config import register

    register()
    overrides = [*SETUP, f"data.seqlen={seqlen}", f"train.device={device}", f"train.out_dir={out_dir}",
                 *doc_len_overrides(doc_len, seqlen, out_dir), *(f"train.{k}={v}" for k, v in options.items())]
    with initialize_config_dir(config_dir=os.path.join(REPO_ROOT, "conf"), version_base="1.3"):
        return OmegaConf.to_object(hydra_compose("config", overrides=overrides))


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def worker(seqlen: int, options: dict, device: str, out_dir: str, doc_len: int = 0) -> dict:
    """One training step in this (fresh) process: its peak memory and time."""
    import torch

    from train.loop import run

    cfg = compose(seqlen, {**options, "steps": 1}, device, out_dir, doc_len)
    base = rss_mb() if device == "cpu" else torch.cuda.memory_allocated() / 2**20
    (m,) = run(cfg)
    return {"seqlen": seqlen, **options, "device": device, "doc_len": doc_len, "peak_mb": m["memory/peak_mb"],
            "runtime_mb": base, "step_s": m["time/step_s"]}


def measure(name: str, seqlen: int, options: dict, device: str, out: str, doc_len: int = 0) -> dict:
    cmd = [sys.executable, "-m", "scripts.bench_memory", "--worker", json.dumps(options), "--seqlens", str(seqlen),
           "--device", device, "--out", out, "--doc-len", str(doc_len)]
    env = {**os.environ, "PYTHONPATH": REPO_ROOT, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO_ROOT)
    if proc.returncode != 0:
        return {"setting": name, "seqlen": seqlen, "error": proc.stderr.strip().splitlines()[-1:]}
    return {"setting": name, **json.loads(proc.stdout.strip().splitlines()[-1])}


def time_interleaved(seqlen: int, rounds: int, device: str) -> dict:
    """Forward+backward of one sequence with each checkpoint mode in turn, `rounds` times, one
    process and one model, the order reversed every other round; median CPU seconds of the
    process (a busy shared machine stretches wall time, not CPU time) and ratio to none."""
    import dataclasses
    import statistics

    import torch

    import parallel
    from models.llama import Llama
    from models.memory import MemoryOptions
    from train.data import build_loader, next_token_labels
    from train.loop import build_mask

    cfg = compose(seqlen, {}, device, "/tmp")
    loader = build_loader(cfg.data, 0, 0, 1)
    torch.manual_seed(0)
    model = Llama(dataclasses.replace(cfg.model, vocab_size=cfg.data.vocab_size))
    seq = next(loader)
    cp = parallel.build("none", build_mask(seq.doc_lens, cfg.train), seqlen)
    labels = next_token_labels(seq.tokens, seq.doc_lens)
    times = {mode: [] for mode in MODES}
    for r in range(rounds):  # no warm-up pass: full goes first, so a cold start counts against it
        for mode in MODES[::-1] if r % 2 == 0 else MODES:
            model.memory = MemoryOptions(mode)
            t0 = time.process_time()
            model(seq.tokens, cp.positions, cp.attention, labels=labels).backward()
            model.zero_grad(set_to_none=True)
            times[mode].append(time.process_time() - t0)
    med = {mode: statistics.median(ts) for mode, ts in times.items()}
    return {"timing_seqlen": seqlen, "rounds": rounds, "seconds": times, "median_s": med,
            "ratio_to_none": {mode: med[mode] / med["none"] for mode in MODES}}


def fit(points: list[dict]) -> tuple[float, float]:
    """(MB per token, intercept MB) through the two shortest seqlens."""
    a, b = sorted(points, key=lambda p: p["seqlen"])[:2]
    slope = (b["peak_mb"] - a["peak_mb"]) / (b["seqlen"] - a["seqlen"])
    return slope, a["peak_mb"] - slope * a["seqlen"]


@functools.cache
def measured_model():
    """The LlamaConfig the measurements train (SETUP's model and vocabulary)."""
    import dataclasses

    cfg = compose(1024, {}, "cpu", "/tmp")
    return dataclasses.replace(cfg.model, vocab_size=cfg.data.vocab_size)


def predicted_mb(rec: dict, seqlen: int | None = None) -> float:
    """The formula's peak for a measured record (at `seqlen` instead of its own when given)."""
    from models.memory import MemoryOptions, predict_peak_bytes

    model = measured_model()
    options = MemoryOptions(rec["activation_checkpoint"], rec["loss_chunk"], rec["mlp_chunk"])
    return rec["runtime_mb"] + predict_peak_bytes(model, seqlen or rec["seqlen"], options) / 2**20


def longest_predicted(rec: dict, budget_mb: float) -> int:
    """The longest context whose predicted peak fits the budget (bisection on tokens)."""
    lo, hi = 0, 1 << 26
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if predicted_mb(rec, mid) <= budget_mb else (lo, mid)
    return lo


def report(records: list[dict], budget_gb: float, out: str) -> str:
    ok = [r for r in records if "peak_mb" in r]
    by_setting: dict[str, list[dict]] = {}
    for r in ok:
        by_setting.setdefault(r["setting"], []).append(r)
    lines = [f"| setting | seqlen | peak MB | predicted MB | error | step s (wall) | MB/token | longest T in "
             f"{budget_gb:g} GB (line) | (formula) |", "|---|---|---|---|---|---|---|---|---|"]
    for name, points in by_setting.items():
        seqlens = {p["seqlen"] for p in points}
        slope, icpt = fit(points) if len(seqlens) >= 2 else (None, None)
        longest = f"{longest_predicted(points[0], budget_gb * 1024):,}"
        for p in sorted(points, key=lambda p: p["seqlen"]):
            pred = predicted_mb(p)
            per_token = f"{slope:.4f}" if slope else ""
            line = f"{int((budget_gb * 1024 - icpt) / slope):,}" if slope else ""
            error = (pred - p["peak_mb"]) / p["peak_mb"]
            lines.append(f"| {name} | {p['seqlen']:,} | {p['peak_mb']:.0f} | {pred:.0f} | {error:+.1%} | "
                         f"{p['step_s']:.1f} | {per_token} | {line} | {longest} |")
    for r in records:
        if "error" in r:
            lines.append(f"| {r['setting']} | {r['seqlen']:,} | failed: {' '.join(r['error'])} | | | | | | |")
    for r in records:
        if "ratio_to_none" in r:
            lines.append("")
            modes = ", ".join(f"{m} {r['median_s'][m]:.1f} s ({r['ratio_to_none'][m]:.2f}x)" for m in MODES)
            lines.append(f"Step CPU time (forward+backward) at {r['timing_seqlen']:,} tokens, median of "
                         f"{r['rounds']} interleaved rounds: {modes}")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(text)
    plot(by_setting, os.path.join(out, "memory_vs_seqlen.png"))
    return text


def plot(by_setting: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, points in sorted(by_setting.items()):
        points = sorted(points, key=lambda p: p["seqlen"])
        ax.plot([p["seqlen"] for p in points], [p["peak_mb"] / 1024 for p in points], marker="o", label=name)
    ax.set_xlabel("tokens of context (one process)")
    ax.set_ylabel("peak memory, GB")
    ax.set_title("model=small, vocab 32000, one training step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqlens", type=int, nargs="*", default=[4096, 8192])
    ap.add_argument("--settings", nargs="*", help="names from the full combination list (default: all)")
    ap.add_argument("--chunk", type=int, default=2048, help="loss_chunk / mlp_chunk when on")
    ap.add_argument("--budget-gb", type=float, default=24.0)
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--doc-len", type=int, default=0, help="every document this many tokens (0: the ProLong mix "
                    "scaled to the seqlen)")
    ap.add_argument("--jobs", type=int, default=1, help="measurements at once (each its own process)")
    ap.add_argument("--time-seqlen", type=int, default=0, help="also time the checkpoint modes at this seqlen")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default="bench_memory")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--report-only", action="store_true", help="rewrite results.md / PNG from results.jsonl")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.worker:
        rec = worker(args.seqlens[0], json.loads(args.worker), args.device, args.out, args.doc_len)
        print(json.dumps(rec), flush=True)
        return
    path = os.path.join(args.out, "results.jsonl")
    if not args.report_only:
        settings = all_settings(args.chunk)
        unknown = set(args.settings or ()) - set(settings)
        if unknown:
            raise SystemExit(f"--settings {' '.join(sorted(unknown))}: unknown; choose from {' '.join(settings)}")
        cells = [(n, t) for n in (args.settings or settings) for t in args.seqlens]
        with ThreadPoolExecutor(args.jobs) as pool, open(path, "a") as f:
            for rec in pool.map(lambda c: measure(c[0], c[1], settings[c[0]], args.device, args.out,
                                                  args.doc_len), cells):
                print(json.dumps(rec), flush=True)
                f.write(json.dumps(rec) + "\n")
                f.flush()
            if args.time_seqlen:
                rec = time_interleaved(args.time_seqlen, args.rounds, args.device)
                print(json.dumps(rec), flush=True)
                f.write(json.dumps(rec) + "\n")
                f.flush()
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    print(report(records, args.budget_gb, args.out))


if __name__ == "__main__":
    main()
