"""bench_report: speed-up against the 1-rank kernel, the efficiency-above-1 flag, the plots
and the closing summary, from records written by hand."""
import os

from scripts.bench_report import derive, main, speedup, write_reports


def cell(strategy, world, fwd, bwd, balancer=None, mask="causal", seqlen=1024, **extra):
    return {"strategy": strategy, "balancer": balancer, "mask": mask, "seqlen": seqlen, "world": world, "hq": 4,
            "hkv": 2, "head_dim": 32, "dtype": "float32", "options": {}, "correct": True, "total_pairs": 1000,
            "id": f"{strategy}|{balancer}|{mask}|{seqlen}|{world}", "fwd_s": fwd[len(fwd) // 2],
            "bwd_s": bwd[len(bwd) // 2], "fwd_s_all": fwd, "bwd_s_all": bwd, **extra}


RECORDS = [
    cell("kernel", 1, [1.0], [3.0]),
    cell("ring", 2, [0.5, 0.6, 0.7], [1.3, 1.4, 1.8], balancer="headtail", bytes_sent=[10, 10], bytes_formula=[10, 10],
         pairs_imbalance=1.0),
    cell("ulysses", 2, [0.4], [1.4], pairs_imbalance=1.0),  # 4.0 / 1.8 = 2.22x on 2 ranks: faster than ideal
    cell("kernel", 1, [1.0], [1.0], mask="document"),
    cell("ring", 2, [1.0], [1.0], mask="document", correct=False),
]


def test_speedup_and_the_efficiency_flag():
    rows = derive(RECORDS)
    ring, ulysses = rows[1], rows[2]
    assert speedup(ring, rows) == (4.0 / 2.0, 4.0 / 2.5, 4.0 / 1.8)  # median, slowest, fastest repeat
    assert ring["suspect"] is False and ulysses["suspect"] is True
    assert speedup(rows[4], rows) is None  # WRONG cells get no speed figures


def test_reports_end_with_a_summary_and_the_paths(tmp_path, capsys):
    write_reports(RECORDS, str(tmp_path), command="python -m scripts.bench_cp test")
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "bench: 5 cells: 4 ok, 1 WRONG, 0 SKIPPED"
    assert "  causal    T=1024   Hq/Hkv=4/2 P=2: ulysses 2.22x (1.11!)" in out
    assert any(line.startswith("1 cell(s) with CP efficiency above 1 (repeats=1): a measurement artifact")
               for line in out)
    assert any(line.startswith("WRONG (results differ") and "ring|None|document" in line for line in out)
    assert out[-2] == f"results: {tmp_path}/results.md"
    assert out[-1] == "plots: " + ", ".join(f"{tmp_path}/{n}.png" for n in ("speedup", "bytes", "imbalance"))
    assert all(os.path.getsize(tmp_path / f"{n}.png") > 10_000 for n in ("speedup", "bytes", "imbalance"))
    assert "1.111!" in (tmp_path / "results.md").read_text() and "CP eff marked !" in (tmp_path / "results.md").read_text()


def test_command_line_regenerates_from_results_jsonl(tmp_path, capsys):
    import json

    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    main([str(tmp_path / "results.jsonl"), "--out", str(tmp_path / "again"), "--no-plots"])
    assert capsys.readouterr().out.splitlines()[-1] == f"results: {tmp_path}/again/results.md"
    assert (tmp_path / "again" / "results.md").exists() and not (tmp_path / "again" / "speedup.png").exists()
