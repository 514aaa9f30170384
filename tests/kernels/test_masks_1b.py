"""Contract 1b (DESIGN.md): prefix, sink and S2 `heads` masks.  `MaskSpec.allowed` against a
brute-force evaluation of the contract's formula, pair by pair, on random documents and
settings; without the new kinds it is exactly contract 1; the union over covering heads is
the mask without heads; bad settings raise ValueError naming the setting."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

import kernels
from kernels import HeadStride, MaskSpec
from tests.kernels.cases import N_RANDOM as N, random_masks as masks


def formula(doc_lens, causal, window, prefix, sink, heads, num_kv_heads):
    """Contract 1b's definition, one pair at a time in plain Python: [Hkv][i][j] (or [i][j])."""
    doc, start = [], []
    for d, n in enumerate(doc_lens):
        doc += [d] * n
        start += [sum(doc_lens[:d])] * n
    prefixes = [prefix] * len(doc_lens) if isinstance(prefix, int) else prefix

    def allowed(h, i, j):
        r_i, r_j = i - start[i], j - start[j]
        same = doc[i] == doc[j]
        local = (j <= i if causal or window else True) and (i - j < window if window else True)
        pre = prefix is not None and r_i < prefixes[doc[i]] and r_j < prefixes[doc[i]]
        snk = sink is not None and r_j < sink and j <= i
        sparse = (heads is None or h < heads.dense_heads or r_i // heads.block - r_j // heads.block < heads.local_blocks
                  or (r_j // heads.block + h) % heads.vert_stride == 0)
        return same and (pre or snk or (local and sparse))

    n = len(doc)
    table = [[[allowed(h, i, j) for j in range(n)] for i in range(n)] for h in range(num_kv_heads)]
    return torch.tensor(table if heads is not None else table[0])


def _rows(draw_perm, n):
    return torch.randperm(N, generator=torch.Generator().manual_seed(draw_perm))[:n]


@settings(max_examples=120, deadline=None)
@given(masks(), st.integers(0, 10**6), st.integers(1, N), st.integers(1, N))
def test_allowed_is_the_contract_formula(case, seed, tq, tk):
    mask, args = case
    want = formula(*args)
    q_pos, k_pos = _rows(seed, tq), _rows(seed + 1, tk)
    got = mask.allowed(q_pos, k_pos, args[-1])
    expected = want[..., q_pos, :][..., k_pos]
    assert torch.equal(got, expected)


@settings(max_examples=60, deadline=None)
@given(masks(kinds=False))
def test_without_new_kinds_it_is_contract_1(case):
    mask, (doc_lens, causal, window, *_rest) = case
    pos = torch.arange(N)
    doc = torch.repeat_interleave(torch.arange(len(doc_lens)), torch.tensor(doc_lens))
    i, j = pos.view(-1, 1), pos.view(1, -1)
    want = (doc.view(-1, 1) == doc.view(1, -1))
    if causal or window:
        want &= j <= i
    if window:
        want &= (i - j) < window
    assert torch.equal(mask.allowed(pos, pos), want)


@settings(max_examples=60, deadline=None)
@given(masks())
def test_union_over_covering_heads_is_the_mask_without_heads(case):
    mask, args = case
    pos = torch.arange(N)
    hkv = args[-1]
    if mask.heads is None:
        return
    per_head = mask.allowed(pos, pos, hkv)
    assert per_head.shape == (hkv, N, N)
    assert torch.equal(per_head.any(0), mask.without_heads().allowed(pos, pos))


def test_s2_layout_example():
    """block 2, band of 1 block, stride 2: head 0 sees even blocks, head 1 odd ones."""
    mask = MaskSpec(causal=True, heads=HeadStride(block=2, local_blocks=1, vert_stride=2))
    got = mask.allowed(torch.tensor([7]), torch.arange(8), num_kv_heads=2)
    assert got[0, 0].tolist() == [True, True, False, False, True, True, True, True]
    assert got[1, 0].tolist() == [False, False, True, True, False, False, True, True]


def test_prefix_is_bidirectional_inside_each_document_only():
    mask = MaskSpec.from_doc_lens([4, 4], prefix=[2, 3])
    got = mask.allowed(torch.arange(8), torch.arange(8)).int()
    assert got[0].tolist() == [1, 1, 0, 0, 0, 0, 0, 0]
    assert got[4].tolist() == [0, 0, 0, 0, 1, 1, 1, 0]
    assert got[7].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]


def test_sink_keys_pass_the_window():
    mask = MaskSpec.from_doc_lens([6, 6], window=2, sink=1)
    assert mask.allowed(torch.tensor([5, 11]), torch.arange(12)).int().tolist() == [
        [1, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1, 1]]


BAD = {
    "uncovered residues": (lambda: MaskSpec(causal=True, heads=HeadStride(4, 2, 4)).allowed(
        torch.arange(4), torch.arange(4), num_kv_heads=2), r"b % 4 in \[1, 2\]"),
    "heads need num_kv_heads": (lambda: MaskSpec(causal=True, heads=HeadStride(4, 2, 2)).allowed(
        torch.arange(4), torch.arange(4)), "num_kv_heads="),
    "kernel call with too few heads": (lambda: kernels.attention(
        *(torch.randn(8, h, 4) for h in (3, 3, 3)), MaskSpec(causal=True, heads=HeadStride(2, 1, 4, dense_heads=0))),
        r"num_kv_heads=3 does not cover the context: no head sees key blocks b with b % 4 in \[1\]"),
    "kv_heads length": (lambda: kernels.attention(
        *(torch.randn(8, h, 4) for h in (2, 2, 2)), MaskSpec(causal=True, heads=HeadStride(2, 1, 1)), kv_heads=[0]),
        "kv_heads lists 1 heads but k and v hold Hkv=2"),
    "prefix longer than its document": (lambda: MaskSpec.from_doc_lens([5, 3], prefix=4),
                                        r"prefix=4 is longer than document 1 \(3 tokens\)"),
    "prefix list length": (lambda: MaskSpec.from_doc_lens([5, 3], prefix=[1, 2, 3]), "3 entries .* 2 documents"),
    "prefix list without documents": (lambda: MaskSpec(causal=True, prefix=[2]), "no documents"),
    "negative prefix": (lambda: MaskSpec(causal=True, prefix=-1), "prefix=-1"),
    "sink with a non-causal mask": (lambda: MaskSpec(causal=False, sink=4), "sink=4 needs a causal mask"),
    "zero sink": (lambda: MaskSpec(causal=True, sink=0), "sink=0"),
    "zero block": (lambda: HeadStride(0, 2, 2), "HeadStride block=0"),
    "zero stride": (lambda: HeadStride(4, 2, 0), "HeadStride vert_stride=0"),
    "negative band": (lambda: HeadStride(4, -1, 2), "HeadStride local_blocks=-1"),
    "float block": (lambda: HeadStride(2.5, 1, 2), "HeadStride block=2.5"),
    "heads not a HeadStride": (lambda: MaskSpec(causal=True, heads=(4, 2, 2)), "kernels.HeadStride"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_settings_raise_value_error_naming_them(name):
    call, match = BAD[name]
    with pytest.raises(ValueError, match=match):
        call()


def test_dense_heads_cover_whatever_the_stride():
    mask = MaskSpec(causal=True, heads=HeadStride(4, 1, 8, dense_heads=1))
    assert mask.allowed(torch.arange(40), torch.arange(40), num_kv_heads=2).any(0).sum() == 40 * 41 // 2
