"""Turn benchmark JSON lines into derived numbers, a Markdown table, PNG plots and wandb.

Derived per cell (DESIGN.md definitions): tokens/s = seqlen / (fwd + bwd); CP efficiency =
t(1 rank kernel) / (P * t(P ranks)); achieved TFLOPS = attention FLOPs (4 * pairs * Hq * D
forward, 2.5x backward) / time, summed over ranks; imbalance = pairs max / mean; x best peer = our time / the time of
the fastest correct peer of the same (mask, seqlen, ranks, heads) cell (below 1: we are faster).
A cell whose check failed is shown as WRONG and gets no speed figures.  A CP efficiency above 1
(faster than P perfect copies of the 1-rank kernel) is a measurement artifact, usually one
noisy repeat on a shared machine: such cells are marked `!` in the table, the plots and the
summary.  Regenerate the reports of an existing run with

    python -m scripts.bench_report bench_out/results.jsonl [--out DIR]
"""
from __future__ import annotations

import json
import os
import sys

from parallel.auto import parse_choice
from parallel.perf.cost import attention_flops


def load_records(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _shape_key(r: dict) -> tuple:
    return (r["mask"], r["seqlen"], r["hq"], r["hkv"], r["head_dim"], r["dtype"])


def _cell_key(r: dict) -> tuple:
    return _shape_key(r) + (r["world"],)


def is_peer(r: dict) -> bool:
    return r["strategy"].startswith("peer:")


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
                d["suspect"] = d["efficiency"] > 1.0
            if "bytes_formula" in r and r.get("bytes_sent"):
                d["bytes_max"] = max(r["bytes_sent"])
                d["bytes_formula_max"] = max(r["bytes_formula"])
                d["bytes_match"] = list(r["bytes_sent"]) == list(r["bytes_formula"])
        rows.append(d)
    best = {}
    for d in rows:
        if d["status"] == "ok" and is_peer(d) and d["total_s"] < best.get(_cell_key(d), {"total_s": float("inf")})["total_s"]:
            best[_cell_key(d)] = d
    for d in rows:
        peer = best.get(_cell_key(d))
        if d["status"] == "ok" and not is_peer(d) and d["world"] > 1 and peer is not None:
            d.update(best_peer=peer["strategy"][5:], best_peer_s=peer["total_s"], vs_peer=d["total_s"] / peer["total_s"])
    return rows


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def markdown(rows: list[dict]) -> str:
    head = ("| strategy | balancer | mask | T | P | Hq/Hkv | fwd ms | bwd ms | spread ms | tok/s | CP eff | "
            "x best peer | TFLOPS | peak MB | max bytes/rank (formula) | pairs max/mean | max err | status |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in sorted(rows, key=lambda r: (r["mask"], r["seqlen"], r["hq"], r["hkv"], r["world"], r["strategy"],
                                         str(r.get("balancer")))):
        ok = r["status"] == "ok"
        bytes_col = "-"
        if r.get("bytes_max") is not None:
            bytes_col = f"{r['bytes_max']:,} ({r['bytes_formula_max']:,}{'' if r['bytes_match'] else ' MISMATCH'})"
        err = max(r["errors"].values()) if r.get("errors") else None
        stat = {"SKIPPED": f"SKIPPED: {r.get('skipped')}", "WRONG": "WRONG" + (f": {r['error']}" if r.get("error") else "")
                }.get(r["status"], r["status"])
        lines.append("| " + " | ".join([
            r["strategy"], str(r.get("balancer") or "-"), r["mask"], str(r["seqlen"]), str(r["world"]),
            f"{r['hq']}/{r['hkv']}",
            _fmt(r.get("fwd_s") * 1e3 if ok else None, ".1f"), _fmt(r.get("bwd_s") * 1e3 if ok else None, ".1f"),
            _fmt(r.get("spread_s", 0) * 1e3 if ok else None, ".1f"), _fmt(r.get("tokens_per_s") if ok else None, ",.0f"),
            _fmt(r.get("efficiency") if ok else None, ".3f") + ("!" if r.get("suspect") else ""),
            _fmt(r.get("vs_peer"), ".2f"), _fmt(r.get("tflops") if ok else None, ".4f"),
            _fmt(r.get("peak_mb_max") if ok else None, ".0f"), bytes_col if ok else "-",
            _fmt(r.get("pairs_imbalance"), ".3f"), _fmt(err, ".1e"), stat]) + " |")
    if any(r.get("suspect") for r in rows):
        lines.append(f"\n{SUSPECT_NOTE}")
    return "\n".join(lines) + "\n"


