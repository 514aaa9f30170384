"""Checks on a composed config, and what follows from it (device, masks, rank grid).

`validate(cfg, world)` runs identically on every rank before any process group exists, so a
bad setting fails everywhere with the same ValueError naming it; `scripts/make_sbatch.py`
runs it for the job's rank count before anything is submitted.
"""
from __future__ import annotations

import dataclasses
import importlib
import math
import os

import torch

import parallel
from kernels import HeadStride, MaskSpec
from models.llama import LayerMask, S2Heads
from models.memory import MemoryOptions
from parallel.groups import ParallelDims

from . import checkpoint, engines, faults

# the benchmark's words: window alone has no documents; document+window is both
MASKS = ("causal", "document", "window", "document+window")


def resolve_device(tcfg) -> tuple[torch.device, torch.dtype | None]:
    """(device, autocast dtype or None for plain float32)."""
    if tcfg.device == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    elif tcfg.device in ("cpu", "cuda"):
        name = tcfg.device
    else:
        raise ValueError(f"train.device={tcfg.device!r} is unknown; choose auto, cpu or cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device=cuda but no CUDA device is visible; use train.device=cpu")
    device = torch.device(name, int(os.environ.get("LOCAL_RANK", 0))) if name == "cuda" else torch.device("cpu")
    dtypes = {"float32": None, "bfloat16": torch.bfloat16, "auto": torch.bfloat16 if name == "cuda" else None}
    if tcfg.dtype not in dtypes:
        raise ValueError(f"train.dtype={tcfg.dtype!r} is unknown; choose auto, float32 or bfloat16")
    return device, dtypes[tcfg.dtype]


def build_mask(doc_lens: list[int], tcfg, kinds: dict | None = None) -> MaskSpec:
    """The mask train.mask names over a packed sequence with these document lengths; `kinds`
    (one layer's, `layer_kinds`) replaces its window and adds sink, prefix and S2 heads.  A
    prefix longer than a document covers the whole document."""
    kinds = dict(kinds or base_kinds(tcfg))
    window = kinds.pop("window")
    documents = "document" in tcfg.mask
    if kinds.get("prefix") is not None:
        kinds["prefix"] = [min(kinds["prefix"], n) for n in (doc_lens if documents else [sum(doc_lens)])]
    extra = {k: v for k, v in kinds.items() if v is not None}
    if documents:
        return MaskSpec.from_doc_lens(doc_lens, causal=True, window=window, **extra)
    return MaskSpec(causal=True, window=window, **extra)


def base_kinds(tcfg) -> dict:
    """train.mask's kinds beyond its documents: only a window."""
    return {"window": tcfg.window if "window" in tcfg.mask else None, "sink": None, "prefix": None, "heads": None}


def entry_kinds(entry: LayerMask) -> dict:
    heads = None if entry.heads is None else HeadStride(**dataclasses.asdict(entry.heads))
    return {"window": entry.window, "sink": entry.sink, "prefix": entry.prefix, "heads": heads}


def layer_kinds(tcfg, entries: list, n_layers: int) -> tuple[list[dict], list[int]]:
    """The distinct mask kinds of the layers (in order of their first layer) and, per layer,
    the index of its own: the first model.layer_masks entry covering it, else train.mask's."""
    entries = [as_layer_mask(e, i) for i, e in enumerate(entries)]
    keys = [tuple(next((entry_kinds(e) for e in entries if e.covers(layer)), base_kinds(tcfg)).items())
            for layer in range(n_layers)]
    distinct = list(dict.fromkeys(keys))
    return [dict(k) for k in distinct], [distinct.index(k) for k in keys]


def as_layer_mask(entry, i: int) -> LayerMask:
    """A model.layer_masks entry as the schema (a plain dict from a non-Hydra caller too)."""
    if isinstance(entry, LayerMask):
        return entry
    if not isinstance(entry, dict):
        raise ValueError(f"model.layer_masks[{i}]={entry!r} must be a mapping such as {{every: 4, offset: 3}}")
    fields = [f.name for f in dataclasses.fields(LayerMask)]
    unknown = sorted(set(entry) - set(fields))
    if unknown:
        raise ValueError(f"model.layer_masks[{i}].{unknown[0]} is not a layer mask setting; use {', '.join(fields)}")
    heads = entry.get("heads")
    if isinstance(heads, dict):
        try:
            heads = S2Heads(**heads)
        except TypeError as err:
            raise ValueError(f"model.layer_masks[{i}].heads={heads}: {err}; give block, local_blocks, vert_stride "
                             f"and optionally dense_heads") from err
    return LayerMask(**{**entry, "heads": heads})


