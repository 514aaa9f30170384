"""Attention math on one device (contract 1 of DESIGN.md).

`attention(q, k, v, mask, q_pos=, k_pos=, scale=, backend=) -> (out, lse)` with masks in
global coordinates, `merge` of partials over disjoint keys, and the block-level
`forward` / `backward` pair that ring and CAD build their own autograd on.  Mask kinds:
documents, causal, window, prefix-LM, sinks and S2 per-head sparsity (`HeadStride`).
"""
from .api import BACKENDS, attention, available_backends, backward, forward, merge, resolve_backend
from .mask import HeadStride, MaskSpec

__all__ = ["BACKENDS", "HeadStride", "MaskSpec", "attention", "available_backends", "backward", "forward", "merge",
           "resolve_backend"]
