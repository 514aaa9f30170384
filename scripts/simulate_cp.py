"""Cluster simulator CLI over `parallel.costmodel` / `parallel.simulator`.

    python -m scripts.simulate_cp validate                 # published figures vs the model
    python -m scripts.simulate_cp predict --gpus 64 --seqlen 1048576 --hardware h100
    python -m scripts.simulate_cp calibrate bench_out/results.jsonl   # measured vs predicted

`calibrate` fits a CPU `Hardware` from the bench JSONL without looking at any multi-rank
time: the kernel rate comes from the 1-rank cell of the same shape, the link from the gloo
probe the worker records (`link_bw`, `link_lat`); then it predicts every P-rank cell.
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import replace

from parallel.costmodel import (
    Layout, attention_flops, balancer_rows, bytes_sent, imbalance, mask_keys, pairs_per_rank, ring_reach,
)
from parallel.simulator import H200, H800, LLAMA3_8B, PRESETS, Hardware, predict, save_hardware, throughput
from scripts.bench_cells import REPO_ROOT, make_mask
from scripts.bench_report import load_records

DOCLENS = os.environ.get("LONGCTX_DOCLENS", os.path.join(REPO_ROOT, "..", "shared", "data", "doclens_prolong.json"))


def ring_flash_attention_check() -> list[dict]:
    """zhuzilin/ring-flash-attention README, batch API, 8xH800, Llama-3-8B heads (32q/8kv,
    D=128), 8K tokens per GPU (64K global), causal, bf16: efficiency = ring iter/s /
    (flash_attn iter/s on 8K / 8).  Published: zigzag 85.2% fwd, 90.2% fwd+bwd; plain ring
    (contiguous) 52.1% / 53.9%."""
    p, t = 8, 8192 * 8
    lay, one = Layout(t, 32, 8, 128, 2), Layout(8192, 32, 8, 128, 2)
    mask = make_mask({"mask": "causal", "seqlen": t})
    keys = mask_keys(mask, t)
    base = predict("none", [int(mask_keys(mask, 8192).sum())], one, H800)
    rows = []
    for balancer, pub_f, pub_t in (("headtail", 0.852, 0.902), ("contiguous", 0.521, 0.539)):
        ring = predict("ring", pairs_per_rank(keys, balancer_rows(balancer, t, p, mask)), lay, H800)
        for what, pub, key in (("fwd", pub_f, "fwd_s"), ("fwd+bwd", pub_t, "total_s")):
            rows.append(dict(case=f"ring-flash-attn {balancer} {what}, 8xH800, 64K causal", published=pub,
                             simulated=p * base[key] / ring[key]))
    return rows


def distca_check(steps: int = 10) -> list[dict]:
    """DistCA (arXiv 2510.18121): up to 1.35x end-to-end throughput over WLB-ideal per-document
    CP on 512 H200 GPUs at 512K tokens.  Modelled as Llama-3-8B, TP=8 inside a node, one
    512K packed sequence (ProLong document lengths) per DP replica, each side at its best CP
    degree in {1, 2, 4, 8, 16}."""
    with open(DOCLENS) as f:
        docs = json.load(f)
    rows = []
    for gpus, tokens in ((512, 512 * 1024), (512, 256 * 1024), (128, 128 * 1024)):
        for hidden in (0.0, 1.0):
            best = {mode: max(throughput(docs, LLAMA3_8B, H200, gpus=gpus, tokens=tokens, tp=8, cp=cp, mode=mode,
                                         steps=steps, comm_hidden=hidden)
                              for cp in (1, 2, 4, 8, 16) if gpus // (8 * cp) >= 1)
                    for mode in ("wlb", "cad")}
            rows.append(dict(case=f"DistCA over WLB-ideal, {gpus} H200, {tokens // 1024}K, CP all-gather "
                                  f"{'exposed' if hidden == 0 else 'hidden'}",
                             published=1.35 if (gpus, tokens) == (512, 512 * 1024) else None,
                             simulated=best["cad"] / best["wlb"]))
    return rows


def validate(_args) -> None:
    print("| case | published | simulated | error |\n|---|---|---|---|")
    for r in ring_flash_attention_check() + distca_check():
        pub = r["published"]
        err = f"{(r['simulated'] - pub) / pub:+.1%}" if pub else "-"
        print(f"| {r['case']} | {pub if pub else '-'} | {r['simulated']:.3f} | {err} |")


def predict_cmd(args) -> None:
    hw = PRESETS[args.hardware]
    lay = Layout(args.seqlen, args.hq, args.hkv, args.head_dim, 2)
    mask = make_mask({"mask": args.mask, "seqlen": args.seqlen, "window": args.window, "doc_lens": _docs(args)})
    keys = mask_keys(mask, args.seqlen)
    print(f"| strategy | balancer | pairs max/mean | bytes/rank | predicted ms | vs 1 GPU eff |\n|---|---|---|---|---|---|")
    one = predict("none", [int(keys.sum())], lay, hw)["total_s"]
    for strategy in ("ring", "allgather", "ulysses", "cad"):
        for balancer in ("headtail", "contiguous") if strategy == "ring" else ("headtail",):
            rows = balancer_rows(balancer, args.seqlen, args.gpus, mask)
            pr = pairs_per_rank(keys, rows)
            t = predict(strategy, pr, lay, hw)["total_s"]
            reach = ring_reach(mask, args.seqlen, rows) if strategy == "ring" else None
            sent = bytes_sent(strategy, lay, args.gpus, reach=reach) if strategy != "cad" else None
            nbytes = f"{max(sent['fwd']) + max(sent['bwd']):,}" if sent else "-"
            print(f"| {strategy} | {balancer} | {imbalance(pr):.3f} | {nbytes} | {t * 1e3:.2f} | {one / (args.gpus * t):.3f} |")


def _docs(args):
    if "document" not in args.mask:
        return None
    from scripts.bench_cells import sample_doc_lens

    return sample_doc_lens(args.seqlen, {"file": DOCLENS}, 0)


def _share(records: list[dict], world: int) -> tuple[float, float]:
    """How much of its 1-rank rate a rank keeps when `world` ranks compute at once: the rate
    probe of that launch over the probe of the 1-rank launch (1.0 when either is missing)."""
    one = [r for r in records if r["world"] == 1 and "probe_fwd_flops" in r]
    many = [r for r in records if r["world"] == world and "probe_fwd_flops" in r]
    if not one or not many:
        return 1.0, 1.0
    return (many[0]["probe_fwd_flops"] / one[0]["probe_fwd_flops"],
            many[0]["probe_bwd_flops"] / one[0]["probe_bwd_flops"])


def _fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares y = a * x + b with b >= 0 (a fixed cost cannot be negative)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    a = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx > 0 else my / mx
    b = my - a * mx
    if b < 0:  # through the origin instead
        a, b = sum(x * y for x, y in zip(xs, ys)) / sum(x * x for x in xs), 0.0
    return a, b


def fit_cpu_profile(records: list[dict], world: int = 2, name: str = "cpu") -> Hardware:
    """One CPU `Hardware` for a whole benchmark run, from its 1-rank kernel cells only:
    seconds = FLOPs / rate + call_overhead fitted over every shape (fwd and bwd apart),
    rates scaled by the P-rank launch's rate-probe share, link bandwidth and latency from
    the worker's gloo probe.  No time of any P-rank CP cell enters the fit."""
    base = [r for r in records if r["strategy"] == "kernel" and r.get("correct") and r.get("fwd_s")]
    link = [r for r in records if r["world"] == world and "link_bw" in r]
    if not base or not link:
        raise ValueError("calibrate needs the 1-rank kernel cells and a P-rank launch (link probe) in the JSONL; "
                         "run scripts.bench_cp with worlds=[1,2]")
    flops = [attention_flops(r["total_pairs"], r["hq"], r["head_dim"]) for r in base]
    inv_f, over_f = _fit_line(flops, [r["fwd_s"] for r in base])
    inv_b, over_b = _fit_line([2.5 * f for f in flops], [r["bwd_s"] for r in base])
    share_f, share_b = _share(records, world)
    lat = sorted(r["link_lat"] for r in link)[len(link) // 2]
    bw = sorted(r["link_bw"] for r in link)[len(link) // 2]
    return Hardware(name, share_f / inv_f, share_b / inv_b, 10e9, bw, lat, bw, lat, devices_per_node=64,
                    overlap=0.0, call_overhead=(over_f + over_b) / 2)


def cpu_hardware(records: list[dict], cell: dict) -> Hardware | None:
    """Per-shape CPU rates: the 1-rank kernel cell of this shape, scaled by the rate probe
    of the P-rank launch over that of the 1-rank launch (how much CPU each rank really
    gets); the link from the gloo probe.  No time of any P-rank CP cell enters."""
    key = lambda r: (r["mask"], r["seqlen"], r["hq"], r["hkv"], r["head_dim"], r["dtype"])  # noqa: E731
    base = [r for r in records if r["strategy"] == "kernel" and r.get("correct") and key(r) == key(cell)]
    if not base or "link_bw" not in cell:
        return None
    b = base[0]
    f = attention_flops(b["total_pairs"], b["hq"], b["head_dim"])
    share_f = cell.get("probe_fwd_flops", 1.0) / b.get("probe_fwd_flops", 1.0)
    share_b = cell.get("probe_bwd_flops", 1.0) / b.get("probe_bwd_flops", 1.0)
    return Hardware("cpu", share_f * f / b["fwd_s"], share_b * 2.5 * f / b["bwd_s"], 10e9, cell["link_bw"], cell["link_lat"],
                    cell["link_bw"], cell["link_lat"], devices_per_node=64, overlap=0.0)


def _cell_strategy(r: dict) -> tuple[str, int | None] | None:
    """(strategy, ulysses_degree) whose time model applies to a measured cell; auto cells
    are modelled as the strategy they chose."""
    name = r["strategy"]
    if name == "auto":
        name = str(r.get("extra", {}).get("auto_choice", "")).split("/")[0]
    if name.startswith("peer:deepspeed-ulysses"):
        name = "ulysses"
    if name not in ("ring", "allgather", "ulysses", "usp"):
        return None
    return name, r.get("options", {}).get("ulysses_degree")


def compare(records: list[dict], profile: Hardware | None = None) -> list[dict]:
    """Predicted vs measured seconds (fwd+bwd, median) of every correct P-rank cell; with a
    `profile`, from it alone, else from the same shape's 1-rank kernel cell."""
    rows = []
    for r in records:
        kind = _cell_strategy(r) if r["world"] > 1 and r.get("correct") and r.get("pairs") else None
        if kind is None:
            continue
        hw = profile or cpu_hardware(records, r)
        if hw is None:
            continue
        lay = Layout(r["seqlen"], r["hq"], r["hkv"], r["head_dim"], 4)
        t = predict(kind[0], r["pairs"], lay, hw, ulysses_degree=kind[1])["total_s"]
        meas = r["fwd_s"] + r["bwd_s"]
        fast = min(f + b for f, b in zip(r["fwd_s_all"], r["bwd_s_all"]))
        rows.append(dict(id=r["id"], measured=meas, fastest=fast, predicted=t, error=(t - meas) / meas))
    return rows


def calibrate(args) -> None:
    records = load_records(args.jsonl)
    profile = fit_cpu_profile(records)
    print(f"Profile fitted from the 1-rank kernel cells and the link probe: {profile}\n")
    if args.save:
        save_hardware(profile, args.save)
        print(f"saved to {args.save} (use it with parallel=auto +parallel.options.hardware={args.save})\n")
    for title, rows in (("profile (one fit for the whole run)", compare(records, profile)),
                        ("same-shape 1-rank kernel rate", compare(records))):
        print(f"### Predicted from the {title}\n")
        print("| cell | measured ms (median) | measured ms (fastest) | predicted ms | error vs median |\n"
              "|---|---|---|---|---|")
        for row in rows:
            print(f"| {row['id']} | {row['measured'] * 1e3:.0f} | {row['fastest'] * 1e3:.0f} | "
                  f"{row['predicted'] * 1e3:.0f} | {row['error']:+.1%} |")
        if rows:
            errs = [abs(row["error"]) for row in rows]
            inside = sum(e <= 0.25 for e in errs)
            print(f"\n{inside} of {len(rows)} cells within 25%; largest |error| {max(errs):.1%}, "
                  f"median {sorted(errs)[len(errs) // 2]:.1%}\n")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("validate").set_defaults(fn=validate)
    p = sub.add_parser("predict")
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=131072)
    p.add_argument("--hardware", choices=sorted(PRESETS), default="h100")
    p.add_argument("--mask", default="causal")
    p.add_argument("--window", type=int, default=4096)
    p.add_argument("--hq", type=int, default=32)
    p.add_argument("--hkv", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.set_defaults(fn=predict_cmd)
    c = sub.add_parser("calibrate")
    c.add_argument("jsonl")
    c.add_argument("--save", help="write the fitted profile as JSON (for parallel=auto's hardware option)")
    c.set_defaults(fn=calibrate)
    args = ap.parse_args(argv)
    args.fn(args)


if __name__ == "__main__":
    main()
