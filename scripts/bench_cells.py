"""The benchmark matrix: expand a config into cells, name them, and build each cell's mask.

A cell is a plain dict (JSON-able) that fully determines one measurement: strategy,
balancer, mask kind, seqlen, world size, head layout, dtype, seed, repeats.  Its `id` is
what the JSONL resume logic matches on, so re-running the same matrix skips finished cells.
"""
from __future__ import annotations

import itertools
import os
import random

from parallel import STRATEGIES, load_entry
from parallel.perf.workload import fill, load_doclens
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sample_doc_lens(seqlen: int, docs: dict, seed: int, setting: str = "docs.file") -> list[int]:
    """Pack documents drawn from the distribution until seqlen tokens; the last one is cut.

    docs: {"fixed_len": n} for equal documents, else {"file": path or None} sampled with
    `seed` (`parallel.perf.workload.load_doclens`: None is $LONGCTX_DOCLENS or the packaged
    default; `setting` is what errors call the file).
    """
    if docs.get("fixed_len"):
        n = int(docs["fixed_len"])
        return [n] * (seqlen // n) + ([seqlen % n] if seqlen % n else [])
    pool = load_doclens(docs.get("file"), setting)
    rng = random.Random(seed)
    return fill(seqlen, lambda: rng.choice(pool))


def cell_id(cell: dict) -> str:
    opts = ",".join(f"{k}={v}" for k, v in sorted(cell.get("options", {}).items()))
    return (f"{cell['strategy']}|{cell.get('balancer')}|{cell['mask']}|T={cell['seqlen']}|P={cell['world']}"
            f"|H={cell['hq']}/{cell['hkv']}x{cell['head_dim']}|{cell['dtype']}|{opts}")


def expand(cfg: dict) -> list[dict]:
    """All cells of the matrix, plus the 1-rank kernel baseline of every (mask, seqlen, heads)."""
    cells = []
    heads = [tuple(h) for h in cfg["heads"]]
    shapes = list(itertools.product(cfg["masks"], cfg["seqlens"], heads))
    runs = [("kernel", None, 1, {})]
    extra = dict(cfg.get("extra_strategies", {}))
    for strategy in cfg["strategies"]:
        balancers = cfg["balancers"] if strategy_uses_balancer(strategy, extra) else [None]
        for balancer, world in itertools.product(balancers, [w for w in cfg["worlds"] if w > 1]):
            runs.append((strategy, balancer, world, dict(cfg.get("options", {}).get(strategy, {}))))
    for (mask, seqlen, (hq, hkv)), (strategy, balancer, world, options) in itertools.product(shapes, runs):
        if balancer == "per_doc" and "document" not in mask:
            continue  # per_doc of a single document is headtail: the same cell twice
        if _is_strategy(strategy):  # e.g. auto predicts communication from the head layout
            options = dict(options, **strategy_class_of(strategy, extra).shape_options(hq, hkv, cfg["head_dim"]))
        cell = dict(strategy=strategy, balancer=balancer, mask=mask, seqlen=seqlen, world=world, hq=hq, hkv=hkv,
                    head_dim=cfg["head_dim"], dtype=cfg["dtype"], seed=cfg["seed"], warmup=cfg["warmup"],
                    repeats=cfg["repeats"], options=options, window=cfg["window"],
                    extra_strategies=extra, extra_peers=dict(cfg.get("extra_peers", {})))
        if "document" in mask:
            cell["doc_lens"] = sample_doc_lens(seqlen, cfg["docs"], cfg["seed"])
        cell["id"] = cell_id(cell)
        cells.append(cell)
    return cells


def strategy_class_of(strategy: str, extra: dict):
    """The class of a registered strategy, or of one the matrix adds (`extra_strategies`)."""
    return load_entry({**STRATEGIES, **extra}, strategy, "strategies")


def strategy_uses_balancer(strategy: str, extra: dict | None = None) -> bool:
    """Whether the matrix sweeps balancers for a strategy: not for peers and the 1-rank
    kernel, nor for a strategy that shards its own way (`sweeps_balancers`)."""
    return _is_strategy(strategy) and strategy_class_of(strategy, extra or {}).sweeps_balancers


def _is_strategy(name: str) -> bool:
    """A CP strategy of the registry, not a peer ("peer:...") or the 1-rank "kernel" baseline."""
    return not name.startswith("peer:") and name != "kernel"
