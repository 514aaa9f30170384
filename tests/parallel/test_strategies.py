"""Every strategy x balancer x mask x head layout on 2 and 4 gloo ranks: gathered out, lse,
dq, dk, dv equal single-process kernels.attention (float64, reference backend), and the
bytes in cp.stats follow each strategy's formula."""
import torch

import parallel
from tests.distributed import run_ranks
from tests.parallel.cases import HEADS, check, inputs, masks, reference, run_strategy

ALL = ("contiguous", "headtail", "stripe", "per_doc")
T = 64


def _matrix(rank, world, configs):
    cases, stats = 0, []
    for strategy, options, balancers in configs:
        for mask_name, mask in masks(T).items():
            for heads_name, (hq, hkv) in HEADS.items():
                q, k, v, dout = inputs(T, hq, hkv, seed=cases)
                want = reference(q, k, v, dout, mask)
                for balancer in balancers:
                    cp = parallel.build(strategy, mask, T, balancer=balancer, backend="reference", **options)
                    name = f"{strategy}{options}/{balancer}/{mask_name}/{heads_name}"
                    check(name, run_strategy(cp, q, k, v, dout), want)
                    stats.append((name, cp.stats))
                    cases += 1
    for strategy in ("ring", "allgather", "ulysses"):  # float32, on the cpu backend too
        for mask_name in ("causal", "document+window"):
            mask = masks(T)[mask_name]
            q, k, v, dout = (t.float() for t in inputs(T, 4, 2, seed=7))
            want = reference(q, k, v, dout, mask)
            for backend in ("reference", "cpu"):
                cp = parallel.build(strategy, mask, T, backend=backend)
                check(f"{strategy}/{mask_name}/float32/{backend}", run_strategy(cp, q, k, v, dout), want, atol=2e-5)
    return cases, stats


def _assert_stats_agree(results):
    per_rank = [dict(stats) for _, stats in results]
    for name, stats in per_rank[0].items():
        assert all(r[name] == stats for r in per_rank[1:]), f"{name}: ranks disagree on cp.stats"


def test_two_ranks_every_strategy_balancer_mask_and_heads():
    configs = [
        ("none", {}, [None]),
        ("ring", {}, ALL),
        ("allgather", {"kv_head_groups": 2}, ALL),
        ("ulysses", {}, ALL),
        ("usp", {"ulysses_degree": 2}, ["headtail"]),
        ("usp", {"ring_degree": 2}, ["per_doc"]),
    ]
    results = run_ranks(_matrix, 2, configs)
    assert all(n == 5 * 2 * 15 for n, _ in results)
    _assert_stats_agree(results)


def test_four_ranks_every_strategy_with_hybrid_grids():
    configs = [
        ("ring", {}, ALL),
        ("allgather", {}, ["headtail", "stripe"]),
        ("ulysses", {}, ["contiguous", "per_doc"]),
        ("usp", {"ulysses_degree": 2}, ["headtail"]),
        ("usp", {"ulysses_degree": 2, "ulysses_inner": False}, ["per_doc"]),
    ]
    results = run_ranks(_matrix, 4, configs)
    assert all(n == 5 * 2 * 10 for n, _ in results)
    _assert_stats_agree(results)


def _bytes(rank, world):
    from kernels import MaskSpec

    hq, hkv, d = 4, 2, 8
    q, k, v, _ = inputs(T, hq, hkv, d)
    out = {}
    for key, strategy, mask, balancer in [
        ("ring/full", "ring", MaskSpec(), "contiguous"),
        ("ring/causal", "ring", MaskSpec(causal=True), "contiguous"),
        ("ring/window", "ring", MaskSpec(causal=True, window=8), "contiguous"),
        ("ring/headtail", "ring", MaskSpec(causal=True), "headtail"),
        ("allgather", "allgather", MaskSpec(causal=True), "headtail"),
        ("ulysses", "ulysses", MaskSpec(causal=True), "headtail"),
    ]:
        cp = parallel.build(strategy, mask, T, balancer=balancer, backend="reference")
        cp.attention(cp.shard(q), cp.shard(k), cp.shard(v))
        out[key] = cp.stats
    return out


def test_bytes_and_pairs_follow_the_formulas():
    world, t_local, hkv, hq, d, elem = 4, T // 4, 2, 4, 8, 8
    block = 2 * t_local * hkv * d * elem  # one packed K/V shard
    stats = run_ranks(_bytes, world)[0]
    assert stats["ring/full"].bytes_sent == [(world - 1) * block] * world
    # backward: the K/V hops again, plus P-2 accumulator hops and one return home per block
    assert stats["ring/full"].extra["bytes_bwd_sent"] == [(world - 1) * 2 * block] * world
    # causal + contiguous: block j is needed by ranks j..P-1 only, so rank r passes r+1 blocks
    assert stats["ring/causal"].bytes_sent == [block, 2 * block, 3 * block, 0]
    assert stats["ring/causal"].bytes_recv == [0, block, 2 * block, 3 * block]
    # accumulators of blocks 0..2 start at their first remote rank and go home from rank 3
    assert stats["ring/causal"].extra["bytes_bwd_sent"] == [block, 3 * block, 5 * block, 3 * block]
    # window 8 < shard 16: a block is needed by its own rank and the next only
    assert stats["ring/window"].bytes_sent == [block, block, block, 0]
    assert stats["ring/headtail"].bytes_sent == [(world - 1) * block] * world
    assert stats["allgather"].bytes_sent == [(world - 1) * block] * world
    # ulysses: 3/4 of q, k, v (K/V heads repeated to 4) and of the output leave each rank
    q_bytes = t_local * hq * d * elem
    assert stats["ulysses"].bytes_sent == [(world - 1) * 4 * q_bytes // world] * world
    total = T * (T + 1) // 2
    for key in ("ring/causal", "ring/headtail", "allgather", "ulysses"):
        assert sum(stats[key].pairs) == total, key
    assert stats["ring/headtail"].imbalance("pairs") <= 1.01
    assert stats["ring/causal"].imbalance("pairs") > 1.5
