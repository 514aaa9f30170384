"""A training checkpoint (`<run>/checkpoints/step_<n>/`) read back into one plain Llama, on one
process, for export (scripts/export_hf.py) and evaluation (scripts/eval_longctx.py).

- ddp: torch.distributed.checkpoint (DCP) files, tensors under `model.<name>`.
- megatron: DCP too; a tensor-parallel weight is saved per TP rank as `model.<name>@tp<r>`,
  rows (column-parallel layers) or columns (row-parallel layers) [r n / tp, (r+1) n / tp) of
  the plain weight (train/engines/tensor_parallel.py), so the shards are concatenated back.
- deepspeed: DeepSpeed's own folder `deepspeed/`, merged into full fp32 weights by
  DeepSpeed's zero_to_fp32 reader (ZeRO 1-3) or read from its model-states file (ZeRO 0).
"""
from __future__ import annotations

import os
import re

import torch

from models.hf import assign_weights, resolve_config
from models.llama import Llama, LlamaConfig

from .engines.tensor_parallel import COLUMN, ROW

TP_SHARD = re.compile(r"^(.*)@tp(\d+)$")


def _read_dcp(path: str) -> dict[str, torch.Tensor]:
    """Every `model.*` tensor of a DCP checkpoint, by its saved name (prefix dropped)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    meta = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    state = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in meta.items()
             if k.startswith("model.") and isinstance(m, TensorStorageMetadata)}
    if not state:
        raise ValueError(f"{path} holds no model tensors (is it a step_<n> folder written by engine=ddp or megatron?)")
    dcp.load(state, checkpoint_id=path, no_dist=True)
    return {k.removeprefix("model."): v for k, v in state.items()}


def _merge_tp(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Concatenate `name@tp<r>` shards along the dimension their layer was split on."""
    shards: dict[str, dict[int, torch.Tensor]] = {}
    merged = {}
    for key, t in state.items():
        m = TP_SHARD.match(key)
        if m:
            shards.setdefault(m.group(1), {})[int(m.group(2))] = t
        else:
            merged[key] = t
    for name, parts in shards.items():
        layer = name.rsplit(".", 1)[0]
        dim = 0 if layer.endswith(COLUMN) else 1 if layer.endswith(ROW) else None
        if dim is None or sorted(parts) != list(range(len(parts))):
            raise ValueError(f"checkpoint tensor {name!r}: tensor-parallel shards {sorted(parts)} cannot be merged")
        merged[name] = torch.cat([parts[r] for r in range(len(parts))], dim=dim)
    return merged


def _read_deepspeed(path: str) -> dict[str, torch.Tensor]:
    folder = os.path.join(path, "deepspeed")
    states = os.path.join(folder, "mp_rank_00_model_states.pt")
    if not os.path.isfile(states):
        raise ValueError(f"{folder} has no mp_rank_00_model_states.pt (not a DeepSpeed checkpoint of engine=deepspeed)")
    if any(name.endswith("optim_states.pt") and "zero" in name for name in os.listdir(folder)):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return dict(get_fp32_state_dict_from_zero_checkpoint(path, tag="deepspeed"))
    return torch.load(states, map_location="cpu", weights_only=False)["module"]


def read_model_state(path: str) -> dict[str, torch.Tensor]:
    """The plain model's tensors from a step_<n> folder of any engine."""
    if not os.path.isdir(path):
        raise ValueError(f"checkpoint {path!r} does not exist; give a <run>/checkpoints/step_<n> folder")
    if os.path.isdir(os.path.join(path, "deepspeed")):
        return _read_deepspeed(path)
    return _merge_tp(_read_dcp(path))


def load_trained_model(path: str, model_cfg: LlamaConfig) -> Llama:
    """The run's model (model_cfg: its `model` settings; model=hf takes the shape from
    model.path's config.json, others the vocabulary from the checkpoint) with the weights of
    checkpoint `path`; a missing tensor or a shape mismatch raises naming it."""
    state = read_model_state(path)
    if "embed.weight" not in state:
        raise ValueError(f"{path}: no 'embed.weight' tensor; not a checkpoint of this model")
    cfg = resolve_config(model_cfg, state["embed.weight"].shape[0], f"checkpoint {path}")
    with torch.device("meta"):
        model = Llama(cfg)
    wanted = {}
    for name, t in model.state_dict().items():
        if name == "output.weight" and cfg.tie_embeddings:
            continue
        if name not in state:
            raise ValueError(f"{path}: tensor {name!r} is missing (the model settings differ from the run's?)")
        if tuple(state[name].shape) != tuple(t.shape):
            raise ValueError(f"{path}: tensor {name!r} has shape {list(state[name].shape)}, the model {list(t.shape)}")
        wanted[name] = state[name].float()
    return assign_weights(model, wanted, path)
