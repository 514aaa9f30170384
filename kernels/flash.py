"""flash-attn backend (CUDA, float16/bfloat16): a thin layer over the varlen kernels.

Documents become varlen sequences (cu_seqlens); causality and the sliding window become
flash-attn's `window_size` (left, right) in its bottom-right alignment, computed per
document from the global positions of its first/last query and key.  Documents whose
windows differ (e.g. a ring block that sees all of one document and the diagonal of
another) go to separate calls.  Each document's rows must be consecutive positions (one
run); otherwise the mask cannot be expressed and a ValueError says so.
Rows that see no key come back as out = 0, lse = -inf (flash-attn reports +inf).
A prefix (bidirectional block inside a causal document), sink tokens and S2 per-head
sparsity have no flash-attn equivalent: such masks raise a ValueError here, and
`backend="auto"` picks triton for them.
"""
from __future__ import annotations

import inspect
from collections import defaultdict

import torch

from .blocks import RowInfo
from .mask import MaskSpec


def _interface():
    from flash_attn import flash_attn_interface
    return flash_attn_interface


def _groups(mask: MaskSpec, q_pos, k_pos):
    """{(left, right): [(q_rows, k_rows), ...]} with row ranges per visible document."""
    kinds = [name for name in ("prefix", "sink", "heads") if getattr(mask, name) is not None]
    if kinds:
        raise ValueError(f"the flash backend cannot express a mask with {', '.join(kinds)} (flash-attn has no "
                         "bidirectional prefix, sink tokens or per-head block sparsity); use backend='triton'")
    qi, ki = RowInfo.of(mask, q_pos), RowInfo.of(mask, k_pos)
    q_runs, k_runs = _doc_runs(qi, "q_pos"), _doc_runs(ki, "k_pos")
    groups = defaultdict(list)
    for doc, (qa, qb) in q_runs.items():
        if doc not in k_runs:
            continue
        ka, kb = k_runs[doc]
        q0, k0 = int(qi.pos[qa]), int(ki.pos[ka])
        left = right = -1
        if mask.is_causal:
            kb = ka + max(0, min(kb - ka, int(qi.pos[qb - 1]) - k0 + 1))  # keys after the last query
            if mask.window is not None:
                last_key = k0 + (kb - ka) - 1
                qb = qa + max(0, min(qb - qa, last_key + mask.window - q0))  # queries past the window
            if kb == ka or qb == qa:
                continue
            right = (q0 + qb - qa - 1) - (k0 + kb - ka - 1)
            left = -1 if mask.window is None else mask.window - 1 - right
        groups[(left, right)].append(((qa, qb), (ka, kb)))
    return groups


def _doc_runs(info: RowInfo, name: str) -> dict[int, tuple[int, int]]:
    runs = info.runs()
    docs = [int(info.doc[a]) for a, _ in runs]
    if len(set(docs)) != len(docs):
        raise ValueError(f"{name}: the flash backend needs each document's rows to be consecutive "
                         "positions in order (one run per document); use backend='triton' or 'cpu'")
    return dict(zip(docs, runs))


def _check_dtype(q):
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"the flash backend takes float16/bfloat16, got dtype {q.dtype}; use backend='triton'")


def _rows(ranges, device):
    idx = torch.cat([torch.arange(a, b) for a, b in ranges]).to(device)
    lens = torch.tensor([0] + [b - a for a, b in ranges])
    cu = torch.cumsum(lens, 0).to(device=device, dtype=torch.int32)
    return idx, cu, int(lens.max())


def _window_kwargs(fn, left, right):
    params = inspect.signature(fn).parameters
    if "window_size_left" in params:
        return {"window_size_left": left, "window_size_right": right}
    return {"window_size": (left, right)}


def _pad8(x, extra=0):
    d = x.shape[-1]
    return torch.nn.functional.pad(x, (0, (-(d + extra)) % 8 + extra))


def forward(q, k, v, mask, q_pos, k_pos, scale, kv_heads=None):
    _check_dtype(q)
    fa = _interface()
    d = q.shape[-1]
    out = torch.zeros_like(q)
    lse = torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=torch.float32, device=q.device)
    for (left, right), pairs in _groups(mask, q_pos, k_pos).items():
        qi, cu_q, max_q = _rows([p[0] for p in pairs], q.device)
        ki, cu_k, max_k = _rows([p[1] for p in pairs], q.device)
        res = fa._flash_attn_varlen_forward(
            q=_pad8(q[qi]), k=_pad8(k[ki]), v=_pad8(v[ki]), cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
            max_seqlen_q=max_q, max_seqlen_k=max_k, dropout_p=0.0, softmax_scale=scale, causal=False,
            softcap=0.0, alibi_slopes=None, return_softmax=False,
            **_window_kwargs(fa._flash_attn_varlen_forward, left, right))
        o, l = (res[0], res[1]) if len(res) == 4 else (res[0], res[5])  # flash-attn >= 2.6 / older
        out[qi] = o[..., :d]
        lse[:, qi] = l.masked_fill(torch.isposinf(l), float("-inf"))
    return out, lse


def backward(dout, q, k, v, out, lse, mask, q_pos, k_pos, scale, dlse=None, kv_heads=None):
    """The extra head_dim column carries dlse: 1 in dout and -dlse in out, so the kernel's
    rowsum(dO * O) becomes rowsum(dO * O) - dlse."""
    _check_dtype(q)
    fa = _interface()
    d = q.shape[-1]
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    lse = lse.float().masked_fill(torch.isneginf(lse), float("inf"))
    extra = 0 if dlse is None else 1
    q, k, v = (_pad8(x, extra) for x in (q, k, v))
    out, dout = _pad8(out.to(q.dtype), extra), _pad8(dout.to(q.dtype), extra)
    if dlse is not None:
        out[..., d] = -dlse.t().to(q.dtype)
        dout[..., d] = 1
    for (left, right), pairs in _groups(mask, q_pos, k_pos).items():
        qi, cu_q, max_q = _rows([p[0] for p in pairs], q.device)
        ki, cu_k, max_k = _rows([p[1] for p in pairs], q.device)
        gq, gk, gv = torch.empty_like(q[qi]), torch.empty_like(k[ki]), torch.empty_like(v[ki])
        fa._flash_attn_varlen_backward(
            dout=dout[qi], q=q[qi], k=k[ki], v=v[ki], out=out[qi], softmax_lse=lse[:, qi].contiguous(),
            dq=gq, dk=gk, dv=gv, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=max_q,
            max_seqlen_k=max_k, dropout_p=0.0, softmax_scale=scale, causal=False, softcap=0.0,
            alibi_slopes=None, deterministic=True,
            **_window_kwargs(fa._flash_attn_varlen_backward, left, right))
        dq[qi] += gq[..., :d]
        dk.index_add_(0, ki, gk[..., :d])
        dv.index_add_(0, ki, gv[..., :d])
    return dq, dk, dv


def supports(mask: MaskSpec | None, q_pos, k_pos) -> bool:
    """True when these rows fit the varlen layout (one run of positions per document)."""
    if mask is None or q_pos is None or k_pos is None:
        return False
    try:
        _groups(mask, q_pos, k_pos)
    except ValueError:
        return False
    return True


def available(device) -> tuple[bool, str]:
    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return False, "the flash backend needs a CUDA device"
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False, "flash-attn is not installed"
    return True, ""
