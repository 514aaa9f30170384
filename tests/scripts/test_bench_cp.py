"""The benchmark harness: bookkeeping on a tiny cell, WRONG for a broken strategy, resume."""
import json
import os

from omegaconf import OmegaConf

from scripts.bench_cp import BenchConfig, run
from scripts.bench_report import derive, load_records

FIXTURES = {"fixture-gather": "tests.scripts.fixture_strategies:GatherKV",
            "fixture-drop": "tests.scripts.fixture_strategies:DropLastBlock"}


def _cfg(out_dir):
    cfg = OmegaConf.structured(BenchConfig)
    cfg.merge_with(dict(out_dir=str(out_dir), strategies=list(FIXTURES), peers=[], balancers=["contiguous"],
                        masks=["causal", "document"], seqlens=[64], worlds=[1, 2], heads=[[2, 1]], head_dim=8,
                        warmup=0, repeats=2, docs={"file": None, "fixed_len": 24}, extra_strategies=FIXTURES))
    return cfg


def test_harness_flags_broken_strategy_and_resumes(tmp_path):
    records = run(_cfg(tmp_path))
    by = {(r["strategy"], r["mask"]): r for r in records}
    assert len(records) == 6
    for mask in ("causal", "document"):
        assert by[("kernel", mask)]["correct"] is True
        assert by[("fixture-gather", mask)]["correct"] is True
        assert by[("fixture-drop", mask)]["correct"] is False
        assert by[("fixture-drop", mask)]["errors"]["out"] > 1e-2
    table = open(tmp_path / "results.md").read()
    assert table.count("| WRONG |") == 2
    for png in ("speedup.png", "imbalance.png"):  # no bytes.png: the fixtures have no bytes formula
        assert os.path.getsize(tmp_path / png) > 0
    # the harness's pairs bookkeeping: causal 64 tokens on 2 contiguous ranks = 528 + 1552 pairs
    good = by[("fixture-gather", "causal")]
    assert good["pairs"] == [528, 1552] and good["total_pairs"] == 64 * 65 // 2
    assert abs(good["pairs_imbalance"] - 1552 / 1040) < 1e-12
    assert len(good["fwd_s_all"]) == 2 and good["world_actual"] == 2
    lines = len(load_records(tmp_path / "results.jsonl"))
    run(_cfg(tmp_path))  # resume: every cell is already there, nothing runs again
    assert len(load_records(tmp_path / "results.jsonl")) == lines


def test_derive_definitions():
    common = dict(mask="causal", seqlen=1000, hq=2, hkv=2, head_dim=4, dtype="float32", correct=True, total_pairs=500)
    base = dict(common, strategy="kernel", world=1, fwd_s=1.0, bwd_s=3.0, fwd_s_all=[1.0, 1.0], bwd_s_all=[3.0, 3.0])
    cell = dict(common, strategy="ring", world=2, fwd_s=0.5, bwd_s=2.0, fwd_s_all=[0.4, 0.5, 0.9],
                bwd_s_all=[2.0, 2.0, 2.1], bytes_sent=[10, 12], bytes_formula=[10, 12])
    wrong = dict(cell, correct=False)
    rows = derive([base, cell, wrong])
    assert rows[1]["efficiency"] == 4.0 / (2 * 2.5)
    assert rows[1]["tokens_per_s"] == 1000 / 2.5
    assert rows[1]["tflops"] == 4 * 500 * 2 * 4 * 3.5 / 2.5 / 1e12
    assert abs(rows[1]["spread_s"] - (3.0 - 2.4)) < 1e-12 and rows[1]["bytes_match"] is True
    assert rows[2]["status"] == "WRONG" and "efficiency" not in rows[2]
    json.dumps(rows)


def test_auto_vs_best_reads_the_chosen_strategys_own_cell():
    from scripts.bench_report import auto_vs_best

    common = dict(mask="causal", seqlen=1000, hq=2, hkv=2, head_dim=4, dtype="float32", correct=True, total_pairs=500,
                  world=2, options={})
    cell = lambda strategy, balancer, t, **kw: dict(common, strategy=strategy, balancer=balancer, fwd_s=t / 4,  # noqa: E731
                                                    bwd_s=3 * t / 4, fwd_s_all=[t / 4], bwd_s_all=[3 * t / 4], **kw)
    rows = derive([cell("ring", "headtail", 1.0), cell("ring", "contiguous", 1.5), cell("ulysses", None, 1.2),
                   cell("auto", None, 1.3, extra={"auto_choice": "ulysses/headtail"})])
    line = auto_vs_best(rows).strip().splitlines()[-1]
    # chosen = the ulysses cell (1200 ms), auto's own cell 1300 ms, best = ring/headtail (1000 ms)
    assert line == "| causal | 1000 | 2 | 2/2 | ulysses/headtail | 1200 | 1300 | ring/headtail | 1000 | 1.200 | 1.300 |"
