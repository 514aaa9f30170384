"""Simulator calibration from benchmark records, and hardware profiles on disk."""
import json

import pytest

from parallel.perf.calibrate import compare, fit_cpu_profile
from parallel.perf.cost import attention_flops
from parallel.perf.hardware import H100, load_hardware, resolve_hardware, save_hardware


def _kernel(seqlen, fwd_s, bwd_s, **kw):
    cell = dict(strategy="kernel", world=1, mask="causal", seqlen=seqlen, hq=2, hkv=2, head_dim=4, dtype="float32",
                correct=True, total_pairs=seqlen * (seqlen + 1) // 2, fwd_s=fwd_s, bwd_s=bwd_s,
                probe_fwd_flops=100.0, probe_bwd_flops=100.0)
    return dict(cell, **kw)


def test_fit_recovers_rate_and_diagonal_cost_from_kernel_cells_only():
    # cells made from a known machine: 1 GFLOP/s forward, 0.5 backward, and 2 us (fwd) /
    # 5 us (bwd) per row of a causal tile and head; causal and document masks tell them apart
    cells = []
    for t in (256, 512, 1024):
        for mask, lens in (("causal", None), ("document", [t // 4, t // 4, t // 2])):
            pairs = t * (t + 1) // 2 if lens is None else sum(n * (n + 1) // 2 for n in lens)
            f = attention_flops(pairs, 2, 4)
            cells.append(_kernel(t, f / 1e9 + 2e-6 * t * 2, 2.5 * f / 0.5e9 + 5e-6 * t * 2, mask=mask,
                                 total_pairs=pairs, doc_lens=lens))
    two_rank = dict(strategy="ring", world=2, link_bw=1e9, link_lat=1e-4, all_gather_bw=2e8, reduce_scatter_bw=1e8,
                    all_to_all_bw=5e8, probe_fwd_flops=80.0,
                    probe_bwd_flops=90.0, mask="causal", seqlen=1024, hq=2, hkv=2, head_dim=4, dtype="float32")
    hw = fit_cpu_profile(cells + [two_rank])
    assert hw.fwd_flops == pytest.approx(0.8e9, rel=1e-6)   # scaled by the 2-rank probe share
    assert hw.bwd_flops == pytest.approx(0.45e9, rel=1e-6)
    assert hw.diag_fwd == pytest.approx(2e-6 / 0.8, rel=1e-6) and hw.diag_bwd == pytest.approx(5e-6 / 0.9, rel=1e-6)
    assert (hw.intra_bw, hw.intra_lat, hw.coll_bw, hw.a2a_bw, hw.overlap) == (1e9, 1e-4, 1.5e8, 5e8, 0.0)


def test_fit_refuses_records_without_a_baseline():
    with pytest.raises(ValueError, match="1-rank kernel cells"):
        fit_cpu_profile([dict(strategy="ring", world=2, link_bw=1.0, link_lat=1.0)])


def test_compare_predicts_every_correct_multi_rank_cell():
    base = _kernel(1024, 0.1, 0.3)
    cell = dict(base, strategy="ring", balancer="headtail", world=2, id="ring-cell", pairs=[262400, 262400],
                link_bw=1e9, link_lat=1e-4, fwd_s=0.06, bwd_s=0.16, fwd_s_all=[0.06], bwd_s_all=[0.16])
    wrong = dict(cell, id="wrong", correct=False)
    rows = compare([base, cell, wrong], H100)
    assert [r["id"] for r in rows] == ["ring-cell"]
    assert rows[0]["error"] == pytest.approx((rows[0]["predicted"] - 0.22) / 0.22)


def test_profiles_round_trip_and_bad_files_name_the_problem(tmp_path):
    path = tmp_path / "cpu.json"
    save_hardware(H100, str(path))
    assert load_hardware(str(path)) == H100
    assert resolve_hardware(str(path)) == H100
    data = json.loads(path.read_text())
    data["flops"] = 1
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="unknown field"):
        load_hardware(str(path))
    with pytest.raises(ValueError, match="calibrate"):
        resolve_hardware(str(tmp_path / "missing.json"))


def test_predict_takes_the_profile_calibrate_saves(tmp_path, capsys):
    from parallel.perf.hardware import CPU
    from scripts.simulate_cp import main

    path = tmp_path / "cpu.json"
    save_hardware(CPU, str(path))
    main(["predict", "--hardware", str(path), "--gpus", "2", "--seqlen", "256", "--hq", "4", "--hkv", "4",
          "--head-dim", "8"])
    table = capsys.readouterr().out
    assert "| ring | headtail |" in table and "| cad | headtail |" in table
    with pytest.raises(SystemExit):
        main(["predict", "--hardware", str(tmp_path / "none.json")])
    assert "--hardware=" in capsys.readouterr().err
