"""Backends on contract 1b masks (prefix, sink, S2 heads) against the reference: cpu in
float64 (exact up to rounding), triton in float32 under the interpreter; out, lse and
dq/dk/dv through autograd, MHA/GQA/MQA, position slices, a subset of the K/V heads
(`kv_heads`, the Ulysses path) and block backward over disjoint key halves (the ring path).
The cpu plan covers every allowed pair of every head exactly once and skips what a head
does not see; triton's per-head block lists hold every tile with an allowed pair."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

import kernels
from kernels import HeadStride, MaskSpec, blocks, cpu, flash, triton_attn
from tests.kernels.cases import (DOC_LENS, assert_slice_matches_full_rows, N_RANDOM, T, assert_all_close, assert_close, loss_of, qkv, random_masks, run,
                                 truth, weights)

BACKENDS = {"cpu": (torch.float64, 1e-10), "triton": (torch.float32, 1e-5)}
HEADS = {"MHA": (4, 4), "GQA": (4, 2), "MQA": (3, 1)}


def masks_1b(hkv: int) -> dict[str, MaskSpec]:
    stride = HeadStride(block=3, local_blocks=2, vert_stride=min(hkv, 2), dense_heads=0 if hkv > 1 else 1)
    return {
        "prefix": MaskSpec.from_doc_lens(DOC_LENS, prefix=[5, 8, 7]),
        "prefix+window": MaskSpec.from_doc_lens(DOC_LENS, window=6, prefix=4),
        "sink+window": MaskSpec.from_doc_lens(DOC_LENS, window=5, sink=2),
        "sink+window no documents": MaskSpec(window=7, sink=3),
        "s2": MaskSpec(causal=True, heads=stride),
        "s2+documents+prefix+sink": MaskSpec.from_doc_lens(DOC_LENS, window=10, prefix=3, sink=1,
                                                            heads=HeadStride(2, 1, 2, dense_heads=1)),
    }


def run_heads(backend, q, k, v, mask, q_pos=None, k_pos=None, kv_heads=None):
    out, lse = kernels.attention(q, k, v, mask, q_pos=q_pos, k_pos=k_pos, kv_heads=kv_heads, backend=backend)
    return (out.detach(), lse.detach(), *torch.autograd.grad(loss_of(out, lse), (q, k, v)))


@pytest.fixture(autouse=True)
def small_cpu_tiles(monkeypatch_tiles):
    """Tiles of 8 rows, so that T=40 exercises runs, splits and compaction."""


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("mask_name", list(masks_1b(2)))
def test_matches_reference(backend, heads, mask_name):
    dtype, tol = BACKENDS[backend]
    mask = masks_1b(HEADS[heads][1])[mask_name]
    q, k, v = qkv(T, T, *HEADS[heads], dtype=dtype)
    assert_all_close(run(backend, q, k, v, mask), truth(q, k, v, mask), tol, f"{backend} {mask_name} {heads}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_subset_of_heads_is_those_heads_of_the_whole(backend):
    """kv_heads=[2, 3] with their query heads gives heads 4..7 of the 8/4 result (what a
    Ulysses rank holding the second half of the heads computes)."""
    dtype, tol = BACKENDS[backend]
    mask = MaskSpec.from_doc_lens(DOC_LENS, sink=1, heads=HeadStride(2, 2, 4))
    q, k, v = qkv(T, T, 8, 4, dtype=dtype)
    sub = [x.detach()[:, sl].clone().requires_grad_() for x, sl in ((q, slice(4, 8)), (k, slice(2, 4)), (v, slice(2, 4)))]
    got = run_heads(backend, *sub, mask, kv_heads=[2, 3])
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    out, lse = kernels.attention(q64, k64, v64, mask, backend="reference")
    g = torch.autograd.grad(loss_of(out[:, 4:], lse[4:]), (q64, k64, v64))  # the loss reads heads 4..7 only
    want = (out[:, 4:], lse[4:], g[0][:, 4:], g[1][:, 2:], g[2][:, 2:])
    assert_all_close(got, want, tol, f"{backend} kv_heads subset")
    with pytest.raises(AssertionError):  # the heads matter: as heads 0, 1 the result differs
        assert_all_close(run_heads(backend, *sub, mask, kv_heads=[0, 1]), want, tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["ring block", "zigzag", "stripe"])
def test_position_slices_reproduce_full_rows(backend, layout):
    dtype, tol = BACKENDS[backend]
    mask = masks_1b(2)["s2+documents+prefix+sink"]
    ar = torch.arange(T)
    qi, order = {"ring block": (ar[20:30], torch.cat([ar[20:], ar[:20]])),
                 "zigzag": (torch.cat([ar[:10], ar[30:]]), torch.cat([ar[30:], ar[:30]])),
                 "stripe": (ar[1::3], torch.cat([ar[::2], ar[1::2]]))}[layout]
    assert_slice_matches_full_rows(backend, mask, qi, order, tol, dtype=dtype, what=f"{backend} {layout}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_block_backward_over_disjoint_key_halves(backend):
    """The ring path: forward per key half, merge, then kernels.backward per half with the
    final out/lse; dq sums and dk/dv of each half match the whole."""
    dtype, tol = BACKENDS[backend]
    mask = masks_1b(2)["s2+documents+prefix+sink"]
    q, k, v = qkv(T, T, 4, 2, dtype=dtype)
    halves = (torch.arange(0, 24), torch.arange(24, T))
    parts = [kernels.forward(q, k[h], v[h], mask, k_pos=h, backend=backend) for h in halves]
    out, lse = kernels.merge(*parts[0], *parts[1])
    want = truth(q, k, v, mask)
    assert_close(out, want[0], tol, "out")
    assert_close(lse, want[1], tol, "lse")
    w_out, w_lse = (w.to(dtype) for w in weights(out, lse))
    dq = torch.zeros_like(q)
    for h in halves:
        bq, bk, bv = kernels.backward(w_out, q.detach(), k.detach()[h], v.detach()[h], out, lse, mask, k_pos=h,
                                      dlse=w_lse, backend=backend)
        dq += bq
        assert_close(bk, want[3][h], tol, "dk")
        assert_close(bv, want[4][h], tol, "dv")
    assert_close(dq, want[2], tol, "dq")


def _positions(seed, n):
    return torch.randperm(N_RANDOM, generator=torch.Generator().manual_seed(seed))[:n]


@settings(max_examples=60, deadline=None)
@given(random_masks(), st.integers(0, 10**6), st.integers(1, N_RANDOM), st.sampled_from(["chunk", "scattered"]))
def test_cpu_plan_covers_every_heads_pairs_once(monkeypatch_tiles, case, seed, n, kind):
    mask, args = case
    hkv = args[-1]
    q_pos = torch.arange(N_RANDOM - n, N_RANDOM) if kind == "chunk" else _positions(seed, n)
    k_pos = _positions(seed + 1, N_RANDOM)
    allowed = mask.allowed(q_pos, k_pos, hkv) if mask.heads is not None else mask.allowed(q_pos, k_pos).expand(hkv, -1, -1)
    cover = torch.zeros(allowed.shape, dtype=torch.int64)
    for u in cpu.units(mask, k_pos, hkv, torch.arange(hkv)):
        keys = torch.arange(k_pos.numel()) if u.keys is None else u.keys
        heads = list(range(hkv))[u.kv]
        for t in cpu.plan(mask, q_pos, k_pos[keys], u.head):
            cols = keys[t.k0:t.k1]
            tile = allowed[heads][:, t.q0:t.q1][:, :, cols]
            for h in heads:
                cover[h, t.q0:t.q1, cols] += 1
            if t.kind == blocks.FULL:
                assert tile.all(), f"FULL tile {t} has hidden pairs"
            elif t.kind == cpu.CAUSAL:
                assert torch.equal(tile, torch.ones_like(tile).tril()), f"CAUSAL tile {t} is not top-left causal"
            else:
                assert tile.any(), f"tile {t} is computed but hidden"
    assert cover.max() <= 1, "a pair is covered twice"
    assert bool((cover[allowed] == 1).all()), "an allowed pair is not covered"


@settings(max_examples=15, deadline=None)
@given(random_masks(), st.integers(0, 10**6))
def test_cpu_matches_reference_float64_on_random_masks(monkeypatch_tiles, case, seed):
    mask, args = case
    hkv = args[-1]
    q_pos, k_pos = _positions(seed, 17), _positions(seed + 1, N_RANDOM)
    q, k, v = qkv(17, N_RANDOM, 2 * hkv, hkv, d=8, dtype=torch.float64, seed=seed % 1000)
    assert_all_close(run("cpu", q, k, v, mask, q_pos, k_pos), run("reference", q, k, v, mask, q_pos, k_pos), 1e-10)


def test_cpu_s2_plan_computes_only_what_each_head_needs(monkeypatch_tiles):
    """S2 causal: tiles are cut at block edges, so each head computes its allowed pairs
    plus at most the upper halves of its diagonal blocks -- far below the causal triangle."""
    n, b = 256, 8
    mask = MaskSpec(causal=True, heads=HeadStride(block=b, local_blocks=2, vert_stride=4))
    pos = torch.arange(n)
    allowed = mask.allowed(pos, pos, 4)
    for u in cpu.units(mask, pos, 4, torch.arange(4)):
        keys = pos if u.keys is None else u.keys
        tiles = cpu.plan(mask, pos, keys, u.head)
        assert all(t.kind != cpu.MASKED for t in tiles), "S2 tiles are cut at block edges, never masked"
        area = sum((t.q1 - t.q0) * (t.k1 - t.k0) for t in tiles)
        pairs = int(allowed[u.head][:, keys].sum())
        assert area <= pairs + (n // b) * b * (b - 1) // 2, f"head {u.head}: {area} computed for {pairs} pairs"
    total = sum(int(allowed[h].sum()) for h in range(4))
    assert total < 0.4 * 4 * n * (n + 1) // 2


@pytest.mark.parametrize("doc_lens,exact", [([96, 160], True), ([100, 156], False)])
def test_triton_block_lists_hold_every_tile_a_head_needs(doc_lens, exact):
    """Per KV head, the row lists name every 16x16 tile with an allowed pair of that head;
    with documents on tile boundaries exactly those (tiles across a boundary may be listed
    without a pair: the classification is conservative).  Column lists are their transpose."""
    mask = MaskSpec.from_doc_lens(doc_lens, sink=2, prefix=5, heads=HeadStride(block=16, local_blocks=1, vert_stride=4))
    q, k = torch.zeros(256, 4, 16), torch.zeros(256, 4, 16)
    pos = torch.arange(256)
    args = triton_attn._setup(q, k, mask, pos, pos, torch.arange(4))
    needed = mask.allowed(pos, pos, 4).view(4, 16, 16, 16, 16).any(-1).any(2)  # [head, q block, k block]
    listed = torch.zeros_like(needed)
    by_col = torch.zeros_like(needed)
    for h in range(4):
        for b in range(16):
            row = slice(int(args["row_ptr"][h * 16 + b]), int(args["row_ptr"][h * 16 + b + 1]))
            col = slice(int(args["col_ptr"][h * 16 + b]), int(args["col_ptr"][h * 16 + b + 1]))
            listed[h, b, args["row_idx"][row].long()] = True
            by_col[h, args["col_idx"][col].long(), b] = True
    assert bool((listed | ~needed).all()), "a tile with an allowed pair is not listed"
    assert torch.equal(by_col, listed)
    if exact:
        assert torch.equal(listed, needed)


@pytest.mark.parametrize("mask_name", ["prefix", "sink+window", "s2"])
def test_flash_rejects_what_flash_attn_cannot_express(mask_name):
    mask = masks_1b(2)[mask_name]
    pos = torch.arange(T)
    with pytest.raises(ValueError, match="the flash backend cannot express a mask with .*use backend='triton'"):
        flash._groups(mask, pos, pos)
    assert not flash.supports(mask, pos, pos)
