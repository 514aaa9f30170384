"""`parallel=auto`: pick the CP strategy (and balancer, and Ulysses x ring split) per build.

Every candidate's step time is predicted by the cost model from the mask alone -- exact
attention pairs per rank under its balancer, exact bytes per rank, a `Hardware` profile
(`parallel.simulator` presets, or "cpu" measured on gloo) -- and the fastest one is built
and delegated to.  The prediction uses only arguments every rank holds, so all ranks pick
the same strategy without a collective.  The choice and its predicted time are logged and
kept in `stats.extra` (`auto_choice`, `auto_predicted_s`).  Options: num_heads, num_kv_heads,
head_dim (required: communication depends on them), hardware (a preset name or a
`Hardware`; default h100 with CUDA, else the measured "cpu" profile), elem_bytes,
candidates (strategy names); the rest goes to the chosen strategy.
"""
from __future__ import annotations

import importlib
import logging
import os

import torch

from . import STRATEGIES, balance, build
from .base import ContextParallel
from .comm import group_layout
from .costmodel import Layout, kernel_rows, mask_keys, pairs_per_rank
from .simulator import PRESETS, Hardware, load_hardware, predict

log = logging.getLogger(__name__)

# gloo on this project's 2-core CPU runner (one thread per rank, so no compute/communication
# overlap), from `python -m scripts.simulate_cp calibrate results.jsonl --fit-masks causal` on
# a quiet-machine run of the default bench matrix (scripts/BENCHMARKS.md, run Q1, checked on
# run Q2): kernel rate and per-row diagonal cost from the 1-rank cells, the in-CP rate share
# (0.92) from the causal 2-rank cells, p2p / all-gather+reduce-scatter / all-to-all bandwidths
# and the merge cost of a cut kernel call from the worker's probes.  Re-calibrate for another
# machine with `--save cpu.json` and pass `hardware=cpu.json`.
CPU = Hardware("cpu", fwd_flops=66.7e9, bwd_flops=64.7e9, mem_bw=10e9, intra_bw=3.09e9, intra_lat=7.2e-4,
               inter_bw=3.09e9, inter_lat=7.2e-4, devices_per_node=64, overlap=0.0, diag_fwd=9.70e-7,
               diag_bwd=1.64e-6, split_fwd=2.48e-7, split_bwd=6.4e-8, coll_bw=0.359e9, a2a_bw=1.11e9)
HARDWARE = {**PRESETS, "cpu": CPU}
DEFAULT_CANDIDATES = ("ring", "allgather", "ulysses", "usp")


def resolve_hardware(hw) -> Hardware:
    """A `Hardware`, a preset name, or the path of a JSON profile written by
    `python -m scripts.simulate_cp calibrate RESULTS.jsonl --save PROFILE.json`."""
    if isinstance(hw, Hardware):
        return hw
    if isinstance(hw, str) and hw.endswith(".json"):
        if not os.path.exists(hw):
            raise ValueError(f"auto hardware={hw!r}: no such profile; write one with "
                             "`python -m scripts.simulate_cp calibrate RESULTS.jsonl --save {hw}`")
        return load_hardware(hw)
    if hw not in HARDWARE:
        raise ValueError(f"auto hardware={hw!r} is unknown; choose one of {', '.join(HARDWARE)} "
                         "or the path of a .json profile")
    return HARDWARE[hw]


def format_choice(strategy: str, balancer: str | None, options: dict) -> str:
    """"strategy/balancer[/key=value...]": how a choice is logged and kept in `stats.extra`
    (the head counts handed to ulysses are left out: they come from the model)."""
    return f"{strategy}/{balancer or 'default'}" + "".join(
        f"/{k}={v}" for k, v in options.items() if k not in ("num_heads", "num_kv_heads"))


def parse_choice(text: str) -> tuple[str, str | None, dict[str, str]] | None:
    """(strategy, balancer, options as strings) of a `format_choice` string; None if it is not one."""
    parts = str(text).split("/")
    if len(parts) < 2 or not all("=" in p for p in parts[2:]):
        return None
    return parts[0], None if parts[1] == "default" else parts[1], dict(p.split("=", 1) for p in parts[2:])


