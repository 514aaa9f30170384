"""Every backend available on CPU against the reference: each mask kind x MHA/GQA/MQA,
out and lse and dq/dk/dv through autograd (the loss reads lse too, so dlse is exercised);
slices of the sequence given by global positions; merge of disjoint key halves."""
import pytest
import torch

import kernels
from tests.kernels.cases import HEADS, assert_slice_matches_full_rows, T, assert_all_close, assert_close, loss_of, masks, qkv, run, truth, weights

BACKENDS = [b for b in ("cpu", "triton") if b in kernels.available_backends("cpu")]
TOL = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 1e-1}


def test_cpu_and_triton_are_available_on_cpu():
    assert BACKENDS == ["cpu", "triton"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("mask_name", list(masks()))
def test_matches_reference_float32(backend, heads, mask_name):
    mask = masks()[mask_name]
    q, k, v = qkv(T, T, *HEADS[heads])
    assert_all_close(run(backend, q, k, v, mask), truth(q, k, v, mask), TOL[torch.float32], f"{backend} {mask_name} {heads}")


@pytest.mark.parametrize("backend,dtype", [(b, torch.float16) for b in BACKENDS] + [("cpu", torch.bfloat16)])
@pytest.mark.parametrize("heads", HEADS)
def test_matches_reference_half_precision(backend, dtype, heads):
    mask = masks()["causal+document+window"]
    q, k, v = qkv(T, T, *HEADS[heads], dtype=dtype)
    got = run(backend, q, k, v, mask)
    assert got[0].dtype == dtype and got[1].dtype == torch.float32
    assert_all_close(got, truth(q, k, v, mask), TOL[dtype], f"{backend} {dtype} {heads}")


def _layouts():
    """(q rows, key order) of a sequence of T tokens, as global positions; the key order
    is a permutation of all T tokens, so each query row has its whole key set."""
    ar = torch.arange(T)
    zigzag = torch.cat([ar[:10], ar[30:]])
    perm = torch.randperm(T, generator=torch.Generator().manual_seed(3))
    return {
        "ring block": (ar[20:30], torch.cat([ar[20:], ar[:20]])),
        "zigzag halves": (zigzag, torch.cat([zigzag, ar[10:30]])),
        "stripe": (ar[1::3], torch.cat([ar[::2], ar[1::2]])),
        "shuffled": (perm[:17], ar.flip(0)),
    }


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", list(_layouts()))
def test_position_slices_reproduce_full_rows(backend, layout):
    """Attention of q rows `qi` over all keys, given in any order, equals those rows of the
    full-sequence result, gradients included (loss weights only on those rows)."""
    mask = masks()["causal+document+window" if backend == "triton" else "document+window"]
    qi, order = _layouts()[layout]
    assert_slice_matches_full_rows(backend, mask, qi, order, TOL[torch.float32], what=f"{backend} {layout}")


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
@pytest.mark.parametrize("mask_name", ["causal", "causal+document+window"])
def test_merge_of_disjoint_key_halves_equals_whole(backend, mask_name):
    """Keys split into two disjoint sets (some query rows see nothing in one set): merging
    the partials gives the whole; autograd through merge (dlse != 0) gives the whole's
    gradients; and the block primitive `kernels.backward` with the FINAL out/lse, summed
    over the halves, gives them too (the ring/CAD path)."""
    mask = masks()[mask_name]
    q, k, v = qkv(T, T, 4, 1)
    halves = (torch.arange(0, 24), torch.arange(24, T))
    parts = [kernels.attention(q, k[h], v[h], mask, k_pos=h, backend=backend) for h in halves]
    assert torch.isneginf(parts[1][1]).any(), "some rows must see no key in the second half"
    out, lse = kernels.merge(*parts[0], *parts[1])
    dq, dk, dv = torch.autograd.grad(loss_of(out, lse), (q, k, v))
    expected = truth(q, k, v, mask)
    assert_all_close((out, lse, dq, dk, dv), expected, TOL[torch.float32], f"{backend} merge {mask_name}")

    w_out, w_lse = (w.to(torch.float32) for w in weights(out, lse))
    out, lse = out.detach(), lse.detach()
    dq_sum = torch.zeros_like(q)
    for h in halves:
        bq, bk, bv = kernels.backward(w_out, q.detach(), k.detach()[h], v.detach()[h], out, lse, mask,
                                      k_pos=h, dlse=w_lse, backend=backend)
        dq_sum += bq
        assert_close(bk, expected[3][h], TOL[torch.float32], f"{backend} block dk")
        assert_close(bv, expected[4][h], TOL[torch.float32], f"{backend} block dv")
    assert_close(dq_sum, expected[2], TOL[torch.float32], f"{backend} block dq")


def test_triton_really_runs_under_the_interpreter():
    """The conftest's TRITON_INTERPRET=1 took effect: the kernels are interpreted functions."""
    from triton.runtime.interpreter import InterpretedFunction
    q, k, v = qkv(T, T, 2, 1)
    kernels.forward(q, k, v, masks()["causal"], backend="triton")
    from kernels import triton_kernels
    assert isinstance(triton_kernels.fwd_kernel, InterpretedFunction)


@pytest.mark.parametrize("backend", ["reference"] + BACKENDS)
def test_empty_key_block_gives_zero_and_minus_inf(backend):
    q, k, v = qkv(5, 0, 2, 1)
    out, lse = kernels.forward(q, k, v, masks()["causal"], k_pos=torch.arange(0), backend=backend)
    assert torch.equal(out, torch.zeros_like(q)) and torch.isneginf(lse).all()
