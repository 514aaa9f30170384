"""Turn benchmark JSON lines into derived numbers, a Markdown table, PNG plots and wandb.

Derived per cell (DESIGN.md definitions): tokens/s = seqlen / (fwd + bwd); CP efficiency =
t(1 rank kernel) / (P * t(P ranks)); achieved TFLOPS = attention FLOPs (4 * pairs * Hq * D
forward, 2.5x backward) / time, summed over ranks; imbalance = pairs max / mean.  A cell
whose check failed is shown as WRONG and gets no speed figures.
"""
from __future__ import annotations

import json
import os

from parallel.auto import parse_choice
from parallel.perf.cost import attention_flops


def load_records(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _shape_key(r: dict) -> tuple:
    return (r["mask"], r["seqlen"], r["hq"], r["hkv"], r["head_dim"], r["dtype"])


def status(r: dict) -> str:
    if r.get("skipped"):
        return "SKIPPED"
    return "ok" if r.get("correct") else "WRONG"


def derive(records: list[dict]) -> list[dict]:
    """Add tokens_per_s, efficiency, tflops, spreads and bytes checks to each timed, correct cell."""
    base = {_shape_key(r): r["fwd_s"] + r["bwd_s"] for r in records
            if r["strategy"] == "kernel" and r.get("correct")}
    rows = []
    for r in records:
        d = dict(r, status=status(r))
        if d["status"] == "ok":
            total = r["fwd_s"] + r["bwd_s"]
            totals = [f + b for f, b in zip(r["fwd_s_all"], r["bwd_s_all"])]
            flops = attention_flops(r["total_pairs"], r["hq"], r["head_dim"]) * 3.5
            d.update(total_s=total, spread_s=max(totals) - min(totals), tokens_per_s=r["seqlen"] / total,
                     tflops=flops / total / 1e12)
            if _shape_key(r) in base:
                d["efficiency"] = base[_shape_key(r)] / (r["world"] * total)
            if "bytes_formula" in r and r.get("bytes_sent"):
                d["bytes_max"] = max(r["bytes_sent"])
                d["bytes_formula_max"] = max(r["bytes_formula"])
                d["bytes_match"] = list(r["bytes_sent"]) == list(r["bytes_formula"])
        rows.append(d)
    return rows


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def markdown(rows: list[dict]) -> str:
    head = ("| strategy | balancer | mask | T | P | Hq/Hkv | fwd ms | bwd ms | spread ms | tok/s | CP eff | "
            "TFLOPS | peak MB | max bytes/rank (formula) | pairs max/mean | max err | status |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in sorted(rows, key=lambda r: (r["mask"], r["seqlen"], r["hq"], r["hkv"], r["world"], r["strategy"],
                                         str(r.get("balancer")))):
        ok = r["status"] == "ok"
        bytes_col = "-"
        if r.get("bytes_max") is not None:
            bytes_col = f"{r['bytes_max']:,} ({r['bytes_formula_max']:,}{'' if r['bytes_match'] else ' MISMATCH'})"
        err = max(r["errors"].values()) if r.get("errors") else None
        stat = r["status"] if r["status"] != "SKIPPED" else f"SKIPPED: {r['skipped']}"
        lines.append("| " + " | ".join([
            r["strategy"], str(r.get("balancer") or "-"), r["mask"], str(r["seqlen"]), str(r["world"]),
            f"{r['hq']}/{r['hkv']}",
            _fmt(r.get("fwd_s") * 1e3 if ok else None, ".1f"), _fmt(r.get("bwd_s") * 1e3 if ok else None, ".1f"),
            _fmt(r.get("spread_s", 0) * 1e3 if ok else None, ".1f"), _fmt(r.get("tokens_per_s") if ok else None, ",.0f"),
            _fmt(r.get("efficiency") if ok else None, ".3f"), _fmt(r.get("tflops") if ok else None, ".4f"),
            _fmt(r.get("peak_mb_max") if ok else None, ".0f"), bytes_col if ok else "-",
            _fmt(r.get("pairs_imbalance"), ".3f"), _fmt(err, ".1e"), stat]) + " |")
    return "\n".join(lines) + "\n"


def _chosen_cell(auto: dict, cells: list[dict]) -> dict | None:
    """The measured cell of the strategy auto chose (same strategy, balancer and options)."""
    choice = parse_choice(auto.get("extra", {}).get("auto_choice", ""))
    if choice is None:
        return None
    strategy, balancer, opts = choice
    for r in cells:
        cell_opts = {k: str(v) for k, v in r.get("options", {}).items() if k in opts}
        if r["strategy"] == strategy and cell_opts == opts and r.get("balancer") in (None, balancer):
            return r
    return None


