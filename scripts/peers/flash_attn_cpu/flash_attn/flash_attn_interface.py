"""flash-attn's functional API (2.6.3+ signatures) over torch's CPU flash-attention op.

Conventions kept from flash-attn: q [B, Sq, Hq, D] (varlen: [total_q, Hq, D] with
cu_seqlens), k/v with Hkv heads (GQA), out like q, softmax lse float32 [B, Hq, Sq] (varlen:
[Hq, total_q]).  A causal mask is aligned bottom-right (query i of Lq sees keys
j <= i + Lk - Lq) and `window_size=(left, right)` limits keys to
[i' - left, i' + right] around the aligned position i' (-1 = unlimited).

How the work is cut, so that no block a flash kernel would skip is computed: a sequence
is split into parts, each one call of the CPU op, merged by lse in float32:
  - no window: the fully visible keys [0, Lk - Lq) (one non-causal call) and the causal
    square (one causal call, which skips the blocks above the diagonal itself);
  - a window: query blocks of BLOCK rows, each over the band of keys it can see, with an
    additive mask inside the band.
The backward runs each part with the merged out / lse, which gives exact gradients of
the whole (the softmax of every part is normalised by the final lse).
Dropout, softcap and alibi are refused (NotImplementedError), never ignored.
"""
from __future__ import annotations

import torch

_fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
BLOCK = 512


def _refuse(dropout_p, softcap, alibi_slopes):
    if dropout_p:
        raise NotImplementedError("flash_attn CPU stand-in: dropout_p must be 0")
    if softcap:
        raise NotImplementedError("flash_attn CPU stand-in: softcap is not supported")
    if alibi_slopes is not None:
        raise NotImplementedError("flash_attn CPU stand-in: alibi is not supported")


def _parts(lq: int, lk: int, causal: bool, left: int, right: int):
    """[(query slice, key slice, is_causal, additive mask or None)] covering one sequence."""
    off = lk - lq
    right = 0 if causal else right
    if left < 0 and right < 0 or left < 0 and causal:
        if not causal:
            return [(slice(0, lq), slice(0, lk), False, None)]
        if off < 0:
            raise NotImplementedError("flash_attn CPU stand-in: causal needs seqlen_k >= seqlen_q")
        parts = [(slice(0, lq), slice(off, lk), True, None)]
        return ([(slice(0, lq), slice(0, off), False, None)] if off else []) + parts
    parts = []
    for a in range(0, lq, BLOCK):
        b = min(a + BLOCK, lq)
        lo = 0 if left < 0 else max(0, a + off - left)
        hi = lk if right < 0 else min(lk, b - 1 + off + right + 1)
        if hi <= lo:
            continue
        i = torch.arange(a, b).unsqueeze(1) + off
        j = torch.arange(lo, hi).unsqueeze(0)
        ok = torch.ones(b - a, hi - lo, dtype=torch.bool)
        if left >= 0:
            ok &= j >= i - left
        if right >= 0:
            ok &= j <= i + right
        parts.append((slice(a, b), slice(lo, hi), False, ok))
    return parts


def _lse_dtype(lse, q):
    """The CPU op keeps lse in float64 for float64 inputs, float32 otherwise."""
    return lse.to(torch.float64 if q.dtype == torch.float64 else torch.float32)


def _bhsd(x):
    return x.transpose(0, 1).unsqueeze(0)  # [S, H, D] -> [1, H, S, D]


def _mask(ok, dtype):
    return None if ok is None else torch.zeros(ok.shape, dtype=dtype).masked_fill_(~ok, float("-inf"))


def _seq_forward(q, k, v, scale, causal, left, right):
    """One sequence: q [Lq, Hq, D], k/v [Lk, Hkv, D] -> out [Lq, Hq, D], lse [Hq, Lq] fp32."""
    lq, h = q.shape[0], q.shape[1]
    acc = torch.promote_types(q.dtype, torch.float32)
    out = torch.zeros(h, lq, q.shape[2], dtype=acc)
    lse = torch.full((h, lq), float("-inf"), dtype=acc)
    for qs, ks, c, ok in _parts(lq, k.shape[0], causal, left, right):
        o, l = _fwd(_bhsd(q[qs]), _bhsd(k[ks]), _bhsd(v[ks]), 0.0, c, attn_mask=_mask(ok, q.dtype), scale=scale)
        o, l = o[0].to(acc), l[0].to(acc)
        m = torch.maximum(lse[:, qs], l)
        m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
        a, b = torch.exp(lse[:, qs] - m), torch.exp(l - m)
        out[:, qs] = (out[:, qs] * a.unsqueeze(-1) + o * b.unsqueeze(-1)) / (a + b).clamp_min(1e-30).unsqueeze(-1)
        lse[:, qs] = m + torch.log(a + b)
    return out.transpose(0, 1).to(q.dtype), lse.float()


