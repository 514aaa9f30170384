"""The public kernel contract: `attention(...) -> (out, lse)` and `merge(...)`.

Every backend module exposes
    forward(q, k, v, mask, q_pos, k_pos, scale, kv_heads) -> (out, lse)            (no autograd)
    backward(dout, q, k, v, out, lse, mask, q_pos, k_pos, scale, dlse, kv_heads) -> (dq, dk, dv)
    available(device) -> (bool, reason)
and `attention` wraps the pair in one autograd Function.  `backward` takes the *final*
out/lse of the query rows, which is what lets ring and CAD run the backward of one key
block after partial results were merged over many (the flash-attention identity
dS = P * (dP - rowsum(dO * O) + dlse) only needs the final row statistics).
`kv_heads` (LongTensor [Hkv], or None when the mask does not depend on the head) holds the
global index of each K/V head given, for masks with `heads`: a strategy that holds a
subset of the heads (Ulysses) passes which ones.
"""
from __future__ import annotations

import importlib
import math

import torch

from .mask import MaskSpec, check_positions

BACKENDS = ("reference", "cpu", "triton", "flash")
_MODULES = {"reference": ".reference", "cpu": ".cpu", "triton": ".triton_attn", "flash": ".flash"}


def backend_module(name: str):
    if name not in _MODULES:
        raise ValueError(f"backend={name!r} is unknown; choose one of {', '.join(BACKENDS)} or 'auto'")
    return importlib.import_module(_MODULES[name], __package__)


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends that can run on `device` in this installation."""
    device = torch.device(device)
    names = []
    for name in BACKENDS:
        try:
            ok, _ = backend_module(name).available(device)
        except ImportError:
            ok = False
        if ok:
            names.append(name)
    return names


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype, *,
                    mask: MaskSpec | None = None, q_pos=None, k_pos=None) -> str:
    """Map 'auto' to the fastest backend that can run this call; check a named one can run.

    auto: on CUDA flash-attn for float16/bfloat16 when the rows fit its varlen layout
    (each document's rows consecutive; needs mask and positions to decide), else triton;
    on CPU torch's fused ops (`cpu`), except float64, which goes to `reference`.
    """
    if backend == "auto":
        if device.type == "cuda":
            order = ("flash", "triton", "reference") if dtype in (torch.float16, torch.bfloat16) else ("triton", "reference")
        else:
            order = ("cpu", "reference") if dtype != torch.float64 else ("reference",)
        for name in order:
            try:
                mod = backend_module(name)
            except ImportError:
                continue
            if mod.available(device)[0] and (name != "flash" or mod.supports(mask, q_pos, k_pos)):
                return name
        return "reference"
    mod = backend_module(backend)
    ok, why = mod.available(device)
    if not ok:
        raise ValueError(f"backend={backend!r} is not available on {device}: {why}")
    return backend


def validate(q, k, v, mask, q_pos, k_pos, scale, kv_heads=None):
    """Shape and argument checks shared by every backend; returns (q_pos, k_pos, scale,
    kv_heads), kv_heads None unless the mask depends on the head.  Without `kv_heads` the
    K/V heads given are all there are, so an S2 layout's cover is checked here."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise ValueError(f"{name} must be a [tokens, heads, head_dim] tensor, got {getattr(t, 'shape', type(t))}")
    if not isinstance(mask, MaskSpec):
        raise ValueError(f"mask must be a kernels.MaskSpec, got {type(mask).__name__}")
    tq, hq, d = q.shape
    tk, hkv, dk = k.shape
    if v.shape[0] != tk or v.shape[1] != hkv:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must agree in tokens and heads")
    if dk != d:
        raise ValueError(f"q head_dim={d} and k head_dim={dk} must match")
    if hkv < 1 or hq % hkv != 0:
        raise ValueError(f"q heads Hq={hq} must be a multiple of k/v heads Hkv={hkv} (GQA/MQA)")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    q_pos = check_positions("q_pos", q_pos, tq, q.device)
    k_pos = check_positions("k_pos", k_pos, tk, q.device)
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    if kv_heads is not None or mask.heads is not None:
        kv_heads = mask.kv_heads_for(hkv if kv_heads is None else None, kv_heads)
        if kv_heads.numel() != hkv:
            raise ValueError(f"kv_heads lists {kv_heads.numel()} heads but k and v hold Hkv={hkv}")
    return q_pos, k_pos, float(scale), (kv_heads if mask.heads is not None else None)


class _Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, q_pos, k_pos, scale, kv_heads, mod):
        out, lse = mod.forward(q, k, v, mask, q_pos, k_pos, scale, kv_heads)
        ctx.save_for_backward(q, k, v, out, lse, q_pos, k_pos)
        ctx.mask, ctx.scale, ctx.kv_heads, ctx.mod = mask, scale, kv_heads, mod
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse, q_pos, k_pos = ctx.saved_tensors
        if dout is None:
            dout = torch.zeros_like(out)
        if dlse is not None and not bool(dlse.any()):
            dlse = None
        dq, dk, dv = ctx.mod.backward(dout.contiguous(), q, k, v, out, lse, ctx.mask, q_pos, k_pos, ctx.scale, dlse,
                                      ctx.kv_heads)
        return dq, dk, dv, None, None, None, None, None, None


