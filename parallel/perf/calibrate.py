"""Calibration: a CPU `Hardware` fitted to a benchmark run, and measured vs predicted cells.

`fit_cpu_profile` looks at no multi-rank time unless asked: the kernel rate comes from the
1-rank cells of every shape, the link and collectives from the probes every launch records
(`parallel.perf.probes`); `compare` then predicts every P-rank cell.  Records are the
JSON lines of `scripts.bench_cp` (a cell's settings plus its measured times).
"""
from __future__ import annotations

from dataclasses import replace

from ..auto import parse_choice
from .cost import Layout, attention_flops, balancer_rows, has_hook, kernel_rows
from .hardware import Hardware
from .predict import predict
from .workload import make_mask

# benchmark peers whose schedule is one of ours: (strategy, balancer) that models them
PEERS_MODELLED_AS = {"peer:deepspeed-ulysses": ("ulysses", "contiguous")}


def _share(records: list[dict], world: int) -> tuple[float, float]:
    """How much of its 1-rank rate a rank keeps when `world` ranks compute at once: the rate
    probe of that launch over the probe of the 1-rank launch (1.0 when either is missing)."""
    one = [r for r in records if r["world"] == 1 and "probe_fwd_flops" in r]
    many = [r for r in records if r["world"] == world and "probe_fwd_flops" in r]
    if not one or not many:
        return 1.0, 1.0
    return (many[0]["probe_fwd_flops"] / one[0]["probe_fwd_flops"],
            many[0]["probe_bwd_flops"] / one[0]["probe_bwd_flops"])


def _kernel_rows(r: dict, strategy: str = "none", balancer=None, **options) -> dict[str, list[int]]:
    """cpu-backend diagonal / split / masked rows per rank of a record's shape under `strategy` / `balancer`."""
    mask = make_mask(r)
    rows = balancer_rows(balancer, r["seqlen"], r["world"], mask)
    return kernel_rows(strategy, mask, r["seqlen"], rows, heads=(r["hq"], r["hkv"]), **options)


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


def cell_strategy(r: dict) -> tuple[str, dict, str | None] | None:
    """(strategy, its options, balancer) whose time model applies to a measured cell; auto
    cells are modelled as the strategy they chose, peers as the strategy they implement."""
    name, balancer, opts = r["strategy"], r.get("balancer"), dict(r.get("options", {}))
    choice = parse_choice(r.get("extra", {}).get("auto_choice", "")) if name == "auto" else None
    if choice is not None:  # modelled as what it chose, ulysses degree included
        name, balancer, opts = choice
        opts = {k: int(v) for k, v in opts.items() if v.isdigit()}
    name, balancer = PEERS_MODELLED_AS.get(name, (name, balancer))
    if not (has_hook(name, "cost_time") and has_hook(name, "cost_kernel_cut")):
        return None
    return name, {k: v for k, v in opts.items() if k == "ulysses_degree"}, balancer


def _predictable(r: dict) -> bool:
    return r["world"] > 1 and bool(r.get("correct")) and bool(r.get("pairs")) and cell_strategy(r) is not None


def _cut(r: dict, hw: Hardware) -> dict[str, list[int]] | None:
    """How the cpu backend cuts the cell's work, when the profile prices it."""
    if not hw.tiled:
        return None
    name, options, balancer = cell_strategy(r)
    return _kernel_rows(r, name, balancer, **options)


def _predict_cell(r: dict, hw: Hardware, cut=None) -> float:
    name, options, _ = cell_strategy(r)
    lay = Layout(r["seqlen"], r["hq"], r["hkv"], r["head_dim"], 4)
    cut = _cut(r, hw) if cut is None else cut
    return predict(name, r["pairs"], lay, hw, kernel_rows=cut, **options)["total_s"]


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


def summary(rows: list[dict]) -> str:
    if not rows:
        return "no cells"
    parts = []
    for key, what in (("error", "median repeat"), ("error_fastest", "fastest repeat")):
        errs = [abs(row[key]) for row in rows]
        parts.append(f"vs the {what} {sum(e <= 0.25 for e in errs)} of {len(rows)} cells within 25% "
                     f"(largest |error| {max(errs):.1%}, median {sorted(errs)[len(errs) // 2]:.1%})")
    return "; ".join(parts)