SUSPECT_NOTE = ("CP eff marked ! is above 1, faster than P perfect copies of the 1-rank kernel: a measurement "
                "artifact (one noisy repeat on a shared machine, or a warm cache); re-run with more repeats "
                "(repeats=5) before reading anything into it.")


def vs_peers(rows: list[dict]) -> str:
    """Per cell (mask, T, P, heads): each of our strategies beside the fastest correct peer,
    as a ratio of median fwd+bwd times (below 1: ours is faster); our best one is in bold."""
    ours = [r for r in rows if r.get("vs_peer") is not None]
    lines = ["| mask | T | P | Hq/Hkv | best peer | peer ms | strategy | ms | time / best peer |",
             "|---|---|---|---|---|---|---|---|---|"]
    for key in sorted({_cell_key(r) for r in ours}):
        cells = sorted((r for r in ours if _cell_key(r) == key), key=lambda r: r["vs_peer"])
        for i, r in enumerate(cells):
            bold = "**" if i == 0 else ""
            lines.append(f"| {r['mask']} | {r['seqlen']} | {r['world']} | {r['hq']}/{r['hkv']} | {r['best_peer']} | "
                         f"{r['best_peer_s'] * 1e3:.0f} | {bold}{series_label(r)}{bold} | {r['total_s'] * 1e3:.0f} | "
                         f"{bold}{r['vs_peer']:.2f}x{bold} |")
    return "\n".join(lines) + "\n" if len(lines) > 2 else ""


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
        others = [r for r in cells if r["strategy"] not in ("auto",) and not is_peer(r)]
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


def series_label(r: dict) -> str:
    """What one bar colour stands for: the strategy, its balancer and its degrees (usp); the
    shape hints auto gets are not part of it."""
    opts = ",".join(f"{k}={v}" for k, v in sorted(r.get("options", {}).items()) if k.endswith("_degree"))
    return r["strategy"] + (f"/{r['balancer']}" if r.get("balancer") else "") + (f" ({opts})" if opts else "")


def _group_key(r: dict) -> tuple:
    return (r["seqlen"], r["hq"], r["hkv"], r["world"])


def _palette(n: int):
    """n distinct colours (tab10, tab20, then evenly spaced hues): no colour repeats."""
    import matplotlib.pyplot as plt
    import numpy as np

    if n <= 10:
        return list(plt.cm.tab10(np.arange(n)))
    if n <= 20:
        return list(plt.cm.tab20(np.arange(n)))
    return list(plt.cm.turbo(np.linspace(0.05, 0.95, n)))


def speedup(r: dict, rows: list[dict]) -> tuple[float, float, float] | None:
    """(median, slowest, fastest) speed-up of a cell over the 1-rank kernel of its shape."""
    base = [k for k in rows if k["strategy"] == "kernel" and k["status"] == "ok" and _shape_key(k) == _shape_key(r)]
    if not base or r["status"] != "ok":
        return None
    t1 = base[0]["total_s"]
    totals = [f + b for f, b in zip(r["fwd_s_all"], r["bwd_s_all"])]
    return t1 / r["total_s"], t1 / max(totals), t1 / min(totals)


