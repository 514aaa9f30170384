"""Tensor parallelism as a transform over the plain model (megatron-core layers).

Per block, the QKV and MLP input projections become ColumnParallelLinear (each TP rank
computes a slice of the output features: whole attention heads, a slice of the MLP
hidden units) and the O and MLP output projections become RowParallelLinear (each rank
multiplies its slice of the input features; the partial outputs are all-reduced over
the TP group). Between the two, everything is head-local, so core attention (and the CP
strategy under it) runs unchanged on n_heads / tp query heads and n_kv_heads / tp KV
heads. Embedding, norms and the output layer stay replicated; their gradients are equal
on every TP rank because the column-parallel layers all-reduce their input gradients.

Invariant: rank r's shard equals rows (column-parallel) or columns (row-parallel)
[r * n / tp, (r + 1) * n / tp) of the plain layer's weight, so the TP model computes the
same function as the plain one. Query head h uses KV head h // (n_heads / n_kv_heads);
contiguous head slices keep that pairing inside each rank.
"""
from __future__ import annotations

import torch
from torch import nn

COLUMN = ("attn.wq", "attn.wk", "attn.wv", "mlp.w1", "mlp.w3")
ROW = ("attn.wo", "mlp.w2")


def validate_tp(model_cfg, tp: int) -> None:
    """Head and hidden sizes must split evenly over tp ranks (checked before any group exists)."""
    for name, value in (("model.n_heads", model_cfg.n_heads), ("model.n_kv_heads", model_cfg.n_kv_heads),
                        ("the MLP hidden size", model_cfg.hidden_dim)):
        if value % tp:
            raise ValueError(f"{name}={value} is not divisible by parallel.tp={tp}; "
                             f"choose a tp that divides it (or change the model)")


def _layers():
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    class Column(ColumnParallelLinear):
        """Returns the local output slice only (megatron returns (output, bias))."""

        def forward(self, x):
            return super().forward(x)[0]

    class Row(RowParallelLinear):
        def forward(self, x):
            return super().forward(x)[0]

    return Column, Row


def _parallel_config(tp: int):
    from megatron.core.model_parallel_config import ModelParallelConfig

    return ModelParallelConfig(tensor_model_parallel_size=tp, use_cpu_initialization=True,
                               perform_initialization=True, params_dtype=torch.float32,
                               gradient_accumulation_fusion=False)


def _swap(parent: nn.Module, path: str, make) -> None:
    *owners, attr = path.split(".")
    for name in owners:
        parent = getattr(parent, name)
    plain = getattr(parent, attr)
    if not isinstance(plain, nn.Linear) or plain.bias is not None:
        raise ValueError(f"tensor parallelism expects {path} to be a bias-free nn.Linear, got {plain}")
    # megatron builds the full master weight with init_method and keeps this rank's slice
    layer = make(plain.in_features, plain.out_features, init_method=lambda master: master.copy_(plain.weight))
    setattr(parent, attr, layer.to(plain.weight.device))


def apply_tensor_parallel(model: nn.Module, tp: int) -> nn.Module:
    """Swap each block's linear layers for megatron-core TP layers, in place.

    Needs megatron's parallel_state initialised with tensor_model_parallel_size=tp."""
    validate_tp(model.cfg, tp)
    if tp == 1:
        return model
    column, row = _layers()
    config = _parallel_config(tp)
    for block in model.layers:
        for path in COLUMN:
            _swap(block, path, lambda i, o, init_method: column(i, o, config=config, init_method=init_method,
                                                                 bias=False, gather_output=False))
        for path in ROW:
            _swap(block, path, lambda i, o, init_method: row(i, o, config=config, init_method=init_method, bias=False,
                                                              input_is_parallel=True, skip_bias_add=False))
        block.attn.n_heads //= tp
        block.attn.n_kv_heads //= tp
    return model


def is_tensor_parallel(param: torch.Tensor) -> bool:
    return bool(getattr(param, "tensor_model_parallel", False))
