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
from dataclasses import replace

from parallel.auto import parse_choice
from parallel.costmodel import (
    Layout, attention_flops, balancer_rows, bytes_sent, imbalance, kernel_rows, mask_keys, memory_per_rank, pairs_per_rank,
    ring_reach,
)
from parallel.simulator import (H200, H800, LLAMA3_8B, PRESETS, Hardware, predict, save_hardware, straggle,
                                throughput)
from parallel.perf.workload import load_doclens
from scripts.bench_cells import make_mask, sample_doc_lens
from scripts.bench_report import load_records


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


def distca_check(docs: list[int], steps: int = 10) -> list[dict]:
    """DistCA (arXiv 2510.18121): up to 1.35x end-to-end throughput over WLB-ideal per-document
    CP on 512 H200 GPUs at 512K tokens.  Modelled as Llama-3-8B, TP=8 inside a node, one
    512K packed sequence (ProLong document lengths) per DP replica, each side at its best CP
    degree in {1, 2, 4, 8, 16}."""
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


def validate(args) -> None:
    docs = load_doclens(args.doclens)
    print("| case | published | simulated | error |\n|---|---|---|---|")
    for r in ring_flash_attention_check() + distca_check(docs):
        pub = r["published"]
        err = f"{(r['simulated'] - pub) / pub:+.1%}" if pub else "-"
        print(f"| {r['case']} | {pub if pub else '-'} | {r['simulated']:.3f} | {err} |")


def predict_cmd(args) -> None:
    hw = PRESETS[args.hardware]
    lay = Layout(args.seqlen, args.hq, args.hkv, args.head_dim, 2)
    mask = make_mask({"mask": args.mask, "seqlen": args.seqlen, "window": args.window, "doc_lens": _docs(args)})
    keys = mask_keys(mask, args.seqlen)
    print(f"| strategy | balancer | pairs max/mean | bytes/rank | memory/rank MiB | predicted ms | vs 1 GPU eff |\n"
          "|---|---|---|---|---|---|---|")
    one = predict("none", [int(keys.sum())], lay, hw)["total_s"]
    for strategy in ("ring", "allgather", "ulysses", "cad"):
        for balancer in ("headtail", "contiguous") if strategy == "ring" else ("headtail",):
            rows = balancer_rows(balancer, args.seqlen, args.gpus, mask)
            pr = pairs_per_rank(keys, rows)
            t = predict(strategy, pr, lay, hw)["total_s"]
            reach = ring_reach(mask, args.seqlen, rows) if strategy == "ring" else None
            sent = bytes_sent(strategy, lay, args.gpus, reach=reach) if strategy != "cad" else None
            nbytes = f"{max(sent['fwd']) + max(sent['bwd']):,}" if sent else "-"
            mem = f"{memory_per_rank(strategy, lay, args.gpus)['peak'] / 2**20:,.0f}" if strategy != "cad" else "-"
            print(f"| {strategy} | {balancer} | {imbalance(pr):.3f} | {nbytes} | {mem} | {t * 1e3:.2f} | "
                  f"{one / (args.gpus * t):.3f} |")


def straggle_cmd(args) -> None:
    """DP / PP straggling from document-length imbalance, per way of placing attention."""
    docs = load_doclens(args.doclens)
    hw = PRESETS[args.hardware]
    print(f"Llama-3-8B shape, {args.gpus} x {hw.name}, tp={args.tp} cp={args.cp} pp={args.pp}, "
          f"{args.microbatches} microbatches of {args.tokens} tokens per replica, mean of {args.steps} sampled batches\n")
    print("| attention placement | DP replicas | step s | ideal s (equal microbatches) | lost to imbalance | "
          "DP straggle | PP straggle | PP bubble | tokens/s |\n|---|---|---|---|---|---|---|---|---|")
    for mode in ("per_doc_cp", "wlb", "cad"):
        r = straggle(docs, LLAMA3_8B, hw, gpus=args.gpus, tokens=args.tokens, tp=args.tp, cp=args.cp, pp=args.pp,
                     microbatches=args.microbatches, mode=mode, steps=args.steps, seed=args.seed)
        print(f"| {mode} | {r['dp']} | {r['step_s']:.3f} | {r['ideal_s']:.3f} | {r['loss']:.1%} | "
              f"{r['dp_straggle']:.3f} | {r['pp_straggle']:.3f} | {r['bubble']:.3f} | {r['tokens_per_s']:,.0f} |")


