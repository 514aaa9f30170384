"""`parallel=auto`: pick the CP strategy (and balancer, and Ulysses x ring split) per build.

Every candidate's step time is predicted by the cost model from the mask alone -- exact
attention pairs per rank under its balancer, exact bytes per rank, a `Hardware` profile
(`parallel.perf.hardware` presets, or "cpu" measured on gloo) -- and the fastest one is built
and delegated to.  The prediction uses only arguments every rank holds, so all ranks pick
the same strategy without a collective.  The decision is cached per (mask kind, seqlen,
world, head layout, hardware, log2 histogram of document lengths), so building auto every
step searches and logs once per new key; the choice and its predicted time are kept in
`stats.extra` (`auto_choice`, `auto_predicted_s`).  Options: num_heads, num_kv_heads,
head_dim (required: communication depends on them), hardware (a preset name or a
`Hardware`; default h100 with CUDA, else the measured "cpu" profile), elem_bytes,
candidates (strategy names); the rest goes to the chosen strategy.
"""
from __future__ import annotations

import importlib
import logging
from collections import Counter

import torch

from . import STRATEGIES, balance, build
from .base import ContextParallel
from .comm import group_layout
from .perf.cost import Layout, has_hook, kernel_rows, mask_keys, pairs_per_rank, strategy_class
from .perf.hardware import Hardware, resolve_hardware
from .perf.predict import bytes_for_time, predict

log = logging.getLogger(__name__)

DEFAULT_CANDIDATES = ("ring", "allgather", "ulysses", "usp")


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


def candidates(names, world: int, mask, lay: Layout, balancer=None) -> list[tuple[str, str | None, dict]]:
    """(strategy, balancer, options) triples to compare on `world` ranks: each strategy's own
    `auto_candidates`; strategies not in this build are left out."""
    out = []
    for name in names:
        if name not in STRATEGIES or name == "auto":
            raise ValueError(f"auto candidates: {name!r} is not a strategy; choose from {', '.join(STRATEGIES)}")
        try:
            importlib.import_module(STRATEGIES[name].split(":")[0])
        except ImportError:
            continue  # not in this build
        out += [(name, b, o) for b, o in strategy_class(name).auto_candidates(world, mask, lay, balancer)]
    return out


def predicted_time(strategy, balancer, options, mask, seqlen, world, lay: Layout, hw: Hardware) -> float:
    rows = [r.numpy() for r in balance.assign(balancer, seqlen, world, mask)]
    pairs = pairs_per_rank(mask_keys(mask, seqlen, lay.hkv), rows)
    if lay.hq % strategy_class(strategy).head_split(world, options):
        return float("inf")  # heads cannot be split that way
    # a tile-based kernel (cpu) is also priced by how each strategy cuts its calls, where it says
    tiled = hw.tiled and has_hook(strategy, "cost_kernel_cut")
    cut = kernel_rows(strategy, mask, seqlen, rows, heads=(lay.hq, lay.hkv), **options) if tiled else None
    sent = bytes_for_time(strategy, mask, lay, world, rows, options)
    return predict(strategy, pairs, lay, hw, kernel_rows=cut, sent=sent, **options)["total_s"]


def doc_histogram(mask) -> tuple[tuple[int, int], ...]:
    """Document lengths bucketed by powers of two ((bucket, count) pairs; () without documents):
    masks with the same histogram get the same decision."""
    if not mask.has_docs:
        return ()
    return tuple(sorted(Counter(int(n).bit_length() for n in mask.doc_lens).items()))


_DECISIONS: dict = {}  # decision key -> (scored candidates, best); bounded, oldest dropped first
_MAX_DECISIONS = 4096


def decide(names, world: int, mask, seqlen: int, lay: Layout, hw: Hardware, balancer=None):
    """(scored candidates, the fastest, whether this key is new) for this mask kind (causal,
    window, prefix, sink, S2 heads), seqlen, world, layout, hardware and document-length
    histogram; the search runs once per key."""
    prefix = tuple(mask.prefix) if isinstance(mask.prefix, list) else mask.prefix
    key = (tuple(names), world, bool(mask.is_causal), mask.window, prefix, mask.sink, mask.heads, doc_histogram(mask),
           seqlen, lay, hw, balancer)
    new = key not in _DECISIONS
    if new:
        scored = [(predicted_time(strategy, bal, extra, mask, seqlen, world, lay, hw), strategy, bal, extra)
                  for strategy, bal, extra in candidates(names, world, mask, lay, balancer)]
        if not scored:
            raise ValueError(f"auto: none of the candidates {list(names)} is available in this build")
        best = min(scored, key=lambda s: s[0])
        if len(_DECISIONS) >= _MAX_DECISIONS:
            _DECISIONS.pop(next(iter(_DECISIONS)))
        _DECISIONS[key] = scored, best
    return (*_DECISIONS[key], new)


class Auto(ContextParallel):
    """Build-time choice among candidate strategies; everything else is the chosen one's."""

    name = "auto"
    sweeps_balancers = False  # it picks its own

    @classmethod
    def shape_options(cls, num_heads, num_kv_heads, head_dim):
        """Communication is predicted from the head layout."""
        return dict(num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim)

    def __init__(self, mask, seqlen, *, group=None, mesh=None, balancer=None, **options):
        super().__init__()
        missing = [k for k in ("num_heads", "num_kv_heads", "head_dim") if k not in options]
        if missing:
            raise ValueError(f"strategy 'auto' needs option(s) {', '.join(missing)} to predict communication; "
                             "pass the model's head counts and head_dim")
        hq, hkv, d = options.pop("num_heads"), options.pop("num_kv_heads"), options.pop("head_dim")
        on_gpu = torch.cuda.is_available()
        hw = resolve_hardware(options.pop("hardware", "h100" if on_gpu else "cpu"), "parallel=auto hardware")
        names = options.pop("candidates", DEFAULT_CANDIDATES)
        elem = options.pop("elem_bytes", 2 if on_gpu else 4)  # bf16 on GPU, float32 on CPU
        _, world, _ = group_layout(self.cp_group(group, mesh))
        scored, (t, strategy, bal, extra), new = decide(names, world, mask, seqlen, Layout(seqlen, hq, hkv, d, elem),
                                                        hw, balancer)
        self.inner = build(strategy, mask, seqlen, group=group, mesh=mesh, balancer=bal, **extra, **options)
        # the balancer actually used (None above means the strategy's default for this mask)
        self.balancer = getattr(self.inner, "balancer", None) or bal
        self.choice = format_choice(strategy, self.balancer, extra)
        self.predicted_s = t
        self.scores = {format_choice(s, b, e): p for p, s, b, e in scored}
        if new:  # once per decision key, not every step; the training loop reports it (rank 0)
            log.debug("parallel=auto chose %s for %d tokens on %d ranks (predicted %.4g s fwd+bwd on %s)",
                     self.choice, seqlen, world, t, hw.name)
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

