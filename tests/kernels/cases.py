"""Shared cases for the kernel tests: the mask catalogue, random masks of every kind
(hypothesis), head layouts, random inputs and one helper that runs a backend forward +
autograd backward through out and lse."""
import torch
from hypothesis import strategies as st

import kernels
from kernels import HeadStride, MaskSpec

T = 40
DOC_LENS = (13, 20, 7)
HEADS = {"MHA": (4, 4), "GQA": (4, 2), "MQA": (4, 1)}


def masks() -> dict[str, MaskSpec]:
    cu = MaskSpec.from_doc_lens(DOC_LENS).cu_seqlens
    return {
        "none": MaskSpec(),
        "causal": MaskSpec(causal=True),
        "document": MaskSpec(cu_seqlens=cu),
        "window": MaskSpec(window=6),
        "document+window": MaskSpec(cu_seqlens=cu, window=9),
        "causal+document+window": MaskSpec(causal=True, cu_seqlens=cu, window=9),
    }


N_RANDOM = 30


@st.composite
def random_masks(draw, kinds=True):
    """(mask, (doc_lens, causal, window, prefix, sink, heads, num_kv_heads)) over N_RANDOM
    positions; with kinds=False only contract 1's kinds.  Head layouts always cover."""
    cuts = sorted(draw(st.sets(st.integers(1, N_RANDOM - 1), max_size=3)))
    doc_lens = [b - a for a, b in zip([0] + cuts, cuts + [N_RANDOM])]
    causal = draw(st.booleans())
    window = draw(st.one_of(st.none(), st.integers(1, 12)))
    prefix = sink = heads = None
    hkv = draw(st.integers(1, 4))
    if kinds:
        prefix = draw(st.one_of(st.none(), st.integers(0, min(doc_lens)),
                                st.tuples(*[st.integers(0, n) for n in doc_lens]).map(list)))
        if causal or window:
            sink = draw(st.one_of(st.none(), st.integers(1, 5)))
        if draw(st.booleans()):
            stride = draw(st.integers(1, 4))
            dense = draw(st.integers(0, 2))
            heads = HeadStride(draw(st.integers(1, 5)), draw(st.integers(0, 3)), stride, dense)
            hkv = draw(st.integers(max(1, dense) if dense else stride, 5))
    docs = draw(st.booleans()) or isinstance(prefix, list)
    spec = dict(causal=causal, window=window, prefix=prefix, sink=sink, heads=heads)
    mask = MaskSpec.from_doc_lens(doc_lens, **spec) if docs else MaskSpec(**spec)
    return mask, (doc_lens if docs else [N_RANDOM], causal, window, prefix, sink, heads, hkv)


def qkv(tq, tk, hq, hkv, d=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda t, h: torch.randn(t, h, d, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    return make(tq, hq), make(tk, hkv), make(tk, hkv)


def weights(out, lse, seed=1):
    """Fixed random cotangents for out and lse (zero where lse = -inf)."""
    g = torch.Generator().manual_seed(seed)
    w_out = torch.randn(out.shape, generator=g, dtype=torch.float64)
    w_lse = torch.randn(lse.shape, generator=g, dtype=torch.float64)
    return w_out, w_lse.masked_fill(torch.isneginf(lse.detach()), 0.0)


def loss_of(out, lse, seed=1):
    w_out, w_lse = weights(out, lse, seed)
    finite_lse = lse.masked_fill(torch.isneginf(lse.detach()), 0.0)
    return (out.double() * w_out).sum() + (finite_lse.double() * w_lse).sum()


def run(backend, q, k, v, mask, q_pos=None, k_pos=None):
    """(out, lse, dq, dk, dv) with the loss `loss_of` through out and lse."""
    out, lse = kernels.attention(q, k, v, mask, q_pos=q_pos, k_pos=k_pos, backend=backend)
    dq, dk, dv = torch.autograd.grad(loss_of(out, lse), (q, k, v))
    return out.detach(), lse.detach(), dq, dk, dv


def assert_slice_matches_full_rows(backend, mask, qi, order, tol, dtype=torch.float32, what=""):
    """Queries at positions qi against every key in the order `order` give exactly those rows
    of the full-sequence result, gradients included (loss weights only on those rows)."""
    q, k, v = qkv(T, T, 4, 2, dtype=dtype)
    sub_q = q.detach()[qi].requires_grad_()
    k_all, v_all = (x.detach()[order].requires_grad_() for x in (k, v))
    got = run(backend, sub_q, k_all, v_all, mask, q_pos=qi, k_pos=order)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    out, lse = kernels.attention(q64, k64, v64, mask, backend="reference")
    g = torch.autograd.grad(loss_of(out[qi], lse[:, qi]), (q64, k64, v64))
    assert_all_close(got, (out[qi], lse[:, qi], g[0][qi], g[1][order], g[2][order]), tol, what)


def truth(q, k, v, mask, q_pos=None, k_pos=None):
    """Reference in float64 on the same values."""
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    return run("reference", q64, k64, v64, mask, q_pos, k_pos)


def assert_close(actual, expected, tol, what=""):
    """max |actual - expected| <= tol * max(1, max |expected|), with -inf matching -inf."""
    a, e = actual.detach().double(), expected.detach().double()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != {tuple(e.shape)}"
    assert torch.equal(torch.isneginf(a), torch.isneginf(e)), f"{what}: -inf rows differ"
    assert not torch.isnan(a).any(), f"{what}: NaN"
    fin = torch.isfinite(e)
    err = (a[fin] - e[fin]).abs().max().item() if fin.any() else 0.0
    scale = max(1.0, e[fin].abs().max().item() if fin.any() else 0.0)
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:g} * {scale:.3g}"


def assert_all_close(actual, expected, tol, what=""):
    for name, a, e in zip(("out", "lse", "dq", "dk", "dv"), actual, expected):
        assert_close(a, e, tol, f"{what} {name}")
