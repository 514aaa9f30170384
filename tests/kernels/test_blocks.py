"""Tile planning: the cpu backend's tiles cover every allowed pair exactly once, and each
tile's kind (full / top-left causal / masked) is exact; hidden tiles are never planned.
Property-tested with small tiles so that runs, shifts and splits all occur."""
import torch
from hypothesis import given, settings, strategies as st

from kernels import MaskSpec, blocks, cpu
from tests.kernels.cases import assert_close, run

N = 48


@st.composite
def scenarios(draw):
    cuts = sorted(draw(st.sets(st.integers(1, N - 1), max_size=4)))
    doc_lens = [b - a for a, b in zip([0] + cuts, cuts + [N])]
    causal = draw(st.booleans())
    window = draw(st.one_of(st.none(), st.integers(1, 20)))
    docs = draw(st.booleans())
    mask = MaskSpec.from_doc_lens(doc_lens, causal=causal, window=window) if docs else MaskSpec(causal=causal, window=window)
    def rows():
        kind = draw(st.sampled_from(["chunk", "two chunks", "stripe", "perm"]))
        a = draw(st.integers(0, N - 8))
        b = draw(st.integers(a + 1, N))
        if kind == "chunk":
            return torch.arange(a, b)
        if kind == "two chunks":
            return torch.cat([torch.arange(b, N), torch.arange(0, a)]) if a or b < N else torch.arange(N)
        if kind == "stripe":
            return torch.arange(a % 3, N, 3)
        return torch.randperm(N, generator=torch.Generator().manual_seed(a * N + b))[: b - a]
    return mask, rows(), rows()


def _check_plan(mask, q_pos, k_pos):
    allowed = mask.allowed(q_pos, k_pos)
    cover = torch.zeros(allowed.shape, dtype=torch.int64)
    for t in cpu.plan(mask, q_pos, k_pos):
        tile = allowed[t.q0:t.q1, t.k0:t.k1]
        cover[t.q0:t.q1, t.k0:t.k1] += 1
        if t.kind == blocks.FULL:
            assert tile.all(), f"FULL tile {t} has hidden pairs"
        elif t.kind == cpu.CAUSAL:
            assert torch.equal(tile, torch.ones_like(tile).tril()), f"CAUSAL tile {t} is not top-left causal"
        else:
            assert t.kind == cpu.MASKED and tile.any(), f"tile {t} is computed but hidden"
    assert cover.max() <= 1, "a pair is covered by two tiles"
    assert bool((cover[allowed] == 1).all()), "an allowed pair is not covered"


@settings(max_examples=60, deadline=None)
@given(scenarios())
def test_plan_covers_allowed_pairs_exactly_once(monkeypatch_tiles, case):
    _check_plan(*case)


@settings(max_examples=15, deadline=None)
@given(scenarios())
def test_cpu_matches_reference_float64_on_random_layouts(monkeypatch_tiles, case):
    mask, q_pos, k_pos = case
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(n, h, 8, generator=g, dtype=torch.float64).requires_grad_()
               for n, h in ((q_pos.numel(), 4), (k_pos.numel(), 2), (k_pos.numel(), 2)))
    got = run("cpu", q, k, v, mask, q_pos, k_pos)
    want = run("reference", q, k, v, mask, q_pos, k_pos)
    for name, a, e in zip(("out", "lse", "dq", "dk", "dv"), got, want):
        assert_close(a, e, 1e-10, name)


def test_documents_plan_one_causal_tile_each():
    mask = MaskSpec.from_doc_lens([300, 200, 500])
    pos = torch.arange(1000)
    assert [(t.q0, t.q1, t.k0, t.k1, t.kind) for t in cpu.plan(mask, pos, pos)] == [
        (0, 300, 0, 300, cpu.CAUSAL), (300, 500, 300, 500, cpu.CAUSAL), (500, 1000, 500, 1000, cpu.CAUSAL)]


def test_classify_hides_cross_document_blocks():
    mask = MaskSpec.from_doc_lens([32, 32], causal=True)
    stats = blocks.RowInfo.of(mask, torch.arange(64)).block_stats(16)
    kinds = blocks.classify(mask, stats[:, None], stats[None, :])
    assert kinds.tolist() == [[2, 0, 0, 0], [1, 2, 0, 0], [0, 0, 2, 0], [0, 0, 1, 2]]