def validate_layer_masks(entries: list, n_layers: int, n_kv_heads: int, tp: int = 1) -> None:
    """Every model.layer_masks entry names real layers and a mask the kernels accept.  S2 heads
    need tp=1: tensor parallelism hands each rank a slice of the K/V heads, numbered from 0."""
    for i, raw in enumerate(entries):
        e, at = as_layer_mask(raw, i), f"model.layer_masks[{i}]"
        if e.layers is not None:
            if e.every != 1 or e.offset != 0:
                raise ValueError(f"{at} sets both layers={list(e.layers)} and every/offset; keep one of them")
            bad = [layer for layer in e.layers if not 0 <= layer < n_layers]
            if bad or not e.layers:
                raise ValueError(f"{at}.layers={list(e.layers)} must list layer indices in 0..{n_layers - 1} "
                                 f"(model.n_layers={n_layers})")
        elif e.every < 1 or not 0 <= e.offset < min(e.every, n_layers):
            raise ValueError(f"{at}.every={e.every}, offset={e.offset} must have every >= 1 and 0 <= offset < "
                             f"min(every, model.n_layers={n_layers}) so that the entry covers a layer")
        for key, low in (("window", 1), ("sink", 1), ("prefix", 1)):
            value = getattr(e, key)
            if value is not None and (not isinstance(value, int) or value < low):
                raise ValueError(f"{at}.{key}={value!r} must be an int >= {low} tokens, or null for none")
        if e.heads is not None and tp > 1:
            raise ValueError(f"{at}.heads (S2) with parallel.tp={tp}: tensor parallelism splits the K/V heads, so "
                             f"each rank would number its slice from 0; use parallel.tp=1 with per-head masks")
        try:
            kinds = entry_kinds(e)
            if kinds["heads"] is not None:
                kinds["heads"].check_cover(n_kv_heads)
        except (ValueError, TypeError) as err:
            raise ValueError(f"{at}.heads: {err} (model.n_kv_heads={n_kv_heads})") from err
        try:
            MaskSpec(causal=True, **kinds)
        except ValueError as err:
            raise ValueError(f"{at}: {err}") from err


def uses_documents(mask: str) -> bool:
    """Whether labels stop at document ends (no predicting the next document's first token)."""
    return "document" in mask


def validate_optim(o) -> None:
    checks = [
        ("lr", o.lr, o.lr >= 0, "a learning rate >= 0 (0 leaves the weights as they are), e.g. optim.lr=3e-3"),
        ("min_lr_ratio", o.min_lr_ratio, 0 <= o.min_lr_ratio <= 1, "in [0, 1]"),
        ("warmup_steps", o.warmup_steps, o.warmup_steps >= 0, ">= 0"),
        ("weight_decay", o.weight_decay, o.weight_decay >= 0, ">= 0"),
        ("betas", list(o.betas), len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "two numbers in [0, 1)"),
        ("eps", o.eps, o.eps > 0, "> 0"),
        ("grad_clip", o.grad_clip, o.grad_clip >= 0, ">= 0 (0 turns clipping off)"),
    ]
    for name, value, ok, want in checks:
        if not ok or (isinstance(value, float) and not math.isfinite(value)):
            raise ValueError(f"optim.{name}={value} must be {want}")


def validate(cfg, world: int) -> ParallelDims:
    """Every setting checked here, identically on every rank, before any collective."""
    t, p = cfg.train, cfg.parallel
    if t.steps < 1 or t.grad_accum < 1:
        raise ValueError(f"train.steps={t.steps} and train.grad_accum={t.grad_accum} must be >= 1")
    if t.mask not in MASKS:
        raise ValueError(f"train.mask={t.mask!r} is unknown; choose one of {', '.join(MASKS)}")
    if ("window" in t.mask) != (t.window is not None):
        raise ValueError(f"train.mask={t.mask} with train.window={t.window}: train.mask=window and "
                         f"train.mask=document+window need train.window=<tokens>, and train.window is only for those")
    if t.window is not None and t.window < 1:
        raise ValueError(f"train.window={t.window} must be a positive number of tokens")
    validate_optim(cfg.optim)
    if not cfg.model.path:  # model=hf: the Trainer checks against the checkpoint's layer count
        validate_layer_masks(cfg.model.layer_masks, cfg.model.n_layers, cfg.model.n_kv_heads, p.tp)
    if p.strategy not in parallel.STRATEGIES:
        raise ValueError(f"parallel.strategy={p.strategy!r} is unknown; "
                         f"choose one of {', '.join(parallel.STRATEGIES)}")
    if p.tp < 1 or p.dp < 1 or world % (p.tp * p.dp):
        raise ValueError(f"parallel.tp={p.tp} * parallel.dp={p.dp} must divide the number of ranks ({world})")
    if p.tp > 1 and cfg.engine.name != "megatron":
        raise ValueError(f"parallel.tp={p.tp} needs engine=megatron (engine={cfg.engine.name} has no tensor parallelism)")
    cp = world // (p.tp * p.dp) if p.cp is None else p.cp
    if p.strategy == "none" and cp != 1:
        raise ValueError(
            f"parallel.strategy=none with cp={cp} ranks would repeat the same sequence on each; "
            f"set parallel.dp={world // p.tp} (data parallel) or choose a CP strategy"
        )
    if cfg.engine.name not in engines.ENGINES:
        raise ValueError(f"engine.name={cfg.engine.name!r} is unknown; choose one of {', '.join(engines.ENGINES)}")
    engine_module = importlib.import_module(engines.ENGINES[cfg.engine.name].split(":")[0])
    if hasattr(engine_module, "validate_config"):
        engine_module.validate_config(cfg)
    MemoryOptions.from_train(t)
    checkpoint.validate(cfg.checkpoint)
    faults.validate(cfg.faults, cfg.checkpoint)
    opts = p.options
    return ParallelDims(world, tp=p.tp, cp=cp, dp=p.dp,
                        ulysses_degree=opts.get("ulysses_degree"), ring_degree=opts.get("ring_degree"))
