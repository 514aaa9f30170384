"""Planner properties (no process group): exact pair counts, every pair computed once,
totals conserved, balance within 1 + epsilon when a balanced plan exists, determinism."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from kernels import HeadStride, MaskSpec
from parallel.balance import imbalance
from parallel.cad import MaskKind, plan
from parallel.cad import intervals as iv
from parallel.cad.tasks import row_counts, row_pairs

KINDS = [MaskKind(causal=False), MaskKind(causal=True), MaskKind(causal=True, window=1), MaskKind(causal=True, window=7)]


def _spec(doc_lens, kind):
    return MaskSpec.from_doc_lens(doc_lens, causal=kind.causal, window=kind.window)


@given(a=st.integers(0, 40), n=st.integers(0, 40), extra=st.integers(0, 40), kind=st.sampled_from(KINDS))
def test_row_pairs_matches_dense_mask(a, n, extra, kind):
    doc_len = a + n + extra
    assume(doc_len > 0)
    spec = _spec([doc_len], kind)
    assert row_pairs(a, a + n, doc_len, kind) == spec.pairs(torch.arange(a, a + n), torch.arange(doc_len))


@st.composite
def batches(draw):
    world = draw(st.integers(1, 6))
    tpr = draw(st.integers(4, 48))
    total = world * tpr
    cuts = sorted(set(draw(st.lists(st.integers(1, total - 1), max_size=12)))) if total > 1 else []
    bounds = [0, *cuts, total]
    return [b - a for a, b in zip(bounds, bounds[1:])], tpr, draw(st.sampled_from(KINDS))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=batches(), epsilon=st.sampled_from([0.02, 0.1, 0.3]))
def test_every_pair_exactly_once_and_totals_conserved(batch, epsilon):
    doc_lens, tpr, kind = batch
    p = plan(doc_lens, tpr, kind, epsilon=epsilon, task_overhead_pairs=0)
    total = sum(doc_lens)
    spec = _spec(doc_lens, kind)
    everything = torch.arange(total)
    # the servers' query rows partition the sequence
    seen = torch.zeros(total, dtype=torch.long)
    for rows in p.q_rows:
        seen[iv.positions(rows)] += 1
    assert bool((seen == 1).all())
    for s in range(p.world):
        q_pos, kv_pos = iv.positions(p.q_rows[s]), iv.positions(p.kv_rows[s])
        # the server holds every key its query rows may see, so each row is complete
        assert spec.pairs(q_pos, kv_pos) == spec.pairs(q_pos, everything) == p.pairs_after[s]
        assert p.pairs_before[s] == spec.pairs(torch.arange(s * tpr, (s + 1) * tpr), everything)
    assert sum(p.pairs_after) == sum(p.pairs_before) == spec.pairs(everything, everything)
    assert sum(t.q_hi - t.q_lo for t in p.tasks) == total
    again = plan(doc_lens, tpr, kind, epsilon=epsilon, task_overhead_pairs=0)
    assert again.fingerprint() == p.fingerprint() and again.bytes_in == p.bytes_in


@st.composite
def fine_grained_batches(draw):
    """(doc_lens, tokens_per_rank, kind, epsilon) where every row is light next to a rank's
    mean load (heaviest row <= epsilon * mean / 4), so a balanced plan exists: drawn that way
    instead of filtered, since random batches rarely are."""
    epsilon = draw(st.sampled_from([0.05, 0.1, 0.3]))
    world = draw(st.integers(1, 6))
    tpr = draw(st.integers(int(12 / epsilon), int(12 / epsilon) + 40))
    pattern = draw(st.lists(st.integers(1, 12), min_size=1, max_size=8))
    doc_lens, left = [], world * tpr
    while left:
        doc_lens.append(min(pattern[len(doc_lens) % len(pattern)], left))
        left -= doc_lens[-1]
    return doc_lens, tpr, draw(st.sampled_from(KINDS)), epsilon


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=fine_grained_batches())
def test_balanced_within_epsilon_when_rows_are_fine_grained(batch):
    doc_lens, tpr, kind, epsilon = batch
    p = plan(doc_lens, tpr, kind, epsilon=epsilon, task_overhead_pairs=0)
    mean = sum(p.pairs_before) / p.world
    heaviest_row = max(row_pairs(n - 1, n, n, kind) if kind.causal else n for n in doc_lens)
    assume(mean > 0 and heaviest_row <= epsilon * mean / 4)  # a balanced plan exists
    assert imbalance(p.cost_after) <= 1 + epsilon + 0.01, (p.pairs_before, p.pairs_after)


def test_long_documents_are_split_and_balanced_at_scale():
    tpr = 6000
    doc_lens = [10] * 130 + [700, 3000, 5, 11, 1000]
    doc_lens.append(8 * tpr - sum(doc_lens))  # one document spans 7 of the 8 ranks
    p = plan(doc_lens, tpr, MaskKind(causal=True), epsilon=0.05)
    assert imbalance(p.pairs_before) > 1.8
    assert imbalance(p.cost_after) <= 1.05


@pytest.mark.parametrize("doc_lens,tpr,epsilon,match", [
    ([], 4, 0.1, "empty"),
    ([4, 0, 4], 4, 0.1, "empty documents"),
    ([4, 5], 4, 0.1, "multiple of tokens_per_rank"),
    ([4, 4], 4, 0.0, "epsilon"),
    ([4, 4], 0, 0.1, "tokens_per_rank"),
])
def test_bad_input_is_a_value_error(doc_lens, tpr, epsilon, match):
    with pytest.raises(ValueError, match=match):
        plan(doc_lens, tpr, MaskKind(), epsilon=epsilon)


@pytest.mark.parametrize("enabled", [True, False])
def test_planning_leaves_the_garbage_collector_as_it_found_it(enabled):
    import gc

    was = gc.isenabled()
    (gc.enable if enabled else gc.disable)()
    try:
        plan([5, 3, 8], 8, MaskKind(causal=True), epsilon=0.05)
        assert gc.isenabled() is enabled
        with pytest.raises(ValueError):
            plan([5, 3, 7], 8, MaskKind(causal=True))  # 15 tokens do not fill ranks of 8
        assert gc.isenabled() is enabled
    finally:
        (gc.enable if was else gc.disable)()


S2 = HeadStride(block=3, local_blocks=1, vert_stride=2)
MASKS_1B = {  # MaskSpec kinds; a prefix is capped at each document's length; S2 over 4 KV heads
    "prefix": dict(causal=True, prefix=5),
    "bidirectional+prefix": dict(causal=False, prefix=3),
    "window+sink": dict(causal=True, window=4, sink=2),
    "prefix+sink": dict(causal=True, prefix=4, sink=1),
    "s2": dict(causal=True, heads=S2),
    "s2+dense head+window+prefix+sink": dict(causal=True, window=9, prefix=2, sink=1,
                                             heads=HeadStride(block=2, local_blocks=1, vert_stride=5, dense_heads=1)),
}
HKV = 4


def _spec_1b(doc_lens, name):
    kinds = dict(MASKS_1B[name])
    if "prefix" in kinds:
        kinds["prefix"] = [min(kinds["prefix"], n) for n in doc_lens]
    return MaskSpec.from_doc_lens(doc_lens, **kinds), HKV if "heads" in kinds else None


@given(n=st.integers(1, 60), causal=st.booleans(), window=st.sampled_from([None, 1, 5, 17]),
       sink=st.sampled_from([None, 1, 3]), prefix=st.integers(0, 60), block=st.integers(1, 5),
       local=st.integers(0, 3), stride=st.integers(1, 4), dense=st.integers(0, 2), with_heads=st.booleans())
def test_row_counts_match_each_heads_dense_mask(n, causal, window, sink, prefix, block, local, stride, dense,
                                                with_heads):
    """Per query row, the tabulated count equals the dense mask's allowed keys summed over KV heads."""
    causal = causal or window is not None or sink is not None
    heads = HeadStride(block, local, stride, dense) if with_heads else None
    hkv = stride + dense if with_heads else None
    spec = MaskSpec.from_doc_lens([n], causal=causal, window=window, sink=sink, prefix=min(prefix, n), heads=heads)
    pos = torch.arange(n)
    allowed = spec.allowed(pos, pos, hkv)
    want = allowed.sum((0, 2)) if with_heads else allowed.sum(1)
    assert torch.equal(row_counts(n, min(prefix, n), MaskKind.of(spec, hkv)), want)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=batches(), name=st.sampled_from(sorted(MASKS_1B)), epsilon=st.sampled_from([0.05, 0.3]))
