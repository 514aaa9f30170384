"""Plain-torch attention: any mask, any dtype (float64 included); the ground truth.

Scores are formed in float32 (float64 for float64 inputs) as [Hkv, G, Tq, Tk], so
grouped-query heads share their K/V head without repeating it in memory.
"""
from __future__ import annotations

import torch

from .mask import MaskSpec


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _probs(q, k, mask: MaskSpec, q_pos, k_pos, scale, kv_heads=None):
    """Masked scores S, lse and P = exp(S - lse), shapes [Hkv, G, Tq, Tk] / [Hkv, G, Tq]."""
    tq, hq, d = q.shape
    tk, hkv, _ = k.shape
    acc = _acc_dtype(q.dtype)
    qg = q.to(acc).view(tq, hkv, hq // hkv, d)
    s = torch.einsum("qhgd,khd->hgqk", qg, k.to(acc)) * scale
    allowed = mask.allowed(q_pos, k_pos, kv_heads=kv_heads).to(q.device)
    if mask.heads is not None:
        allowed = allowed.unsqueeze(1)  # [Hkv, 1, Tq, Tk]: one row per KV head, shared by its group
    s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    finite = torch.isfinite(lse)
    p = torch.exp(s - torch.where(finite, lse, torch.zeros_like(lse)).unsqueeze(-1))
    return s, lse, p


def attention(q, k, v, mask, q_pos, k_pos, scale, kv_heads=None):
    """Differentiable (plain autograd) forward: (out [Tq, Hq, D], lse [Hq, Tq] float32)."""
    tq, hq, _ = q.shape
    _, lse, p = _probs(q, k, mask, q_pos, k_pos, scale, kv_heads)
    out = torch.einsum("hgqk,khd->qhgd", p, v.to(p.dtype)).reshape(tq, hq, v.shape[-1])
    lse_out = lse.reshape(hq, tq)
    return out.to(q.dtype), lse_out.to(torch.float32 if q.dtype != torch.float64 else torch.float64)


def forward(q, k, v, mask, q_pos, k_pos, scale, kv_heads=None):
    with torch.no_grad():
        return attention(q, k, v, mask, q_pos, k_pos, scale, kv_heads)


def backward(dout, q, k, v, out, lse, mask, q_pos, k_pos, scale, dlse=None, kv_heads=None):
    """Gradients given the *final* out/lse of these query rows (they may have been merged
    over other key blocks): dS = P * (dP - rowsum(dO * O) + dlse)."""
    tq, hq, d = q.shape
    tk, hkv, _ = k.shape
    g = hq // hkv
    acc = _acc_dtype(q.dtype)
    with torch.no_grad():
        s, _, _ = _probs(q, k, mask, q_pos, k_pos, scale, kv_heads)
        lse_g = lse.to(acc).reshape(hkv, g, tq)
        finite = torch.isfinite(lse_g)
        p = torch.exp(s - torch.where(finite, lse_g, torch.zeros_like(lse_g)).unsqueeze(-1))
        p = torch.where(finite.unsqueeze(-1), p, torch.zeros_like(p))
        do = dout.to(acc).view(tq, hkv, g, -1)
        o = out.to(acc).view(tq, hkv, g, -1)
        delta = (do * o).sum(-1).permute(1, 2, 0)  # [hkv, g, tq]
        if dlse is not None:
            delta = delta - dlse.to(acc).reshape(hkv, g, tq)
        dv = torch.einsum("hgqk,qhgd->khd", p, do)
        dp = torch.einsum("qhgd,khd->hgqk", do, v.to(acc))
        ds = p * (dp - delta.unsqueeze(-1))
        dq = torch.einsum("hgqk,khd->qhgd", ds, k.to(acc)).reshape(tq, hq, d) * scale
        dk = torch.einsum("hgqk,qhgd->khd", ds, q.to(acc).view(tq, hkv, g, d)) * scale
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def available(device) -> tuple[bool, str]:
    return True, ""