def _bar_figure(rows, colours, value, ylabel, title, caption, reference=None, ideal=False, marker=None):
    """Grouped bars: one panel per mask, one group per shape (T, heads, P), one colour per
    strategy (the same in every figure); value(r) -> (height, low, high) or None; marker(r):
    a reference value drawn as a black tick on the bar. None when no cell has a value."""
    import matplotlib.pyplot as plt

    cells = [r for r in rows if r["status"] == "ok" and r["world"] > 1 and value(r) is not None]
    if not cells:
        return None
    masks = sorted({r["mask"] for r in cells})
    labels = sorted({series_label(r) for r in cells})
    groups = sorted({_group_key(r) for r in cells})
    several_p = len({g[3] for g in groups}) > 1
    width = 0.8 / max(len(labels), 1)
    panel_w = min(max(3.0, 0.22 * len(labels) * len(groups) + 1.5), 14.0)
    fig, axes = plt.subplots(1, len(masks), figsize=(panel_w * len(masks), 5.6), sharey=True, squeeze=False,
                             layout="constrained")
    flagged = 0
    for ax, mask in zip(axes[0], masks):
        for gi, g in enumerate(groups):
            for si, lab in enumerate(labels):
                found = [r for r in cells if r["mask"] == mask and _group_key(r) == g and series_label(r) == lab]
                if not found:
                    continue
                height, low, high = value(found[0])
                x = gi - 0.4 + width * (si + 0.5)
                ax.bar(x, height, width, color=colours[lab], label=lab,
                       yerr=[[height - low], [high - height]] if high > low else None, capsize=2)
                if marker is not None:
                    ax.plot(x, marker(found[0]), "k_", markersize=120 * width, markeredgewidth=2,
                            label="formula")
                if ideal and height > g[3]:
                    flagged += 1
                    ax.annotate("!", (x, height), ha="center", va="bottom", color="red", fontweight="bold")
            if ideal:
                ax.hlines(g[3], gi - 0.45, gi + 0.45, colors="grey", linestyles="dashed",
                          label="ideal: P ranks, P x" if gi == 0 else None)
        if reference is not None:
            ax.axhline(reference[0], color="black", linewidth=1, label=reference[1])
        ax.set_xticks(range(len(groups)), [f"T={g[0]}\nHq/Hkv={g[1]}/{g[2]}" + (f"\nP={g[3]}" if several_p else "")
                                           for g in groups], fontsize=9)
        ax.set_title(f"mask: {mask}", fontsize=11)
        ax.set_xlabel("shape (sequence length T, query/KV heads)" + (", ranks P" if several_p else ""), fontsize=10)
        ax.tick_params(axis="y", labelsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel(ylabel, fontsize=10)
    handles, names = {}, []
    for ax in axes[0]:
        for h, n in zip(*ax.get_legend_handles_labels()):
            if n not in handles:
                handles[n] = h
                names.append(n)
    fig.legend([handles[n] for n in names], names, loc="outside upper center", ncol=min(len(names), 5), fontsize=9,
               title=title, title_fontsize=12, frameon=False)
    if flagged:
        caption += (f"\n! {flagged} bar(s) above the ideal line: faster than P perfect ranks, a measurement "
                    f"artifact (re-run with more repeats)")
    fig.supxlabel(caption, ha="left", x=0.0, fontsize=8, family="monospace")
    return fig


def write_plots(rows: list[dict], out_dir: str, command: str | None = None) -> list[str]:
    """speedup.png (vs the 1-rank kernel), bytes.png (sent per rank vs the formula),
    imbalance.png (attention pairs max/mean), vs_peers.png (our time / the best peer's); the
    command that made them in each caption."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    caption = f"made by: {command or command_line()}"
    repeats = sorted({len(r["fwd_s_all"]) for r in rows if r["status"] == "ok"})
    labels = sorted({series_label(r) for r in rows if r["status"] == "ok" and r["world"] > 1})
    colours = dict(zip(labels, _palette(len(labels))))
    figures = {
        "speedup": _bar_figure(
            rows, colours, lambda r: speedup(r, rows), "speed-up over the 1-rank kernel (x, fwd+bwd)",
            f"CP speed-up (bars: median of {'/'.join(map(str, repeats))} repeat(s), whiskers: slowest..fastest)",
            caption, reference=(1.0, "1-rank kernel (1x)"), ideal=True),
        "bytes": _bar_figure(
            rows, colours, lambda r: (r["bytes_max"] / 2**20,) * 3 if r.get("bytes_max") is not None else None,
            "MiB sent by the busiest rank", "Communication: MiB sent by the busiest rank per attention call",
            caption, marker=lambda r: r["bytes_formula_max"] / 2**20),
        "imbalance": _bar_figure(
            rows, colours, lambda r: (r["pairs_imbalance"],) * 3 if r.get("pairs_imbalance") is not None else None,
            "attention pairs, max / mean over ranks", "Attention work imbalance", caption,
            reference=(1.0, "balanced (1.0)")),
        "vs_peers": _bar_figure(
            rows, colours, lambda r: (r["vs_peer"],) * 3 if r.get("vs_peer") is not None else None,
            "our time / the fastest correct peer's (fwd+bwd)", "Ours vs the fastest correct peer of each cell "
            "(below 1: ours is faster)", caption, reference=(1.0, "best peer (1x)")),
    }
    paths = []
    for name, fig in figures.items():
        if fig is None:  # nothing of that kind was measured
            continue
        paths.append(os.path.join(out_dir, f"{name}.png"))
        fig.savefig(paths[-1], dpi=120, bbox_inches="tight")
    plt.close("all")
    return paths


def command_line() -> str:
    """How this process was started, as a user would type it."""
    module = os.path.splitext(os.path.basename(sys.argv[0]))[0]
    return " ".join(["python -m", f"scripts.{module}", *sys.argv[1:]])


def summary(rows: list[dict], out_dir: str, plots: list[str]) -> str:
    """What a person wants at the end of a run: counts, the fastest strategy per shape, the
    suspect cells, and where the files are."""
    count = {k: sum(r["status"] == k for r in rows) for k in ("ok", "WRONG", "SKIPPED")}
    lines = [f"bench: {len(rows)} cells: {count['ok']} ok, {count['WRONG']} WRONG, {count['SKIPPED']} SKIPPED"]
    timed = [r for r in rows if r["world"] > 1 and speedup(r, rows)]
    if timed:
        lines.append("fastest per shape (speed-up over the 1-rank kernel, CP efficiency):")
    for key in sorted({(r["mask"],) + _group_key(r) for r in timed}):
        best = max((r for r in timed if (r["mask"],) + _group_key(r) == key), key=lambda r: speedup(r, rows)[0])
        lines.append(f"  {key[0]:<9} T={key[1]:<6} Hq/Hkv={key[2]}/{key[3]} P={key[4]}: {series_label(best)} "
                     f"{speedup(best, rows)[0]:.2f}x ({best['efficiency']:.2f}{'!' if best['suspect'] else ''})")
    suspect = [r for r in rows if r.get("suspect")]
    if suspect:
        repeats = sorted({len(r["fwd_s_all"]) for r in suspect})
        lines.append(f"{len(suspect)} cell(s) with CP efficiency above 1 (repeats={'/'.join(map(str, repeats))}): "
                     + SUSPECT_NOTE.split(": ", 1)[1])
    wrong = [r["id"] for r in rows if r["status"] == "WRONG"]
    if wrong:
        lines.append(f"WRONG (results differ from the single-process kernel): {', '.join(wrong)}")
    lines.append(f"results: {os.path.join(out_dir, 'results.md')}")
    if plots:
        lines.append(f"plots: {', '.join(plots)}")
    return "\n".join(lines)


def write_reports(records: list[dict], out_dir: str, *, plots: bool = True, use_wandb: bool = False,
                  command: str | None = None) -> list[dict]:
    """results.md, the plots and (optionally) a wandb table; prints the summary."""
    rows = derive(records)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write(markdown(rows))
        for section in (vs_peers(rows), auto_vs_best(rows)):
            if section:
                f.write("\n" + section)
    paths = write_plots(rows, out_dir, command) if plots and rows else []
    if use_wandb:
        import wandb

        cols = ["id", "status", "fwd_s", "bwd_s", "tokens_per_s", "efficiency", "tflops", "pairs_imbalance", "bytes_max"]
        run = wandb.init(project="longctx-bench", dir=out_dir, mode=os.environ.get("WANDB_MODE", "offline"))
        run.log({"bench": wandb.Table(columns=cols, data=[[r.get(c) for c in cols] for r in rows])})
        run.finish()
    print(summary(rows, out_dir, paths), flush=True)
    return rows


def main(argv=None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description="Regenerate results.md, the plots and the summary from a "
                                             "bench_cp results.jsonl.")
    ap.add_argument("results", help="a results.jsonl written by python -m scripts.bench_cp")
    ap.add_argument("--out", default=None, help="folder for the reports (default: the results file's folder)")
    ap.add_argument("--no-plots", action="store_true", help="only results.md and the summary")
    args = ap.parse_args(argv)
    records = load_records(args.results)
    if not records:
        raise SystemExit(f"bench_report: {args.results} does not exist or holds no results")
    out = args.out or os.path.dirname(os.path.abspath(args.results))
    os.makedirs(out, exist_ok=True)
    write_reports(records, out, plots=not args.no_plots)


if __name__ == "__main__":
    main()
