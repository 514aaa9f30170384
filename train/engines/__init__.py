"""Engines: what wraps the model for data parallelism and owns the optimizer step.

`build(name, model, cfg, groups)` -> an Engine (train/engines/base.py).  ddp ships here;
deepspeed and megatron live in their own modules and are imported only when named.
"""
from __future__ import annotations

import importlib

ENGINES = {
    "ddp": "train.engines.ddp:DDPEngine",
    "deepspeed": "train.engines.deepspeed:DeepSpeedEngine",
    "megatron": "train.engines.megatron:MegatronEngine",
}


def build(name: str, model, cfg, groups):
    if name not in ENGINES:
        raise ValueError(f"engine.name={name!r} is unknown; choose one of {', '.join(ENGINES)}")
    module, cls = ENGINES[name].split(":")
    try:
        impl = getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"engine.name={name!r} is not available in this build: {e}") from e
    return impl(model, cfg, groups)


__all__ = ["ENGINES", "build"]