def _seq_backward(dout, q, k, v, out, lse, scale, causal, left, right):
    """Gradients of one sequence, part by part with the merged out / lse."""
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for qs, ks, c, ok in _parts(q.shape[0], k.shape[0], causal, left, right):
        gq, gk, gv = _bwd(_bhsd(dout[qs]), _bhsd(q[qs]), _bhsd(k[ks]), _bhsd(v[ks]), _bhsd(out[qs]),
                          _lse_dtype(lse[:, qs], q).unsqueeze(0).contiguous(), 0.0, c, attn_mask=_mask(ok, q.dtype), scale=scale)
        dq[qs] += gq[0].transpose(0, 1)
        dk[ks] += gk[0].transpose(0, 1)
        dv[ks] += gv[0].transpose(0, 1)
    return dq, dk, dv


def _into(buf, x):
    if buf is None:
        return x
    buf.copy_(x)
    return buf


def _flash_attn_forward(q, k, v, dropout_p, softmax_scale, causal, window_size_left=-1, window_size_right=-1,
                        softcap=0.0, alibi_slopes=None, return_softmax=False):
    """Batched: q [B, Sq, Hq, D] -> (out, lse [B, Hq, Sq], None, None)."""
    _refuse(dropout_p, softcap, alibi_slopes)
    res = [_seq_forward(q[b], k[b], v[b], softmax_scale, causal, window_size_left, window_size_right)
           for b in range(q.shape[0])]
    return torch.stack([o for o, _ in res]), torch.stack([l for _, l in res]), None, None


def _flash_attn_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, dropout_p, softmax_scale, causal,
                         window_size_left=-1, window_size_right=-1, softcap=0.0, alibi_slopes=None,
                         deterministic=False, rng_state=None):
    _refuse(dropout_p, softcap, alibi_slopes)
    grads = [_seq_backward(dout[b], q[b], k[b], v[b], out[b], softmax_lse[b], softmax_scale, causal,
                           window_size_left, window_size_right) for b in range(q.shape[0])]
    for buf, i in ((dq, 0), (dk, 1), (dv, 2)):
        _into(buf, torch.stack([g[i] for g in grads]))
    return None


def _varlen_each(cu_q, cu_k):
    cq, ck = cu_q.tolist(), cu_k.tolist()
    return [(slice(cq[i], cq[i + 1]), slice(ck[i], ck[i + 1])) for i in range(len(cq) - 1)]


def _flash_attn_varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                               softmax_scale, causal, window_size_left=-1, window_size_right=-1, softcap=0.0,
                               alibi_slopes=None, return_softmax=False, block_table=None, leftpad_k=None,
                               seqused_k=None):
    """Packed: q [total_q, Hq, D] -> (out, lse [Hq, total_q], None, None); one loop per sequence."""
    _refuse(dropout_p, softcap, alibi_slopes)
    out = torch.zeros_like(q)
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"))
    for qs, ks in _varlen_each(cu_seqlens_q, cu_seqlens_k):
        if qs.stop > qs.start and ks.stop > ks.start:
            out[qs], lse[:, qs] = _seq_forward(q[qs], k[ks], v[ks], softmax_scale, causal, window_size_left,
                                               window_size_right)
    return out, lse, None, None


def _flash_attn_varlen_backward(dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k,
                                max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal, window_size_left=-1,
                                window_size_right=-1, softcap=0.0, alibi_slopes=None, deterministic=False,
                                rng_state=None):
    _refuse(dropout_p, softcap, alibi_slopes)
    gq, gk, gv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for qs, ks in _varlen_each(cu_seqlens_q, cu_seqlens_k):
        if qs.stop > qs.start and ks.stop > ks.start:
            a, b, c = _seq_backward(dout[qs], q[qs], k[ks], v[ks], out[qs], softmax_lse[:, qs], softmax_scale,
                                    causal, window_size_left, window_size_right)
            gq[qs] += a
            gk[ks] += b
            gv[ks] += c
    for buf, g in ((dq, gq), (dk, gk), (dv, gv)):
        _into(buf, g)
    return None


class _Attn(torch.autograd.Function):
    """flash_attn_func / flash_attn_varlen_func with autograd (cu=None: batched)."""

    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, scale, causal, window):
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        if cu_q is None:
            out, lse, _, _ = _flash_attn_forward(q, k, v, 0.0, scale, causal, *window)
        else:
            out, lse, _, _ = _flash_attn_varlen_forward(q, k, v, cu_q, cu_k, None, None, 0.0, scale, causal, *window)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (cu_q, cu_k, scale, causal, window)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        cu_q, cu_k, scale, causal, window = ctx.args
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        if cu_q is None:
            _flash_attn_backward(dout, q, k, v, out, lse, dq, dk, dv, 0.0, scale, causal, *window)
        else:
            _flash_attn_varlen_backward(dout, q, k, v, out, lse, dq, dk, dv, cu_q, cu_k, None, None, 0.0, scale,
                                        causal, *window)
        return dq, dk, dv, None, None, None, None, None


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    _refuse(dropout_p, softcap, alibi_slopes)
    return _Attn.apply(q, k, v, None, None, softmax_scale, causal, tuple(window_size))


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    _refuse(dropout_p, softcap, alibi_slopes)
    return _Attn.apply(q, k, v, cu_seqlens_q, cu_seqlens_k, softmax_scale, causal, tuple(window_size))
