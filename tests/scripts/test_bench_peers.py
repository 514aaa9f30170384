"""Peers in the benchmark: checked like our strategies (WRONG is never timed), SKIPPED with
the install command or the reason, ratios against the fastest correct peer, and the
flash_attn CPU stand-in against the reference kernel."""
import torch
from omegaconf import OmegaConf

import kernels
from scripts.bench_cp import BenchConfig, run
from scripts.bench_report import derive, vs_peers
from scripts.peers.base import INSTALL

FIXTURES = {"fixture-wrong-peer": "tests.scripts.fixture_peers:OffByOnePercent",
            "fixture-missing-peer": "tests.scripts.fixture_peers:NotInstalled"}


def test_peer_cells_pass_fail_and_skip(tmp_path):
    cfg = OmegaConf.structured(BenchConfig)
    cfg.merge_with(dict(out_dir=str(tmp_path), strategies=[], balancers=["headtail"], masks=["causal", "document"],
                        peers=["deepspeed-ulysses", "ring-flash-attn-llama3", "ring-flash-attn-zigzag",
                               "ring-flash-attn-zigzag+fp32fix", *FIXTURES],
                        seqlens=[1024], worlds=[2], heads=[[4, 2]], head_dim=16, warmup=0, repeats=1,
                        docs={"file": None, "fixed_len": 300}, extra_peers=FIXTURES, plots=False))
    by = {(r["strategy"][5:], r["mask"]): r for r in run(cfg)}
    for mask in ("causal", "document"):
        for peer in ("deepspeed-ulysses", "ring-flash-attn-llama3"):
            assert by[(peer, mask)]["correct"] is True, by[(peer, mask)]
            assert len(by[(peer, mask)]["fwd_s_all"]) == 1 and by[(peer, mask)]["peer_version"]
        wrong = by[("fixture-wrong-peer", mask)]
        assert wrong["correct"] is False and wrong["errors"]["out"] > 5e-3 and wrong["fwd_s_all"] == []
        assert "fwd_s" not in wrong  # never timed
        missing = by[("fixture-missing-peer", mask)]
        assert missing["correct"] is None and "longctx_peer_that_is_not_installed not installed" in missing["skipped"]
        assert INSTALL in missing["skipped"]
    # the released zigzag ring's fp32 backward aliases its accumulator (dq wrong); the fix passes
    assert by[("ring-flash-attn-zigzag", "causal")]["correct"] is False
    assert by[("ring-flash-attn-zigzag", "causal")]["errors"]["dq"] > 1e-2
    assert by[("ring-flash-attn-zigzag+fp32fix", "causal")]["correct"] is True
    assert "cannot express mask='document'" in by[("ring-flash-attn-zigzag", "document")]["skipped"]
    table = (tmp_path / "results.md").read_text()
    assert table.count("| WRONG |") == 3 and table.count("SKIPPED: ValueError") == 4


def _rec(strategy, total, correct=True):
    return dict(strategy=strategy, balancer=None, mask="causal", seqlen=1000, world=2, hq=2, hkv=2, head_dim=4,
                dtype="float32", options={}, correct=correct, total_pairs=500, fwd_s=total / 4, bwd_s=3 * total / 4,
                fwd_s_all=[total / 4], bwd_s_all=[3 * total / 4])


def test_ratio_is_against_the_fastest_correct_peer():
    rows = derive([_rec("ring", 1.0), _rec("ulysses", 3.0), _rec("peer:fast-but-wrong", 0.5, correct=False),
                   _rec("peer:b", 2.0), _rec("peer:c", 2.5)])
    ring, ulysses = rows[0], rows[1]
    assert ring["best_peer"] == "b" and ring["vs_peer"] == 0.5 and ulysses["vs_peer"] == 1.5
    assert all("vs_peer" not in r for r in rows[2:])
    lines = vs_peers(rows).strip().splitlines()
    assert lines[2] == "| causal | 1000 | 2 | 2/2 | b | 2000 | **ring** | 1000 | **0.50x** |"
    assert lines[3] == "| causal | 1000 | 2 | 2/2 | b | 2000 | ulysses | 3000 | 1.50x |"


def test_flash_attn_standin_matches_the_reference_on_documents_and_windows():
    from scripts.peers.standin import use_flash_attn_standin

    use_flash_attn_standin()
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    g = torch.Generator().manual_seed(0)
    lens = [700, 500, 300]
    q, k, v, dout = (torch.randn(1500, h, 16, generator=g) for h in (4, 2, 2, 4))
    cu = torch.tensor([0, 700, 1200, 1500], dtype=torch.int32)
    for window in (None, 200):
        mask = kernels.MaskSpec.from_doc_lens(lens, causal=True, window=window)
        leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
        out = flash_attn_varlen_func(*leaves, cu, cu, 700, 700, causal=True,
                                     window_size=(window - 1, 0) if window else (-1, -1))
        got = [out, *torch.autograd.grad(out, leaves, dout)]
        leaves = [x.clone().requires_grad_(True) for x in (q, k, v)]
        ref, _ = kernels.attention(*leaves, mask, backend="reference")
        want = [ref, *torch.autograd.grad(ref, leaves, dout)]
        for a, b in zip(got, want):
            assert (a - b).abs().max() < 1e-5 * b.abs().max()
    out = flash_attn_func(q[None], k[None], v[None], causal=True)[0]
    ref = kernels.attention(q, k, v, kernels.MaskSpec(causal=True), backend="reference")[0]
    assert (out - ref).abs().max() < 1e-5 * ref.abs().max()
