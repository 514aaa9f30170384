"""Triton backend: our flash-attention forward and backward (kernels in triton_kernels.py).

The host side prepares what the kernels need: contiguous [T, H, D] tensors, document ids
of the rows (the mask is evaluated in the kernel from global positions), and the table
of tile kinds from `blocks.classify`, so hidden tiles are skipped without being loaded.
On CPU the kernels run only under the Triton interpreter (TRITON_INTERPRET=1).
"""
from __future__ import annotations

import os

import torch

from .blocks import RowInfo, classify

def _block(device: torch.device) -> int:
    """Tile side: small on CPU (the interpreter runs numpy per tile), 64 on GPU."""
    return 64 if device.type == "cuda" else 16


def _kernels():
    from . import triton_kernels
    return triton_kernels


def _setup(q, k, mask, q_pos, k_pos):
    """Kernel arguments shared by forward and backward."""
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"the triton backend takes float16/bfloat16/float32, got dtype {q.dtype}; use backend='reference'")
    dev = q.device
    block = _block(dev)
    qi, ki = RowInfo.of(mask, q_pos), RowInfo.of(mask, k_pos)
    kinds = classify(mask, qi.block_stats(block)[:, None], ki.block_stats(block)[None, :])
    return dict(
        q_pos=qi.pos.to(dev), k_pos=ki.pos.to(dev), q_doc=qi.doc.to(dev), k_doc=ki.doc.to(dev),
        kinds=kinds.contiguous().to(dev),
        Tq=q.shape[0], Tk=k.shape[0], G=q.shape[1] // k.shape[1],
        D=q.shape[2], CAUSAL=mask.is_causal, WINDOW=mask.window or 0, HAS_DOCS=mask.has_docs,
        PREC="ieee" if q.dtype == torch.float32 else None,  # no TF32 rounding for float32
        BLOCK_M=block, BLOCK_N=block, BLOCK_D=max(16, 1 << (q.shape[2] - 1).bit_length()),
    )


def forward(q, k, v, mask, q_pos, k_pos, scale):
    if q.shape[0] == 0 or k.shape[0] == 0:
        lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=torch.float32, device=q.device)
        return torch.zeros_like(q), lse
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    args = _setup(q, k, mask, q_pos, k_pos)
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[1], q.shape[0], dtype=torch.float32, device=q.device)
    grid = (_nblocks(q), q.shape[1])
    _kernels().fwd_kernel[grid](q, k, v, out, lse, scale=scale,
                                sqt=q.stride(0), sqh=q.stride(1), skt=k.stride(0), skh=k.stride(1),
                                sot=out.stride(0), soh=out.stride(1), **args)
    return out, lse


def backward(dout, q, k, v, out, lse, mask, q_pos, k_pos, scale, dlse=None):
    if q.shape[0] == 0 or k.shape[0] == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    dout = dout.to(q.dtype).contiguous()
    args = _setup(q, k, mask, q_pos, k_pos)
    lse = lse.to(torch.float32)
    lse = lse.masked_fill(torch.isneginf(lse), float("inf")).contiguous()  # rows seeing no key: P = 0
    delta = (dout.float() * out.float()).sum(-1).t()
    if dlse is not None:
        delta = delta - dlse.float()
    delta = delta.contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    kern = _kernels()
    kern.dkdv_kernel[(_nblocks(k), k.shape[1])](
        q, k, v, dout, lse, delta, dk, dv, scale=scale,
        sqt=q.stride(0), sqh=q.stride(1), skt=k.stride(0), skh=k.stride(1),
        sdkt=dk.stride(0), sdkh=dk.stride(1), **args)
    kern.dq_kernel[(_nblocks(q), q.shape[1])](
        q, k, v, dout, lse, delta, dq, scale=scale,
        sqt=q.stride(0), sqh=q.stride(1), skt=k.stride(0), skh=k.stride(1), **args)
    return dq, dk, dv


def _nblocks(x: torch.Tensor) -> int:
    return max(1, -(-x.shape[0] // _block(x.device)))


def available(device) -> tuple[bool, str]:
    device = torch.device(device)
    try:
        import triton  # noqa: F401
    except ImportError:
        return False, "triton is not installed"
    if device.type == "cuda":
        return (True, "") if torch.cuda.is_available() else (False, "CUDA is not available")
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") == "1":
            return True, ""
        return False, "on CPU the triton backend runs only under TRITON_INTERPRET=1"
    return False, f"the triton backend does not run on {device.type}"
