"""Shared case matrix for the multi-rank strategy tests: masks, head layouts, reference."""
from __future__ import annotations

import torch

import kernels
from kernels import MaskSpec

DOC_LENS = [5, 27, 13, 19]  # sums to 64; a short document and uneven ones


def masks(seqlen: int) -> dict[str, MaskSpec]:
    scale = seqlen // 64
    docs = [n * scale for n in DOC_LENS]
    return {
        "causal": MaskSpec(causal=True),
        "document": MaskSpec.from_doc_lens(docs, causal=True),
        "window": MaskSpec(causal=True, window=seqlen // 5),
        "document+window": MaskSpec.from_doc_lens(docs, causal=True, window=seqlen // 6),
        "full-documents": MaskSpec.from_doc_lens(docs, causal=False),
    }


HEADS = {"MHA": (4, 4), "GQA": (4, 2)}


def inputs(seqlen, hq, hkv, d=8, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(seqlen, hq, d, generator=g, dtype=dtype)
    k = torch.randn(seqlen, hkv, d, generator=g, dtype=dtype)
    v = torch.randn(seqlen, hkv, d, generator=g, dtype=dtype)
    dout = torch.randn(seqlen, hq, d, generator=g, dtype=dtype)
    return q, k, v, dout


def reference(q, k, v, dout, mask):
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    out, lse = kernels.attention(q, k, v, mask, backend="reference")
    out.backward(dout)
    return out.detach(), lse.detach(), q.grad, k.grad, v.grad


def run_strategy(cp, q, k, v, dout):
    """Shard, run attention fwd+bwd on this rank, gather out/lse/dq/dk/dv in global order."""
    ql, kl, vl = (cp.shard(t).clone().requires_grad_() for t in (q, k, v))
    out, lse = cp.attention_with_lse(ql, kl, vl)
    out.backward(cp.shard(dout))
    gathered = [cp.unshard(t) for t in (out.detach(), ql.grad, kl.grad, vl.grad)]
    lse_full = cp.unshard(lse.detach().t().contiguous()).t()
    return gathered[0], lse_full, gathered[1], gathered[2], gathered[3]


def check(name, got, want, atol=1e-9):
    labels = ("out", "lse", "dq", "dk", "dv")
    for label, a, b in zip(labels, got, want):
        finite = torch.isfinite(b)
        assert torch.equal(torch.isfinite(a), finite), f"{name}: {label} finiteness differs"
        err = (a[finite] - b[finite]).abs().max().item() if finite.any() else 0.0
        assert err < atol, f"{name}: {label} max error {err:.3e}"