def auto_vs_best(rows: list[dict]) -> str:
    """Per shape and world size: auto's choice against the fastest measured strategy.

    `chosen ms` is the measured cell of the strategy auto picked (what the choice is worth,
    free of the auto cell's own run-to-run noise); `auto ms` is the auto cell itself.  Times
    are each cell's fastest repeat (fwd+bwd): on a shared machine interference only ever
    adds time, so the minimum is the estimate least moved by it (medians are in the main
    table)."""
    ok = [r for r in rows if r["status"] == "ok" and r["world"] > 1]
    lines = ["| mask | T | P | Hq/Hkv | auto chose | chosen ms (fastest) | auto ms (fastest) | best measured | "
             "best ms (fastest) | chosen / best | auto / best |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for key in sorted({(r["mask"], r["seqlen"], r["world"], r["hq"], r["hkv"]) for r in ok}):
        cells = [r for r in ok if (r["mask"], r["seqlen"], r["world"], r["hq"], r["hkv"]) == key]
        auto = [r for r in cells if r["strategy"] == "auto"]
        others = [r for r in cells if r["strategy"] not in ("auto",) and not r["strategy"].startswith("peer:")]
        if not auto or not others:
            continue
        fastest = lambda r: min(f + b for f, b in zip(r["fwd_s_all"], r["bwd_s_all"]))  # noqa: E731
        best = min(others, key=fastest)
        a = auto[0]
        chosen = _chosen_cell(a, others)
        ch_ms = f"{fastest(chosen) * 1e3:.0f}" if chosen else "-"
        ch_ratio = f"{fastest(chosen) / fastest(best):.3f}" if chosen else "-"
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]}/{key[4]} | {a.get('extra', {}).get('auto_choice')} | "
                     f"{ch_ms} | {fastest(a) * 1e3:.0f} | {best['strategy']}/{best.get('balancer') or '-'} | "
                     f"{fastest(best) * 1e3:.0f} | {ch_ratio} | {fastest(a) / fastest(best):.3f} |")
    return "\n".join(lines) + "\n" if len(lines) > 2 else ""


def write_plots(rows: list[dict], out_dir: str) -> list[str]:
    """throughput.png (tokens/s vs seqlen per strategy), imbalance.png, bytes.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] == "ok"]
    label = lambda r: f"{r['strategy']}/{r.get('balancer') or '-'} P={r['world']} H={r['hq']}/{r['hkv']}"  # noqa: E731
    paths = []
    fig, ax = plt.subplots(figsize=(8, 5))
    for mask in sorted({r["mask"] for r in ok}):
        for lab in sorted({label(r) for r in ok if r["mask"] == mask}):
            pts = sorted((r["seqlen"], r["tokens_per_s"]) for r in ok if r["mask"] == mask and label(r) == lab)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{mask}: {lab}")
    ax.set(xscale="log", xlabel="sequence length (tokens)", ylabel="tokens/s (fwd+bwd)", title="CP throughput")
    ax.legend(fontsize=6)
    paths.append(os.path.join(out_dir, "throughput.png"))
    fig.savefig(paths[-1], dpi=120, bbox_inches="tight")
    for name, key, ylab in (("imbalance", "pairs_imbalance", "pairs max/mean"),
                            ("bytes", "bytes_max", "bytes sent per rank")):
        sel = [r for r in ok if r.get(key) is not None]
        fig, ax = plt.subplots(figsize=(8, 5))
        ax.bar(range(len(sel)), [r[key] for r in sel])
        if key == "bytes_max":
            ax.plot(range(len(sel)), [r["bytes_formula_max"] for r in sel], "k_", markersize=20, label="formula")
            ax.legend()
        ax.set_xticks(range(len(sel)), [f"{label(r)} {r['mask']} T={r['seqlen']}" for r in sel], rotation=90, fontsize=6)
        ax.set(ylabel=ylab, title=ylab)
        paths.append(os.path.join(out_dir, f"{name}.png"))
        fig.savefig(paths[-1], dpi=120, bbox_inches="tight")
    plt.close("all")
    return paths


def write_reports(records: list[dict], out_dir: str, *, plots: bool = True, use_wandb: bool = False) -> list[dict]:
    rows = derive(records)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(markdown(rows))
        auto = auto_vs_best(rows)
        if auto:
            f.write("\n" + auto)
    if plots and rows:
        write_plots(rows, out_dir)
    if use_wandb:
        import wandb

        cols = ["id", "status", "fwd_s", "bwd_s", "tokens_per_s", "efficiency", "tflops", "pairs_imbalance", "bytes_max"]
        run = wandb.init(project="longctx-bench", dir=out_dir, mode=os.environ.get("WANDB_MODE", "offline"))
        run.log({"bench": wandb.Table(columns=cols, data=[[r.get(c) for c in cols] for r in rows])})
        run.finish()
    return rows

