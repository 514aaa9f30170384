"""Triton backend: our flash-attention forward and backward (kernels in triton_kernels.py).

The host side prepares what the kernels need: contiguous [T, H, D] tensors, the rows'
columns (`blocks.COLUMNS`; the mask is evaluated in the kernel from global positions), and
block lists of the tiles `blocks.classify` does not prove hidden -- one per KV head when
the mask depends on the head -- so hidden tiles are never visited.
On CPU the kernels run only under the Triton interpreter (TRITON_INTERPRET=1).
"""
from __future__ import annotations

import os

import torch

from .blocks import HIDDEN, RowInfo, classify


def _block(device: torch.device) -> int:
    """Tile side: small on CPU (the interpreter runs numpy per tile), 64 on GPU."""
    return 64 if device.type == "cuda" else 16


def _kernels():
    from . import triton_kernels
    return triton_kernels


def _block_lists(kinds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR lists of the computed tiles of kinds [H, n, m]: ptr [H*n + 1] and the column
    indices of every row in order (int32)."""
    h, n, m = kinds.shape
    live = kinds.reshape(h * n, m) != HIDDEN
    ptr = torch.zeros(h * n + 1, dtype=torch.int32)
    ptr[1:] = torch.cumsum(live.sum(1), 0)
    idx = live.nonzero()[:, 1].to(torch.int32)
    return ptr, idx


def _setup(q, k, mask, q_pos, k_pos, kv_heads):
    """Kernel arguments shared by forward and backward: row columns, the global index of
    every K/V head, and the block lists (per KV head when the mask depends on it)."""
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"the triton backend takes float16/bfloat16/float32, got dtype {q.dtype}; use backend='reference'")
    dev = q.device
    block = _block(dev)
    hkv = k.shape[1]
    heads = torch.arange(hkv) if kv_heads is None else kv_heads.cpu()
    qi, ki = RowInfo.of(mask, q_pos), RowInfo.of(mask, k_pos)
    q_stats = qi.block_stats(block)[:, None]
    per_head = [None] if mask.heads is None else [int(h) for h in heads]
    kinds = torch.stack([classify(mask, q_stats, RowInfo.of(mask, k_pos, h).block_stats(block)[None, :])
                         for h in per_head])
    row_ptr, row_idx = _block_lists(kinds)
    col_ptr, col_idx = _block_lists(kinds.transpose(1, 2))
    s2 = mask.heads
    return dict(
        q_cols=qi.cols.t().contiguous().to(dev), k_cols=ki.cols.t().contiguous().to(dev), kv_heads=heads.to(dev),
        row_ptr=row_ptr.to(dev), row_idx=row_idx.to(dev), col_ptr=col_ptr.to(dev), col_idx=col_idx.to(dev),
        Tq=q.shape[0], Tk=k.shape[0], G=q.shape[1] // hkv, D=q.shape[2],
        CAUSAL=mask.is_causal, WINDOW=mask.window or 0, HAS_DOCS=mask.has_docs, PREFIX=mask.prefix is not None,
        SINK=mask.sink is not None, HEADS=s2 is not None, PER_HEAD=int(s2 is not None),
        S2_BLOCK=s2.block if s2 else 1, S2_LOCAL=s2.local_blocks if s2 else 0,
        S2_STRIDE=s2.vert_stride if s2 else 1, S2_DENSE=s2.dense_heads if s2 else 0,
        PREC="ieee" if q.dtype == torch.float32 else None,  # no TF32 rounding for float32
        BLOCK_M=block, BLOCK_N=block, BLOCK_D=max(16, 1 << (q.shape[2] - 1).bit_length()),
    )


def _rows_args(args: dict, lists: str) -> dict:
    """The kernel arguments with one pair of block lists (row or col) kept."""
    drop = {"row": ("col_ptr", "col_idx"), "col": ("row_ptr", "row_idx")}[lists]
    return {key: val for key, val in args.items() if key not in drop}


def forward(q, k, v, mask, q_pos, k_pos, scale, kv_heads=None):
    if q.shape[0] == 0 or k.shape[0] == 0:
        lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=torch.float32, device=q.device)
        return torch.zeros_like(q), lse
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    args = _setup(q, k, mask, q_pos, k_pos, kv_heads)
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[1], q.shape[0], dtype=torch.float32, device=q.device)
    grid = (_nblocks(q), q.shape[1])
    _kernels().fwd_kernel[grid](q, k, v, out, lse, scale=scale, nqb=_nblocks(q),
                                sqt=q.stride(0), sqh=q.stride(1), skt=k.stride(0), skh=k.stride(1),
                                sot=out.stride(0), soh=out.stride(1), **_rows_args(args, "row"))
    return out, lse


def backward(dout, q, k, v, out, lse, mask, q_pos, k_pos, scale, dlse=None, kv_heads=None):
    if q.shape[0] == 0 or k.shape[0] == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    dout = dout.to(q.dtype).contiguous()
    args = _setup(q, k, mask, q_pos, k_pos, kv_heads)
    lse = lse.to(torch.float32)
    lse = lse.masked_fill(torch.isneginf(lse), float("inf")).contiguous()  # rows seeing no key: P = 0
    delta = (dout.float() * out.float()).sum(-1).t()
    if dlse is not None:
        delta = delta - dlse.float()
    delta = delta.contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    kern = _kernels()
    kern.dkdv_kernel[(_nblocks(k), k.shape[1])](
        q, k, v, dout, lse, delta, dk, dv, scale=scale, nkb=_nblocks(k),
        sqt=q.stride(0), sqh=q.stride(1), skt=k.stride(0), skh=k.stride(1),
        sdkt=dk.stride(0), sdkh=dk.stride(1), **_rows_args(args, "col"))
    kern.dq_kernel[(_nblocks(q), q.shape[1])](
        q, k, v, dout, lse, delta, dq, scale=scale, nqb=_nblocks(q),
        sqt=q.stride(0), sqh=q.stride(1), skt=k.stride(0), skh=k.stride(1), **_rows_args(args, "row"))
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
