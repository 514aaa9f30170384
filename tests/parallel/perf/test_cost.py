"""The cost model's counts are exact: pairs against MaskSpec.pairs, bytes against hand sums."""
import numpy as np
import pytest
import torch

from kernels import HeadStride, MaskSpec
from parallel.balance import imbalance
from parallel.perf.cost import (
    Layout, balancer_rows, bytes_sent, keys_per_query, mask_keys, memory_per_rank, pairs_per_rank, ring_reach,
)
from parallel.ring import RingPlan
from parallel.perf.hardware import H100
from parallel.perf.predict import predict

MASKS = [
    MaskSpec(causal=True),
    MaskSpec(causal=False),
    MaskSpec.from_doc_lens([5, 11, 3, 13], causal=True),
    MaskSpec.from_doc_lens([5, 11, 3, 13], causal=False),
    MaskSpec(causal=True, window=6),
    MaskSpec.from_doc_lens([9, 7, 16], causal=True, window=4),
    MaskSpec.from_doc_lens([9, 7, 16], causal=True, prefix=[3, 7, 0], sink=2),
    MaskSpec(causal=True, window=5, sink=3),
]
S2_MASKS = [  # 4 KV heads; stride 3 with one dense head, or stride 4 over four sparse heads
    MaskSpec(causal=True, heads=HeadStride(4, 2, 4)),
    MaskSpec.from_doc_lens([10, 30, 24], window=12, prefix=4, sink=1, heads=HeadStride(4, 2, 4)),
    MaskSpec.from_doc_lens([10, 30, 24], causal=False, heads=HeadStride(4, 1, 3, dense_heads=1)),
    MaskSpec.from_doc_lens([10, 30, 24], causal=True, prefix=[3, 7, 0], heads=HeadStride(2, 3, 3, dense_heads=1)),
]


@pytest.mark.parametrize("mask", MASKS, ids=lambda m: m.describe())
@pytest.mark.parametrize("balancer", ["contiguous", "headtail", "stripe", "per_doc"])
@pytest.mark.parametrize("world", [1, 2, 4])
def test_pairs_per_rank_equal_mask_pairs(mask, balancer, world):
    seqlen = 32
    keys = mask_keys(mask, seqlen)
    rows = balancer_rows(balancer, seqlen, world, mask)
    assert sorted(np.concatenate(rows).tolist()) == list(range(seqlen))
    every = torch.arange(seqlen)
    expect = [mask.pairs(torch.as_tensor(r), every) for r in rows]
    assert pairs_per_rank(keys, rows) == expect
    plan = RingPlan.build(mask, [torch.as_tensor(r) for r in rows], 0, list(range(world)))
    assert ring_reach(mask, seqlen, rows) == plan.reach


@pytest.mark.parametrize("mask", S2_MASKS, ids=lambda m: m.describe())
@pytest.mark.parametrize("balancer", ["contiguous", "headtail", "per_doc"])
def test_s2_pairs_per_rank_count_each_heads_own_pairs(mask, balancer):
    """Per KV head, by brute force over MaskSpec.allowed: the priced pairs are the mean over
    the heads (units of all heads), and without a head count the union some head sees."""
    seqlen, hkv, every = 64, 4, torch.arange(64)
    rows = balancer_rows(balancer, seqlen, 2, mask)
    per_head = [int(mask.allowed(torch.as_tensor(r), every, hkv).sum()) for r in rows]
    assert [p * hkv for p in pairs_per_rank(mask_keys(mask, seqlen, hkv), rows)] == pytest.approx(per_head, abs=1e-6)
    union = [int(mask.allowed(torch.as_tensor(r), every, hkv).any(0).sum()) for r in rows]
    assert pairs_per_rank(mask_keys(mask, seqlen), rows) == union
    rows = balancer_rows(balancer, seqlen, 4, mask)  # a block travels while some head needs it
    plan = RingPlan.build(mask, [torch.as_tensor(r) for r in rows], 0, list(range(4)))
    assert ring_reach(mask, seqlen, rows) == plan.reach


def test_s2_kernel_cut_is_the_mean_of_each_heads_cut():
    """A call over all KV heads costs the mean of the heads' own cuts; ulysses ranks price
    the heads they hold (rank 0 the dense head, which sees every block)."""
    from parallel.perf.cost import kernel_rows, tile_cut

    mask = MaskSpec(causal=True, window=48, heads=HeadStride(8, 1, 3, dense_heads=1))
    seqlen, every = 256, torch.arange(256)
    heads = [tile_cut(mask, every, every, kv_heads=[h]) for h in range(4)]
    assert tile_cut(mask, every, every, 4) == pytest.approx(tuple(np.mean(heads, 0)))
    assert heads[0] != heads[1]  # the dense head's window tiles are not the strided heads'
    rows = balancer_rows("headtail", seqlen, 2, mask)
    cut = kernel_rows("ulysses", mask, seqlen, rows, heads=(4, 4))
    for r, mine in enumerate((heads[:2], heads[2:])):
        assert [cut[k][r] for k in ("diagonal", "split", "masked")] == pytest.approx(list(np.mean(mine, 0)))


