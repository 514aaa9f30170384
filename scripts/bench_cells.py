"""The benchmark matrix: expand a config into cells, name them, and build each cell's mask.

A cell is a plain dict (JSON-able) that fully determines one measurement: strategy,
balancer, mask kind, seqlen, world size, head layout, dtype, seed, repeats.  Its `id` is
what the JSONL resume logic matches on, so re-running the same matrix skips finished cells.
"""
from __future__ import annotations

import itertools
import os
import random

from kernels import MaskSpec
from parallel.perf.workload import fill, load_doclens

MASK_KINDS = ("causal", "document", "window", "document+window", "full")
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


def make_mask(cell: dict) -> MaskSpec:
    kind, seqlen = cell["mask"], cell["seqlen"]
    if kind not in MASK_KINDS:
        raise ValueError(f"mask={kind!r} is unknown; choose one of {', '.join(MASK_KINDS)}")
    window = cell["window"] if "window" in kind else None
    if "document" in kind:
        return MaskSpec.from_doc_lens(cell["doc_lens"], causal=True, window=window)
    return MaskSpec(causal=kind != "full", window=window)


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
    for strategy in cfg["strategies"]:
        balancers = cfg["balancers"] if strategy_uses_balancer(strategy) else [None]
        for balancer, world in itertools.product(balancers, [w for w in cfg["worlds"] if w > 1]):
            runs.append((strategy, balancer, world, dict(cfg.get("options", {}).get(strategy, {}))))
    for (mask, seqlen, (hq, hkv)), (strategy, balancer, world, options) in itertools.product(shapes, runs):
        if balancer == "per_doc" and "document" not in mask:
            continue  # per_doc of a single document is headtail: the same cell twice
        if strategy == "auto":  # auto predicts communication from the head layout
            options = dict(options, num_heads=hq, num_kv_heads=hkv, head_dim=cfg["head_dim"])
        cell = dict(strategy=strategy, balancer=balancer, mask=mask, seqlen=seqlen, world=world, hq=hq, hkv=hkv,
                    head_dim=cfg["head_dim"], dtype=cfg["dtype"], seed=cfg["seed"], warmup=cfg["warmup"],
                    repeats=cfg["repeats"], options=options, window=cfg["window"],
                    extra_strategies=dict(cfg.get("extra_strategies", {})))
        if "document" in mask:
            cell["doc_lens"] = sample_doc_lens(seqlen, cfg["docs"], cfg["seed"])
        cell["id"] = cell_id(cell)
        cells.append(cell)
    return cells


def strategy_uses_balancer(strategy: str) -> bool:
    """Peers and Ulysses-style strategies shard contiguously by design; auto picks its own."""
    return not strategy.startswith("peer:") and strategy not in ("ulysses", "kernel", "auto")