def test_new_masks_count_each_heads_pairs_and_move_only_needed_keys(batch, name, epsilon):
    """Prefix, sink and S2 plans: query rows partition the sequence; each server's pairs are its
    rows' real per-head pairs (brute force, allowed() with heads, averaged over the KV heads);
    its key rows are exactly the keys some head of some of its queries needs, and bytes_in
    counts the foreign ones."""
    doc_lens, tpr, _ = batch
    spec, hkv = _spec_1b(doc_lens, name)
    q_bytes, kv_bytes = 3, 5
    p = plan(doc_lens, tpr, spec, epsilon=epsilon, task_overhead_pairs=0, num_kv_heads=hkv,
             q_bytes_per_token=q_bytes, kv_bytes_per_token=kv_bytes)
    total = sum(doc_lens)
    everything = torch.arange(total)
    allowed = spec.allowed(everything, everything, hkv)
    per_head = allowed if hkv else allowed[None]
    seen = torch.zeros(total, dtype=torch.long)
    for s in range(p.world):
        q_pos = iv.positions(p.q_rows[s])
        seen[q_pos] += 1
        assert p.pairs_after[s] * per_head.shape[0] == int(per_head[:, q_pos].sum())
        own = torch.arange(s * tpr, (s + 1) * tpr)
        assert p.pairs_before[s] * per_head.shape[0] == int(per_head[:, own].sum())
        needed = per_head[:, q_pos].any(0).any(0).nonzero().flatten()
        assert iv.positions(p.kv_rows[s]).tolist() == needed.tolist()
        foreign_q, foreign_kv = (int((rows // tpr != s).sum()) for rows in (q_pos, needed))
        assert p.bytes_in[s] == foreign_q * q_bytes + foreign_kv * kv_bytes
    assert bool((seen == 1).all())
    assert sum(p.pairs_after) * per_head.shape[0] == int(per_head.sum())


@pytest.mark.parametrize("mask,kwargs,match", [
    (MaskSpec.from_doc_lens([8, 8], causal=True, heads=S2), {}, "num_kv_heads"),
    (MaskSpec.from_doc_lens([8, 8], causal=True, heads=S2), {"num_kv_heads": 1}, "b % 2 in"),
    (MaskSpec.from_doc_lens([5, 6, 5], causal=True, prefix=[3, 4, 1]), {}, "one prefix per document"),
    (MaskSpec(causal=True, prefix=12), {}, "longer than documents"),
])
def test_new_masks_bad_input_is_a_value_error(mask, kwargs, match):
    with pytest.raises(ValueError, match=match):
        plan([8, 8], 8, mask, **kwargs)