def test_headtail_balances_causal_and_contiguous_does_not():
    keys = keys_per_query(4096, causal=True)
    assert imbalance(pairs_per_rank(keys, balancer_rows("headtail", 4096, 8))) == 1.0
    contiguous = imbalance(pairs_per_rank(keys, balancer_rows("contiguous", 4096, 8)))
    assert contiguous == pytest.approx(15 / 8, rel=1e-3)  # last rank: (2P-1)/P of the mean


def test_bytes_formulas_by_hand():
    lay = Layout(seqlen=1024, hq=8, hkv=2, head_dim=16, elem_bytes=4)
    block = 2 * 256 * 2 * 16 * 4  # K and V of the 256 local tokens, P=4
    assert bytes_sent("ring", lay, 4) == {"fwd": [3 * block] * 4, "bwd": [3 * 2 * block] * 4}
    # contiguous causal: block j is needed up to the last rank only, so rank r forwards the
    # r + 1 blocks 0..r that are still on their way and the last rank forwards nothing
    reach = ring_reach(MaskSpec(causal=True), 1024, balancer_rows("contiguous", 1024, 4))
    assert reach == [3, 2, 1, 0]
    assert bytes_sent("ring", lay, 4, reach=reach)["fwd"] == [block, 2 * block, 3 * block, 0]
    assert bytes_sent("allgather", lay, 4) == {"fwd": [3 * block] * 4, "bwd": [3 * 2 * block] * 4}
    uly = 3 * 256 * (2 * 8 + 2 * 4) * 16 * 4 // 4  # Hkv=2 repeated to 4 heads for P=4
    assert bytes_sent("ulysses", lay, 4) == {"fwd": [uly] * 4, "bwd": [uly] * 4}
    assert bytes_sent("ring", lay, 1) == {"fwd": [0], "bwd": [0]}
    bf16 = Layout(seqlen=1024, hq=8, hkv=2, head_dim=16, elem_bytes=2)
    assert bytes_sent("allgather", bf16, 4)["bwd"] == [3 * (block // 2 + block)] * 4  # dK/dV in float32
    with pytest.raises(ValueError, match="strategy='bogus'"):
        bytes_sent("bogus", lay, 4)


def test_bad_settings_name_the_setting():
    with pytest.raises(ValueError, match="seqlen=30"):
        balancer_rows("headtail", 30, 4)
    with pytest.raises(ValueError, match="balancer='nope'"):
        balancer_rows("nope", 32, 4)
    with pytest.raises(ValueError, match="hq=6"):
        Layout(16, 6, 4, 8)


def test_simulator_prefers_balanced_ring_and_scales_with_work():
    lay = Layout(65536, 32, 8, 128, 2)
    keys = keys_per_query(lay.seqlen, causal=True)
    zig = predict("ring", pairs_per_rank(keys, balancer_rows("headtail", lay.seqlen, 8)), lay, H100)
    flat = predict("ring", pairs_per_rank(keys, balancer_rows("contiguous", lay.seqlen, 8)), lay, H100)
    assert flat["total_s"] > 1.7 * zig["total_s"]
    one = predict("none", [int(keys.sum())], lay, H100)
    assert 0.8 < one["total_s"] / (8 * zig["total_s"]) < 1.0


def test_kernel_rows_count_how_the_cpu_backend_cuts_each_rank():
    from parallel.perf.cost import kernel_rows

    seqlen, world = 512, 2
    causal = MaskSpec(causal=True)
    # one rank, one causal run: 512 diagonal rows, nothing merged
    assert kernel_rows("none", causal, seqlen, balancer_rows("contiguous", seqlen, 1)) == {"diagonal": [512],
                                                                                           "split": [0], "masked": [0]}
    rows = balancer_rows("headtail", seqlen, world, causal)    # rank 0: 0-127 + 384-511, rank 1: 128-383
    cut = kernel_rows("ring", causal, seqlen, rows)
    # rank 0's own block: two causal tiles and 384-511 x 0-127 (3 tiles of 128 rows, merged); its
    # other block: 384-511 x 128-383 (one tile); the ring merges its second step (256 rows).
    # rank 1's own block is one causal run; its other block one tile (128-383 x 0-127).
    assert cut == {"diagonal": [256, 256], "split": [3 * 128 + 256, 256], "masked": [0, 0]}
    # ulysses attends the whole sequence sorted: one causal run on every rank
    assert kernel_rows("ulysses", causal, seqlen, rows) == {"diagonal": [512, 512], "split": [0, 0], "masked": [0, 0]}
    docs = MaskSpec.from_doc_lens([128, 384], causal=True)
    gathered = kernel_rows("allgather", docs, seqlen, balancer_rows("contiguous", seqlen, world, docs))
    # rank 0: document 1 (128 rows) and the start of document 2 (128 rows), two causal tiles;
    # rank 1: the rest of document 2 sees its first 128 keys in full, then its own causal run
    assert gathered == {"diagonal": [256, 256], "split": [256, 512], "masked": [0, 0]}
    # a 512-key window over 1024 rows: two causal 512-tiles on the diagonal and one 512 x 512
    # tile below it run with an explicit mask, computed in full although the window hides
    # the part of it further back than 512 keys
    window = MaskSpec(causal=True, window=512)
    cut = kernel_rows("none", window, 1024, balancer_rows("contiguous", 1024, 1))
    triangle = 512 * 513 // 2
    below = int(mask_keys(window, 1024).sum()) - 2 * triangle   # allowed pairs in the masked tile
    # (split: the rows of all three tiles, since the call is cut)
    assert cut == {"diagonal": [1024], "split": [3 * 512], "masked": [512 * 512 - below]}
    assert below == 511 * 512 // 2


def test_memory_formulas_by_hand():
    # T=8, Hq=4, Hkv=2, D=2, float32.  P=2: L=4, q = 4*4*2*4 = 128 B, K+V = 2*4*2*2*4 = 128 B,
    # lse = 4*4*4 = 64 B, float32 copies of q / K+V the same size as q / K+V
    lay = Layout(8, 4, 2, 2, 4)
    assert memory_per_rank("none", lay, 1) == {"fwd": 256 + 128, "bwd": 384 + 512 + 256, "peak": 1152}
    ring = memory_per_rank("ring", lay, 2)
    assert ring["fwd"] == 128 + 64 + 2 * 128 + 128                       # out/lse acc, 2 blocks, partial
    assert ring["bwd"] == 128 + 64 + 2 * 128 + 3 * 128 + 2 * 128 + 256   # saved, blocks, dkv accs, dq accs, grads
    ag = memory_per_rank("allgather", lay, 2)
    assert ag == {"fwd": 192 + 2 * 256, "bwd": 192 + 2 * 256 + 2 * 256 + 128 + 256, "peak": 1600}
    assert memory_per_rank("allgather", lay, 2, kv_head_groups=2)["fwd"] == 192 + 2 * 128
    # ulysses: full sequence (8 rows) for 2 q heads and 1 kv head: Q = out = 128 B, K+V = 128 B, lse 64 B
    uly = memory_per_rank("ulysses", lay, 2)
    assert uly["fwd"] == 448 + 128 and uly["bwd"] == 448 + 128 + 256 + 128 + 128 + 256
    # usp with u = P is ulysses plus a one-rank "ring" (the plain kernel on the full sequence, 2/1 heads)
    usp = memory_per_rank("usp", lay, 2, ulysses_degree=2)
    one = memory_per_rank("none", Layout(8, 2, 1, 2, 4), 1)
    assert usp["fwd"] == uly["fwd"] + one["fwd"] and usp["bwd"] == uly["bwd"] + one["bwd"]
    # the gathered K/V grows with P, the ring's two blocks shrink with it
    big = Layout(1 << 16, 32, 8, 128, 2)
    assert memory_per_rank("allgather", big, 8)["peak"] > memory_per_rank("allgather", big, 2)["peak"] / 2
    assert memory_per_rank("ring", big, 8)["peak"] == pytest.approx(memory_per_rank("ring", big, 2)["peak"] / 4)
    with pytest.raises(ValueError, match="no memory model"):
        memory_per_rank("cad", lay, 2)


def test_usp_with_one_ring_position_computes_like_ulysses():
    # with free links, usp over u = P ranks is ulysses: every rank runs the whole sequence
    # for Hq / P heads (the pairs each rank reports count all Hq heads)
    from dataclasses import replace

    free = replace(H100, intra_bw=1e30, inter_bw=1e30, intra_lat=0.0, inter_lat=0.0, mem_bw=1e30)
    lay = Layout(4096, 8, 8, 64, 2)
    pairs = pairs_per_rank(keys_per_query(4096, causal=True), balancer_rows("headtail", 4096, 4))
    uly = predict("ulysses", pairs, lay, free)["total_s"]
    assert predict("usp", pairs, lay, free, ulysses_degree=4)["total_s"] == pytest.approx(uly, rel=1e-9)
    two = predict("usp", pairs, lay, free, ulysses_degree=2)["total_s"]
    assert uly <= two < 1.2 * uly  # a 2-position ring of balanced halves: the same work
