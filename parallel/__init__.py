"""Context parallelism: process groups, sequence balancers, CP strategies and CAD.

`build(strategy, mask, seqlen, group=, mesh=, balancer=, **options)` returns an object with
`shard`, `positions`, `attention`, `unshard` and `stats` (contract 2 of DESIGN.md).
"""
from __future__ import annotations

import importlib

from .base import ContextParallel, CPStats

# name -> "module:class"; each class takes (mask, seqlen, *, group, mesh, balancer, **options)
STRATEGIES = {
    "none": "parallel.none:NoCP",
    "ring": "parallel.ring:Ring",
    "allgather": "parallel.allgather:AllGather",
    "ulysses": "parallel.ulysses:Ulysses",
    "usp": "parallel.usp:USP",
    "cad": "parallel.cad:CAD",
    "auto": "parallel.auto:Auto",
}


def load_entry(registry: dict, name: str, setting: str):
    """The class a registry of "module:class" strings names, imported only now (optional
    dependencies stay optional); an unknown or unimportable name raises ValueError naming
    `setting`."""
    if name not in registry:
        raise ValueError(f"{setting}={name!r} is unknown; choose one of {', '.join(registry)}")
    module, cls = registry[name].split(":")
    try:
        return getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"{setting}={name!r} is not available in this build: {e}") from e


def build(strategy: str, mask, seqlen: int, *, group=None, mesh=None, balancer=None, **options) -> ContextParallel:
    """Construct a CP strategy.  Raises ValueError (before any collective) on bad settings."""
    impl = load_entry(STRATEGIES, strategy, "strategy")
    return impl(mask, seqlen, group=group, mesh=mesh, balancer=balancer, **options)
