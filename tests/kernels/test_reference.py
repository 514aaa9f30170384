"""The reference backend is the ground truth: its autograd passes gradcheck in float64
for every mask kind and head layout, and its block backward (final out/lse, dlse)
agrees with its autograd."""
import pytest
import torch

import kernels
from tests.kernels.cases import HEADS, assert_close, masks, qkv, run, weights


@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("mask_name", list(masks()))
def test_reference_gradcheck_float64(heads, mask_name):
    mask = masks()[mask_name]
    pos = torch.arange(9, 17)  # across the first document boundary (13) of the catalogue
    q, k, v = qkv(8, 8, *HEADS[heads], d=4, dtype=torch.float64)
    fn = lambda q, k, v: kernels.attention(q, k, v, mask, q_pos=pos, k_pos=pos, backend="reference")
    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("mask_name", ["causal", "document+window"])
def test_reference_block_backward_matches_autograd(mask_name):
    mask = masks()[mask_name]
    q, k, v = qkv(20, 20, 4, 2, dtype=torch.float64)
    out, lse, dq, dk, dv = run("reference", q, k, v, mask)
    w_out, w_lse = weights(out, lse)
    got = kernels.backward(w_out, q.detach(), k.detach(), v.detach(), out, lse, mask, dlse=w_lse, backend="reference")
    for name, a, e in zip(("dq", "dk", "dv"), got, (dq, dk, dv)):
        assert_close(a, e, 1e-12, name)
