"""Contract 1b masks (prefix, sink, S2 heads) under every CP strategy: gathered out, lse,
dq, dk, dv equal single-process kernels.attention in float64 on 2 ranks (and a 4-rank
hybrid grid); the ring's reach knows that a prefix looks forward and that sink tokens are
needed by every later rank (bytes against the formula); pair counts match the mask."""
import torch
from hypothesis import given, settings, strategies as st

import parallel
from kernels import HeadStride, MaskSpec
from parallel import balance
from tests.distributed import run_ranks
from tests.kernels.cases import N_RANDOM as N, random_masks
from tests.parallel.cases import DOC_LENS, check, inputs, reference, run_strategy

T = 64


def masks_1b() -> dict[str, MaskSpec]:
    s2 = HeadStride(block=4, local_blocks=2, vert_stride=2)
    return {
        "prefix": MaskSpec.from_doc_lens(DOC_LENS, prefix=[3, 20, 5, 9]),
        "sink+window": MaskSpec.from_doc_lens(DOC_LENS, window=6, sink=2),
        "s2": MaskSpec(causal=True, heads=s2),
        "s2+documents+prefix+sink": MaskSpec.from_doc_lens(DOC_LENS, window=12, prefix=4, sink=1, heads=s2),
    }


@settings(max_examples=60, deadline=None)
@given(random_masks(), st.integers(1, 4), st.integers(0, 10**6))
def test_pair_counts_match_the_mask(case, world, seed):
    """Interval counting (main interval + sinks - overlap) equals counting allowed pairs
    (with heads: pairs some head allows)."""
    mask, args = case
    pos = torch.arange(N)
    allowed = mask.allowed(pos, pos, args[-1]).any(0) if mask.heads is not None else mask.allowed(pos, pos)
    owner = torch.randint(0, world, (N,), generator=torch.Generator().manual_seed(seed))
    index = [(owner == r).nonzero().flatten() for r in range(world)]
    matrix = balance.pair_matrix(mask, index)
    for r in range(world):
        for j in range(world):
            assert matrix[r][j] == int(allowed[index[r]][:, index[j]].sum())
    assert balance.pair_counts(mask, index[0], pos) == int(allowed[index[0]].sum())


def _matrix(rank, world, configs):
    names = []
    for strategy, options, balancers, mask_names in configs:
        for mask_name in mask_names:
            mask = masks_1b()[mask_name]
            for hq, hkv in ((4, 2), (8, 4)):
                q, k, v, dout = inputs(T, hq, hkv, seed=len(names))
                want = reference(q, k, v, dout, mask)
                shaped = {**options, **parallel.load_entry(parallel.STRATEGIES, strategy, "strategy")
                          .shape_options(hq, hkv, q.shape[2])}  # cad: num_kv_heads; auto: head layout
                for balancer in balancers:
                    for backend in ("reference", "cpu"):
                        cp = parallel.build(strategy, mask, T, balancer=balancer, backend=backend, **shaped)
                        name = f"{strategy}{options}/{balancer}/{mask_name}/{hq}-{hkv}/{backend}"
                        check(name, run_strategy(cp, q, k, v, dout), want)
                        names.append(name)
    return names


ALL_MASKS = list(masks_1b())


def test_two_ranks_every_strategy_on_the_new_masks():
    configs = [
        ("ring", {}, ["contiguous", "per_doc"], ALL_MASKS),
        ("allgather", {"kv_head_groups": 2}, ["headtail"], ALL_MASKS),
        ("ulysses", {}, ["per_doc"], ALL_MASKS),
        ("usp", {"ulysses_degree": 2}, ["headtail"], ["s2", "s2+documents+prefix+sink"]),
        ("cad", {"task_overhead_pairs": 0}, [None], ALL_MASKS),
        ("auto", {"candidates": ["cad"]}, [None], ["s2"]),  # auto hands cad the KV heads S2 is counted over
    ]
    results = run_ranks(_matrix, 2, configs)
    assert len(results[0]) == (2 * 4 + 4 + 4 + 2 + 4 + 1) * 2 * 2


def _four_ranks(rank, world):
    configs = [("usp", {"ulysses_degree": 2}, ["per_doc"], ["s2+documents+prefix+sink"]),
               ("ulysses", {}, ["contiguous"], ["s2"]),
               ("ring", {}, ["headtail"], ["prefix"]),
               ("cad", {"task_overhead_pairs": 0, "pingpong": True}, [None], ["s2+documents+prefix+sink"])]
    return _matrix(rank, world, configs), _ring_bytes()


def _ring_bytes():
    hq, hkv = 4, 2
    q, k, v, _ = inputs(T, hq, hkv)
    out = {}
    for key, mask in RING_MASKS.items():
        cp = parallel.build("ring", mask, T, balancer="contiguous", backend="reference")
        cp.attention(cp.shard(q), cp.shard(k), cp.shard(v))
        out[key] = (cp.stats.bytes_sent, cp.stats.pairs)
    return out


RING_MASKS = {
    "window": MaskSpec(causal=True, window=8),
    "window+sink": MaskSpec(causal=True, window=8, sink=2),
    "causal": MaskSpec(causal=True),
    "causal+prefix": MaskSpec(causal=True, prefix=20),
}


def test_four_ranks_hybrid_grid_and_ring_reach():
    """usp 2x2: each ring holds half of the K/V heads (kv_heads passed to every block);
    ulysses over 4 ranks with Hkv=2 repeats each K/V head on two ranks, which keep its index.

    Ring bytes, shards of 16 rows, one K/V block = 2 * 16 rows * 2 heads * 8 dims * 8 bytes:
    window 8 < 16, each block goes one hop; with sinks block 0 goes on to every rank (ranks
    1 and 2 pass it too).  Causal: rank r passes r + 1 blocks; a prefix of 20 rows reaches
    into block 1 from block 0's queries, so block 1 travels the whole ring (ranks 1, 2 and
    3 pass it on)."""
    names, stats = run_ranks(_four_ranks, 4)[0]
    assert len(names) == 4 * 2 * 2
    block = 2 * 16 * 2 * 8 * 8
    assert stats["window"][0] == [block, block, block, 0]
    assert stats["window+sink"][0] == [block, 2 * block, 2 * block, 0]
    assert stats["causal"][0] == [block, 2 * block, 3 * block, 0]
    assert stats["causal+prefix"][0] == [block, 2 * block, 3 * block, block]
    pos = torch.arange(T)
    for key in ("window+sink", "causal+prefix"):
        assert sum(stats[key][1]) == RING_MASKS[key].pairs(pos, pos)
