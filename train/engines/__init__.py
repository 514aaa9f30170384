"""Engines: what wraps the model for data parallelism and owns the optimizer step.

`build(name, model, cfg, groups)` -> an Engine (train/engines/base.py).  ddp ships here;
deepspeed and megatron live in their own modules and are imported only when named.
"""
from __future__ import annotations

from parallel import load_entry

ENGINES = {
    "ddp": "train.engines.ddp:DDPEngine",
    "deepspeed": "train.engines.deepspeed:DeepSpeedEngine",
    "megatron": "train.engines.megatron:MegatronEngine",
}


def build(name: str, model, cfg, groups):
    return load_entry(ENGINES, name, "engine.name")(model, cfg, groups)


def needs_process_group(name: str) -> bool:
    """Whether the engine works only inside a process group, even for one process (DeepSpeed)."""
    return name in ENGINES and getattr(load_entry(ENGINES, name, "engine.name"), "needs_process_group", False)
