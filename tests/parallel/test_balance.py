"""Balancers and pair counting, as pure functions (no process group)."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels import MaskSpec
from parallel import balance


def _doc_lens(draw_lens, seqlen):
    lens, left = [], seqlen
    for n in draw_lens:
        if left <= 0:
            break
        lens.append(min(n, left))
        left -= lens[-1]
    if left:
        lens.append(left)
    return lens


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(balance.BALANCERS), world=st.integers(1, 8), rounds=st.integers(1, 6),
       stripe=st.integers(1, 3), docs=st.lists(st.integers(1, 40), max_size=6))
def test_every_row_owned_once_equal_ascending_and_unshard_inverts_shard(name, world, rounds, stripe, docs):
    seqlen = 2 * world * stripe * rounds
    mask = MaskSpec.from_doc_lens(_doc_lens(docs, seqlen), causal=True) if docs else MaskSpec(causal=True)
    index = balance.assign(name, seqlen, world, mask, stripe=stripe)
    assert len(index) == world
    assert all(ix.numel() == seqlen // world for ix in index)
    assert all(bool((ix[1:] > ix[:-1]).all()) for ix in index)
    order = torch.cat(index)
    assert torch.equal(torch.sort(order).values, torch.arange(seqlen))
    x = torch.randn(seqlen, 3)
    shards = [x[ix] for ix in index]
    assert torch.equal(torch.cat(shards)[torch.argsort(order)], x)


@pytest.mark.parametrize("name, seqlen, world, need", [
    ("contiguous", 10, 4, "divisible by 4"), ("headtail", 12, 4, "divisible by 8"),
    ("per_doc", 12, 4, "divisible by 8"), ("stripe", 10, 4, "divisible by 4"),
])
def test_indivisible_seqlen_names_the_balancer(name, seqlen, world, need):
    with pytest.raises(ValueError, match=f"balancer='{name}'.*{need}"):
        balance.assign(name, seqlen, world, MaskSpec(causal=True))


def test_unknown_balancer_and_bad_stripe():
    with pytest.raises(ValueError, match="balancer='zig'"):
        balance.assign("zig", 16, 2, MaskSpec())
    with pytest.raises(ValueError, match="stripe=0"):
        balance.assign("stripe", 16, 2, MaskSpec(), stripe=0)


def test_headtail_is_zigzag_and_stripe_round_robin():
    assert [ix.tolist() for ix in balance.headtail(8, 2)] == [[0, 1, 6, 7], [2, 3, 4, 5]]
    assert [ix.tolist() for ix in balance.stripe(8, 2)] == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert [ix.tolist() for ix in balance.stripe(8, 2, stripe=2)] == [[0, 1, 4, 5], [2, 3, 6, 7]]


def test_per_doc_mirrors_inside_documents_and_pools_short_ones():
    # P=2: documents of 9 and 3 tokens.  Doc 0 gives pieces of 2: rank 0 rows 0-1 and 7-8,
    # rank 1 rows 2-3 and 5-6; its middle row 4 and the whole short doc (9-11) are pooled
    # and dealt head-tail: rank 0 gets pool rows {4, 11}, rank 1 gets {9, 10}.
    index = balance.per_doc(12, 2, [9, 3])
    assert [ix.tolist() for ix in index] == [[0, 1, 4, 7, 8, 11], [2, 3, 5, 6, 9, 10]]


@pytest.mark.parametrize("world", [2, 4, 8])
def test_headtail_balances_causal_pairs(world):
    seqlen = 2048
    mask = MaskSpec(causal=True)
    pairs = [balance.pair_counts(mask, ix, torch.arange(seqlen)) for ix in balance.headtail(seqlen, world)]
    assert max(pairs) / (sum(pairs) / world) <= 1.01
    contiguous = [balance.pair_counts(mask, ix, torch.arange(seqlen)) for ix in balance.contiguous(seqlen, world)]
    assert max(contiguous) / (sum(contiguous) / world) > 1.4


@settings(max_examples=60, deadline=None)
@given(seqlen=st.integers(1, 48), causal=st.booleans(), window=st.one_of(st.none(), st.integers(1, 20)),
       docs=st.lists(st.integers(1, 20), max_size=5), seed=st.integers(0, 2**16))
def test_pair_counts_match_the_dense_mask(seqlen, causal, window, docs, seed):
    lens = _doc_lens(docs, seqlen) if docs else None
    mask = MaskSpec.from_doc_lens(lens, causal=causal, window=window) if lens else MaskSpec(causal=causal, window=window)
    g = torch.Generator().manual_seed(seed)
    q_pos = torch.randperm(seqlen, generator=g)[: max(1, seqlen // 2)]
    k_pos = torch.randperm(seqlen, generator=g)[: max(1, seqlen // 3)]
    assert balance.pair_counts(mask, q_pos, k_pos) == mask.pairs(q_pos, k_pos)


def test_default_balancer_follows_the_mask():
    assert balance.default_balancer(MaskSpec(causal=True)) == "headtail"
    assert balance.default_balancer(MaskSpec(causal=True, window=4)) == "headtail"
    assert balance.default_balancer(MaskSpec.from_doc_lens([3, 5], causal=False)) == "contiguous"
    assert balance.default_balancer(MaskSpec.from_doc_lens([3, 5], causal=True)) == "per_doc"


@settings(max_examples=30, deadline=None)
@given(name=st.sampled_from(balance.BALANCERS), world=st.integers(1, 5), rounds=st.integers(1, 4),
       window=st.one_of(st.none(), st.integers(1, 12)), docs=st.lists(st.integers(1, 20), max_size=4),
       causal=st.booleans())
def test_pair_matrix_matches_pairwise_counts(name, world, rounds, window, docs, causal):
    seqlen = 2 * world * rounds
    lens = _doc_lens(docs, seqlen) if docs else None
    mask = MaskSpec.from_doc_lens(lens, causal=causal, window=window) if lens else MaskSpec(causal=causal, window=window)
    index = balance.assign(name, seqlen, world, mask)
    assert balance.pair_matrix(mask, index) == [[mask.pairs(q, k) for k in index] for q in index]