def _docs(args):
    if "document" not in args.mask:
        return None
    return sample_doc_lens(args.seqlen, {"file": args.doclens}, 0, setting="--doclens")


def _share(records: list[dict], world: int) -> tuple[float, float]:
    """How much of its 1-rank rate a rank keeps when `world` ranks compute at once: the rate
    probe of that launch over the probe of the 1-rank launch (1.0 when either is missing)."""
    one = [r for r in records if r["world"] == 1 and "probe_fwd_flops" in r]
    many = [r for r in records if r["world"] == world and "probe_fwd_flops" in r]
    if not one or not many:
        return 1.0, 1.0
    return (many[0]["probe_fwd_flops"] / one[0]["probe_fwd_flops"],
            many[0]["probe_bwd_flops"] / one[0]["probe_bwd_flops"])


def _kernel_rows(r: dict, strategy: str = "none", balancer=None, ulysses_degree=None) -> dict[str, list[int]]:
    """cpu-backend diagonal / split / masked rows per rank of a record's shape under `strategy` / `balancer`."""
    mask = make_mask(r)
    rows = balancer_rows(balancer, r["seqlen"], r["world"], mask)
    return kernel_rows(strategy, mask, r["seqlen"], rows, ulysses_degree=ulysses_degree)


def _fit(xs: list[list[float]], ys: list[float]) -> list[float]:
    """Non-negative least squares for y = c0 * x0 + c1 * x1 (the second term is dropped when
    it would come out negative)."""
    import numpy as np

    a, y = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
    coef = np.linalg.lstsq(a, y, rcond=None)[0]
    if coef[1] < 0:
        coef = np.array([float(a[:, 0] @ y / (a[:, 0] @ a[:, 0])), 0.0])
    return [float(c) for c in coef]