def attention(q, k, v, mask: MaskSpec, *, q_pos=None, k_pos=None, scale=None, backend: str = "auto",
              kv_heads=None):
    """Core attention softmax(q k^T * scale) v under `mask`, in global coordinates.

    q [Tq, Hq, D], k/v [Tk, Hkv, D]; q_pos/k_pos: global positions of the rows (default
    0..T-1); kv_heads: global index of each K/V head given (default 0..Hkv-1; matters for
    masks with `heads` only).  Returns out [Tq, Hq, D] (q's dtype) and lse [Hq, Tq]
    (float32; float64 for float64 inputs).  Differentiable in q, k, v (and through lse).
    """
    q_pos, k_pos, scale, kv_heads = validate(q, k, v, mask, q_pos, k_pos, scale, kv_heads)
    name = resolve_backend(backend, q.device, q.dtype, mask=mask, q_pos=q_pos, k_pos=k_pos)
    mod = backend_module(name)
    if name == "reference":
        return mod.attention(q, k, v, mask, q_pos, k_pos, scale, kv_heads)
    return _Attention.apply(q, k, v, mask, q_pos, k_pos, scale, kv_heads, mod)


def forward(q, k, v, mask: MaskSpec, *, q_pos=None, k_pos=None, scale=None, backend: str = "auto",
            kv_heads=None):
    """Non-differentiable forward of one block: (out, lse).  For strategies that write their
    own autograd Function (ring, CAD) and call `backward` on each block."""
    q_pos, k_pos, scale, kv_heads = validate(q, k, v, mask, q_pos, k_pos, scale, kv_heads)
    mod = backend_module(resolve_backend(backend, q.device, q.dtype, mask=mask, q_pos=q_pos, k_pos=k_pos))
    with torch.no_grad():
        return mod.forward(q, k, v, mask, q_pos, k_pos, scale, kv_heads)


def backward(dout, q, k, v, out, lse, mask: MaskSpec, *, q_pos=None, k_pos=None, scale=None,
             dlse=None, backend: str = "auto", kv_heads=None):
    """Gradients (dq, dk, dv) of one key block given the final out/lse of the query rows."""
    q_pos, k_pos, scale, kv_heads = validate(q, k, v, mask, q_pos, k_pos, scale, kv_heads)
    mod = backend_module(resolve_backend(backend, q.device, q.dtype, mask=mask, q_pos=q_pos, k_pos=k_pos))
    with torch.no_grad():
        return mod.backward(dout, q, k, v, out, lse, mask, q_pos, k_pos, scale, dlse, kv_heads)


def merge(out_a, lse_a, out_b, lse_b):
    """Combine partial attention over two disjoint key sets, in float32.

    out_* [T, H, D], lse_* [H, T].  Returns (out, lse) with out in out_a's dtype and
    lse in float32 (float64 when the inputs are).  Rows that saw no key on one side
    (lse = -inf) take the other side as is; rows that saw none anywhere stay 0 / -inf.
    """
    acc = torch.float64 if out_a.dtype == torch.float64 else torch.float32
    la, lb = lse_a.to(acc), lse_b.to(acc)
    lse = torch.logaddexp(la, lb)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    wa = torch.where(torch.isfinite(la), torch.exp(la - safe), torch.zeros_like(la))
    wb = torch.where(torch.isfinite(lb), torch.exp(lb - safe), torch.zeros_like(lb))
    out = out_a.to(acc) * wa.t().unsqueeze(-1) + out_b.to(acc) * wb.t().unsqueeze(-1)
    return out.to(out_a.dtype), lse