def candidates(names, world: int, mask) -> list[tuple[str, str | None, dict]]:
    """(strategy, balancer, options) triples to compare on `world` ranks."""
    out = []
    for name in names:
        if name not in STRATEGIES or name == "auto":
            raise ValueError(f"auto candidates: {name!r} is not a strategy; choose from {', '.join(STRATEGIES)}")
        try:
            importlib.import_module(STRATEGIES[name].split(":")[0])
        except ImportError:
            continue  # not in this build
        if name == "ring":
            out += [("ring", b, {}) for b in dict.fromkeys([balance.default_balancer(mask), "contiguous"])]
        elif name == "usp":
            out += [("usp", None, {"ulysses_degree": u, "ring_degree": world // u})
                    for u in range(2, world) if world % u == 0]
        else:
            out.append((name, None, {}))
    return out


def predicted_time(strategy, balancer, options, mask, seqlen, world, lay: Layout, hw: Hardware) -> float:
    rows = [r.numpy() for r in balance.assign(balancer, seqlen, world, mask)]
    pairs = pairs_per_rank(mask_keys(mask, seqlen), rows)
    if strategy in ("ulysses", "usp") and lay.hq % options.get("ulysses_degree", world):
        return float("inf")  # heads cannot be split that way
    cut = None
    if hw.diag_fwd or hw.diag_bwd or hw.split_fwd or hw.split_bwd:  # tile-based kernel (cpu)
        cut = kernel_rows(strategy, mask, seqlen, rows, ulysses_degree=options.get("ulysses_degree"))
    return predict(strategy, pairs, lay, hw, ulysses_degree=options.get("ulysses_degree"), kernel_rows=cut)["total_s"]


class Auto(ContextParallel):
    """Build-time choice among candidate strategies; everything else is the chosen one's."""

    name = "auto"

    def __init__(self, mask, seqlen, *, group=None, mesh=None, balancer=None, **options):
        super().__init__()
        missing = [k for k in ("num_heads", "num_kv_heads", "head_dim") if k not in options]
        if missing:
            raise ValueError(f"strategy 'auto' needs option(s) {', '.join(missing)} to predict communication; "
                             "pass the model's head counts and head_dim")
        hq, hkv, d = options.pop("num_heads"), options.pop("num_kv_heads"), options.pop("head_dim")
        on_gpu = torch.cuda.is_available()
        hw = options.pop("hardware", "h100" if on_gpu else "cpu")
        hw = resolve_hardware(hw)
        names = options.pop("candidates", DEFAULT_CANDIDATES)
        elem = options.pop("elem_bytes", 2 if on_gpu else 4)  # bf16 on GPU, float32 on CPU
        _, world, _ = group_layout(group)
        lay = Layout(seqlen, hq, hkv, d, elem)
        scored = []
        for strategy, bal, extra in candidates(names, world, mask):
            if balancer is not None and strategy == "ring":
                bal = balancer
            scored.append((predicted_time(strategy, bal, extra, mask, seqlen, world, lay, hw), strategy, bal, extra))
        if not scored:
            raise ValueError(f"auto: none of the candidates {list(names)} is available in this build")
        t, strategy, bal, extra = min(scored, key=lambda s: s[0])
        if strategy in ("ulysses", "usp"):
            extra = dict(extra, num_heads=hq, num_kv_heads=hkv) if strategy == "ulysses" else extra
        self.inner = build(strategy, mask, seqlen, group=group, mesh=mesh, balancer=bal, **extra, **options)
        # the balancer actually used (None above means the strategy's default for this mask)
        self.balancer = getattr(self.inner, "balancer", None) or bal
        self.choice = format_choice(strategy, self.balancer, extra)
        self.predicted_s = t
        self.scores = {format_choice(s, b, e): p for p, s, b, e in scored}
        log.info("parallel=auto chose %s (predicted %.4g s fwd+bwd on %s)", self.choice, t, hw.name)
        self.mask, self.seqlen = mask, seqlen
        for attr in ("rank", "world", "index", "indices", "group"):
            setattr(self, attr, getattr(self.inner, attr, None))

    def shard(self, x):
        return self.inner.shard(x)

    def unshard(self, x_local):
        return self.inner.unshard(x_local)

    def attention(self, q, k, v):
        return self.attention_with_lse(q, k, v)[0]

    def attention_with_lse(self, q, k, v):
        out = self.inner.attention_with_lse(q, k, v)
        self.stats = self.inner.stats
        self.stats.extra.update(auto_choice=self.choice, auto_predicted_s=self.predicted_s)
        return out

