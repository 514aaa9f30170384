"""scripts/bench_memory.py's arithmetic and report, on made-up records (no training)."""
import pytest

from scripts.bench_memory import all_settings, fit, report


def record(setting, seqlen, peak_mb, mode="full", loss=0, mlp=0):
    return {"setting": setting, "seqlen": seqlen, "peak_mb": peak_mb, "runtime_mb": 200.0, "step_s": 1.0,
            "activation_checkpoint": mode, "loss_chunk": loss, "mlp_chunk": mlp}


def test_every_combination_once():
    settings = all_settings(2048)
    assert len(settings) == 12
    assert settings["selective+loss2048+mlp2048"] == {"activation_checkpoint": "selective", "loss_chunk": 2048,
                                                      "mlp_chunk": 2048}


def test_slope_and_intercept_through_the_two_shortest():
    slope, icpt = fit([record("a", 8192, 3000.0), record("a", 4096, 2000.0), record("a", 32768, 9999.0)])
    assert slope == pytest.approx(1000 / 4096)
    assert icpt == pytest.approx(1000.0)


def test_report_writes_table_and_plot(tmp_path):
    records = [record("full", 4096, 2445.0), record("full", 8192, 4043.0),
               {"setting": "none", "seqlen": 4096, "error": ["MemoryError"]}]
    text = report(records, 24.0, str(tmp_path))
    rows = [line for line in text.splitlines() if line.startswith("| full |")]
    assert len(rows) == 2 and "0.3901" in rows[0]
    assert "failed: MemoryError" in text
    assert (tmp_path / "memory_vs_seqlen.png").stat().st_size > 0


def test_doc_len_packs_documents_of_that_length(tmp_path):
    from scripts.bench_memory import compose
    from train.data import build_loader

    cfg = compose(8192, {}, "cpu", str(tmp_path), doc_len=512)
    seq = next(build_loader(cfg.data, 0, 0, 1))
    lens = [int(n) for n in seq.doc_lens]
    assert sum(lens) == 8192 and max(lens) == 512 and lens.count(512) >= len(lens) - 2  # cut at both ends