def fit_cpu_profile(records: list[dict], world: int = 2, name: str = "cpu", concurrency_masks=()) -> Hardware:
    """One CPU `Hardware` for a whole benchmark run.

    From the 1-rank kernel cells: seconds = FLOPs / rate + diagonal rows * heads * row cost
    (the rows of `kernels.cpu.plan`'s causal tiles), fitted over every shape, forward and
    backward apart.  From the worker's probes: link bandwidth and latency, the collectives'
    bandwidth, and the cost per row of merging a kernel call cut into tiles.  Rates are
    scaled by the P-rank launch's rate-probe share.  With `concurrency_masks`, the P-rank
    cells of those masks (only those) instead fit the share of its 1-rank rate a rank
    sustains inside a CP call (copies and the other rank's traffic on the same cores),
    which the short probe misses; cells of other masks stay held out."""
    base = [r for r in records if r["strategy"] == "kernel" and r.get("correct") and r.get("fwd_s")]
    link = [r for r in records if r["world"] == world and "link_bw" in r]
    if not base or not link:
        raise ValueError("calibrate needs the 1-rank kernel cells and a P-rank launch (link probe) in the JSONL; "
                         "run scripts.bench_cp with worlds=[1,2]")
    cuts = [_kernel_rows(r) for r in base]
    # the kernel computes hidden pairs of explicitly masked tiles too (window edges)
    flops = [attention_flops(r["total_pairs"] + c["masked"][0], r["hq"], r["head_dim"]) for r, c in zip(base, cuts)]
    rows = [c["diagonal"][0] * r["hq"] for r, c in zip(base, cuts)]
    inv_f, row_f = _fit([[f, t] for f, t in zip(flops, rows)], [r["fwd_s"] for r in base])
    inv_b, row_b = _fit([[2.5 * f, t] for f, t in zip(flops, rows)], [r["bwd_s"] for r in base])
    fit = [r for r in records if r["mask"] in concurrency_masks]
    # the fitted in-CP share below supersedes the short rate probe (and its noise)
    share_f, share_b = (1.0, 1.0) if fit else _share(records, world)
    med = lambda key: sorted(r[key] for r in link)[len(link) // 2] if all(key in r for r in link) else 0.0  # noqa: E731
    bw, lat = med("link_bw"), med("link_lat")
    hw = Hardware(name, share_f / inv_f, share_b / inv_b, 10e9, bw, lat, bw, lat, devices_per_node=64,
                  overlap=0.0, diag_fwd=row_f / share_f, diag_bwd=row_b / share_b,
                  split_fwd=med("split_fwd_s") / share_f, split_bwd=med("split_bwd_s") / share_b,
                  coll_bw=med("all_gather_bw") and (med("all_gather_bw") + med("reduce_scatter_bw")) / 2,
                  a2a_bw=med("all_to_all_bw"))
    if fit:
        free = replace(hw, intra_bw=1e30, inter_bw=1e30, intra_lat=0.0, inter_lat=0.0, coll_bw=0.0, a2a_bw=0.0,
                       mem_bw=1e30)
        ratios = []
        for cell in filter(_predictable, fit):
            cut = _cut(cell, hw)
            total, compute = _predict_cell(cell, hw, cut), _predict_cell(cell, free, cut)
            ratios.append(compute / max(cell["fwd_s"] + cell["bwd_s"] - (total - compute), 1e-9))
        s = sorted(ratios)[len(ratios) // 2]
        hw = replace(hw, fwd_flops=hw.fwd_flops * s, bwd_flops=hw.bwd_flops * s, diag_fwd=hw.diag_fwd / s,
                     diag_bwd=hw.diag_bwd / s, split_fwd=hw.split_fwd / s, split_bwd=hw.split_bwd / s)
    return hw


def _cell_strategy(r: dict) -> tuple[str, int | None, str | None] | None:
    """(strategy, ulysses_degree, balancer) whose time model applies to a measured cell; auto cells
    are modelled as the strategy they chose."""
    name, balancer, degree = r["strategy"], r.get("balancer"), r.get("options", {}).get("ulysses_degree")
    if name == "auto":  # modelled as what it chose, ulysses degree included
        choice = parse_choice(r.get("extra", {}).get("auto_choice", ""))
        if choice is None:
            return None
        name, balancer, opts = choice
        degree = int(opts["ulysses_degree"]) if "ulysses_degree" in opts else None
    if name.startswith("peer:deepspeed-ulysses"):
        name, balancer = "ulysses", "contiguous"
    if name not in ("ring", "allgather", "ulysses", "usp"):
        return None
    return name, degree, balancer


def _predictable(r: dict) -> bool:
    return r["world"] > 1 and bool(r.get("correct")) and bool(r.get("pairs")) and _cell_strategy(r) is not None


def _cut(r: dict, hw: Hardware) -> dict[str, list[int]] | None:
    """How the cpu backend cuts the cell's work, when the profile prices it."""
    if not (hw.diag_fwd or hw.diag_bwd or hw.split_fwd or hw.split_bwd):
        return None
    kind = _cell_strategy(r)
    return _kernel_rows(r, kind[0], kind[2], kind[1])


def _predict_cell(r: dict, hw: Hardware, cut=None) -> float:
    kind = _cell_strategy(r)
    lay = Layout(r["seqlen"], r["hq"], r["hkv"], r["head_dim"], 4)
    cut = _cut(r, hw) if cut is None else cut
    return predict(kind[0], r["pairs"], lay, hw, ulysses_degree=kind[1], kernel_rows=cut)["total_s"]


def compare(cells: list[dict], profile: Hardware) -> list[dict]:
    """Predicted (from `profile`) vs measured seconds (fwd+bwd, median) of every correct
    P-rank cell."""
    rows = []
    for r in cells:
        if not _predictable(r):
            continue
        t = _predict_cell(r, profile)
        meas = r["fwd_s"] + r["bwd_s"]
        fast = min(f + b for f, b in zip(r["fwd_s_all"], r["bwd_s_all"]))
        rows.append(dict(id=r["id"], mask=r["mask"], measured=meas, fastest=fast, predicted=t, error=(t - meas) / meas,
                         error_fastest=(t - fast) / fast))
    return rows


def _summary(rows: list[dict]) -> str:
    if not rows:
        return "no cells"
    parts = []
    for key, what in (("error", "median repeat"), ("error_fastest", "fastest repeat")):
        errs = [abs(row[key]) for row in rows]
        parts.append(f"vs the {what} {sum(e <= 0.25 for e in errs)} of {len(rows)} cells within 25% "
                     f"(largest |error| {max(errs):.1%}, median {sorted(errs)[len(errs) // 2]:.1%})")
    return "; ".join(parts)


def calibrate(args) -> None:
    records = load_records(args.jsonl)
    held = load_records(args.validate) if args.validate else []
    masks = tuple(args.fit_masks or ())
    profile = fit_cpu_profile(records, concurrency_masks=masks)
    print(f"Profile fitted from {args.jsonl} (1-rank kernel cells, gloo probes"
          f"{', the P-rank cells of masks ' + '/'.join(masks) if masks else ''}):\n\n    {profile}\n")
    if args.save:
        save_hardware(profile, args.save)
        print(f"saved to {args.save} (parallel=auto takes it as its hardware option)\n")
    tables = [("the profile", compare(records, profile))]
    if held:
        tables.append((f"the profile, on the cells of {args.validate} (a separate run)", compare(held, profile)))
    for title, rows in tables:
        print(f"### Predicted from {title}\n")
        print("| cell | measured ms (median) | measured ms (fastest) | predicted ms | error vs median | "
              "error vs fastest |\n|---|---|---|---|---|---|")
        for row in rows:
            print(f"| {row['id']} | {row['measured'] * 1e3:.0f} | {row['fastest'] * 1e3:.0f} | "
                  f"{row['predicted'] * 1e3:.0f} | {row['error']:+.1%} | {row['error_fastest']:+.1%} |")
        print(f"\nAll: {_summary(rows)}.")
        if masks:
            print(f"Fitted masks ({'/'.join(masks)}): {_summary([r for r in rows if r['mask'] in masks])}.  "
                  f"Held-out masks: {_summary([r for r in rows if r['mask'] not in masks])}.")
        print()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    doclens = dict(help="document-length JSON list (default: $LONGCTX_DOCLENS, else the packaged ProLong mix)")
    v = sub.add_parser("validate")
    v.add_argument("--doclens", **doclens)
    v.set_defaults(fn=validate)
    p = sub.add_parser("predict")
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=131072)
    p.add_argument("--hardware", choices=sorted(PRESETS), default="h100")
    p.add_argument("--mask", default="causal")
    p.add_argument("--window", type=int, default=4096)
    p.add_argument("--hq", type=int, default=32)
    p.add_argument("--hkv", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--doclens", **doclens)
    p.set_defaults(fn=predict_cmd)
    s = sub.add_parser("straggle", help="DP/PP straggling from document-length imbalance (per_doc_cp, wlb, cad)")
    s.add_argument("--gpus", type=int, default=256)
    s.add_argument("--tokens", type=int, default=131072, help="tokens per microbatch (one packed sequence)")
    s.add_argument("--tp", type=int, default=8)
    s.add_argument("--cp", type=int, default=4)
    s.add_argument("--pp", type=int, default=4)
    s.add_argument("--microbatches", type=int, default=8)
    s.add_argument("--steps", type=int, default=10)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--hardware", choices=sorted(PRESETS), default="h100")
    s.add_argument("--doclens", **doclens)
    s.set_defaults(fn=straggle_cmd)
    c = sub.add_parser("calibrate")
    c.add_argument("jsonl")
    c.add_argument("--save", help="write the fitted profile as JSON (for parallel=auto's hardware option)")
    c.add_argument("--fit-masks", nargs="*", help="masks whose P-rank cells fit the in-CP rate share (others held out)")
    c.add_argument("--validate", help="a second run's JSONL to predict with the profile fitted on the first")
    c.set_defaults(fn=calibrate)
    args = ap.parse_args(argv)
    args.fn(args)


if __name__ == "__main__":
    main()
