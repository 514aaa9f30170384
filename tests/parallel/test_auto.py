"""parallel=auto: picks the cost model's fastest candidate, delegates exactly, logs its choice."""
import dataclasses

import pytest
import torch

import kernels
import parallel
from kernels import MaskSpec
from parallel.auto import Auto, candidates, predicted_time
from parallel.perf.cost import Layout
from parallel.perf.hardware import CPU
from tests.distributed import run_ranks


def test_choice_is_the_predicted_minimum_and_balances_causal():
    mask, seqlen, world = MaskSpec(causal=True), 4096, 4
    lay = Layout(seqlen, 8, 8, 64)
    scored = {(s, b): predicted_time(s, b, o, mask, seqlen, world, lay, CPU)
              for s, b, o in candidates(["ring", "allgather", "ulysses"], world, mask, lay)}
    assert scored[("ring", "headtail")] < scored[("ring", "contiguous")]
    assert set(scored) >= {("ring", "headtail"), ("ring", "contiguous"), ("allgather", None), ("ulysses", None)}


def test_bad_options_raise_before_any_collective():
    with pytest.raises(ValueError, match="num_heads"):
        Auto(MaskSpec(causal=True), 64)
    with pytest.raises(ValueError, match="hardware='tpu'"):
        Auto(MaskSpec(causal=True), 64, num_heads=4, num_kv_heads=4, head_dim=8, hardware="tpu")
    with pytest.raises(ValueError, match="'bogus'"):
        Auto(MaskSpec(causal=True), 64, num_heads=4, num_kv_heads=4, head_dim=8, candidates=["bogus"])


def _exact_on_ranks(rank, world):
    torch.manual_seed(0)
    t, hq, hkv, d = 64, 4, 2, 8
    q, k, v, dout = (torch.randn(t, h, d, dtype=torch.float64) for h in (hq, hkv, hkv, hq))
    results = []
    for mask in (MaskSpec(causal=True), MaskSpec.from_doc_lens([20, 12, 32], causal=True)):
        cp = parallel.build("auto", mask, t, num_heads=hq, num_kv_heads=hkv, head_dim=d)
        ql, kl, vl = (cp.shard(x).clone().requires_grad_(True) for x in (q, k, v))
        out = cp.attention(ql, kl, vl)
        out.backward(cp.shard(dout))
        full = cp.unshard(out.detach())
        qr, kr, vr = (x.clone().requires_grad_(True) for x in (q, k, v))
        ref, _ = kernels.attention(qr, kr, vr, mask)
        ref.backward(dout)
        assert torch.allclose(full, ref, atol=1e-10)
        assert torch.allclose(ql.grad, cp.shard(qr.grad), atol=1e-10)
        assert torch.allclose(kl.grad, cp.shard(kr.grad), atol=1e-10)
        assert cp.stats.extra["auto_choice"] == cp.choice and cp.stats.extra["auto_predicted_s"] > 0
        results.append(cp.choice)
    return results


def test_auto_is_exact_and_ranks_agree():
    choices = run_ranks(_exact_on_ranks, 2)
    assert choices[0] == choices[1]


def test_choice_strings_round_trip():
    from parallel.auto import format_choice, parse_choice

    text = format_choice("usp", None, {"ulysses_degree": 2, "ring_degree": 4, "num_heads": 8})
    assert text == "usp/default/ulysses_degree=2/ring_degree=4"
    assert parse_choice(text) == ("usp", None, {"ulysses_degree": "2", "ring_degree": "4"})
    assert parse_choice(format_choice("ring", "headtail", {})) == ("ring", "headtail", {})
    assert parse_choice("") is None and parse_choice("ring") is None and parse_choice("ring/headtail/x") is None


def _lse_on_ranks(rank, world):
    torch.manual_seed(0)
    t, hq, hkv, d = 32, 4, 2, 8
    mask = MaskSpec.from_doc_lens([12, 20], causal=True)
    q, k, v, dout = (torch.randn(t, h, d, dtype=torch.float64) for h in (hq, hkv, hkv, hq))
    dlse = torch.randn(hq, t, dtype=torch.float64)
    qr, kr, vr = (x.clone().requires_grad_(True) for x in (q, k, v))
    ref, ref_lse = kernels.attention(qr, kr, vr, mask)
    ((ref * dout).sum() + (ref_lse * dlse).sum()).backward()
    lay = Layout(t, hq, hkv, d)
    chosen = []
    for name, extra in [(n, {}) for n in ("ring", "allgather", "ulysses", "usp", "cad")] + [("cad", {"pingpong": True})]:
        if not candidates([name], world, mask, lay):
            continue  # no setting on this many ranks (usp needs both degrees above 1)
        cp = parallel.build("auto", mask, t, num_heads=hq, num_kv_heads=hkv, head_dim=d, candidates=[name], **extra)
        ql, kl, vl = (cp.shard(x).clone().requires_grad_(True) for x in (q, k, v))
        out, lse = cp.attention_with_lse(ql, kl, vl)
        assert torch.allclose(out, cp.shard(ref.detach()), atol=1e-10), name
        assert torch.allclose(lse, ref_lse.detach()[:, cp.positions], atol=1e-10), name
        ((out * cp.shard(dout)).sum() + (lse * dlse[:, cp.positions]).sum()).backward()
        for mine, full in ((ql, qr), (kl, kr), (vl, vr)):
            assert torch.allclose(mine.grad, cp.shard(full.grad), atol=1e-10), name
        chosen.append(cp.choice.split("/")[0] + ("+pingpong" if extra else ""))
    return chosen


def test_auto_returns_out_and_lse_for_every_candidate():
    chosen = run_ranks(_lse_on_ranks, 2)
    assert chosen[0] == chosen[1] == ["ring", "allgather", "ulysses", "cad", "cad+pingpong"]


def test_decision_is_cached_per_shape_and_document_histogram(caplog, monkeypatch):
    import parallel.auto as auto

    monkeypatch.setattr(auto, "_DECISIONS", {})
    searched = []
    real = auto.predicted_time
    monkeypatch.setattr(auto, "predicted_time", lambda *a: searched.append(a[0]) or real(*a))
    opts = dict(num_heads=4, num_kv_heads=2, head_dim=8, candidates=["ring", "allgather"])
    with caplog.at_level("DEBUG", logger="parallel.auto"):
        for lens in ([20, 12, 32], [24, 8, 32], [20, 12, 32]):  # same log2 buckets: one search
            Auto(MaskSpec.from_doc_lens(lens, causal=True), 64, **opts)
        first = len(searched)
        Auto(MaskSpec.from_doc_lens([60, 4], causal=True), 64, **opts)   # another histogram
        Auto(MaskSpec(causal=True), 64, **opts)                          # no documents
        Auto(MaskSpec(causal=True, window=8), 64, **opts)                # another mask kind
        Auto(MaskSpec(causal=True, window=8, sink=2), 64, **opts)        # + sinks
        Auto(MaskSpec(causal=True, prefix=16), 64, **opts)               # a prefix
        Auto(MaskSpec(causal=True, heads=kernels.HeadStride(4, 2, 2)), 64, **opts)  # S2 heads
    chose = [r for r in caplog.records if "parallel=auto chose" in r.getMessage()]
    assert first == 3 and len(searched) == 7 * first and len(chose) == 7


def test_s2_is_priced_per_head():
    """An S2 layout computes a fraction of causal's pairs on every head, and auto prices that:
    each candidate predicts less time than on the dense causal mask of the same shape."""
    seqlen, world, lay = 4096, 2, Layout(4096, 8, 8, 64)
    s2 = MaskSpec(causal=True, heads=kernels.HeadStride(64, 4, 8))
    for s, b, o in candidates(["ring", "allgather", "ulysses"], world, s2, lay):
        dense = predicted_time(s, b, o, MaskSpec(causal=True), seqlen, world, lay, CPU)
        assert predicted_time(s, b, o, s2, seqlen, world, lay, CPU) < 0.6 * dense, s


def test_s2_ring_is_priced_with_the_bytes_its_wire_carries():
    """Under S2 each ring hop carries only the (row, K/V head) entries later queries need
    (Ring.cost_bytes with the mask): the time model charges those bytes, not whole blocks."""
    from parallel.perf.predict import bytes_for_time, predict
    from parallel.perf.cost import bytes_sent, balancer_rows, mask_keys, pairs_per_rank

    seqlen, world, lay = 8192, 4, Layout(8192, 8, 8, 64)
    s2 = MaskSpec(causal=True, heads=kernels.HeadStride(64, 4, 8))
    rows = balancer_rows("headtail", seqlen, world, s2)
    sent = bytes_for_time("ring", s2, lay, world, rows, {})
    dense = bytes_sent("ring", lay, world)
    assert max(sent["fwd"]) < 0.5 * max(dense["fwd"]) and max(sent["bwd"]) < 0.5 * max(dense["bwd"])
    assert bytes_for_time("ring", MaskSpec(causal=True), lay, world, rows, {}) is None
    pairs = pairs_per_rank(mask_keys(s2, seqlen, lay.hkv), rows)
    untiled = dict(diag_fwd=0.0, diag_bwd=0.0, split_fwd=0.0, split_bwd=0.0)  # priced by bytes and pairs only
    slow_link = dataclasses.replace(CPU, overlap=0.0, **untiled)
    compacted = predict("ring", pairs, lay, slow_link, sent=sent)["total_s"]
    assert compacted < predict("ring", pairs, lay, slow_link)["total_s"]
    assert predicted_time("ring", "headtail", {}, s2, seqlen, world, lay, slow_link) == compacted


def test_missing_profile_names_the_file():
    with pytest.raises(ValueError) as err:
        Auto(MaskSpec(causal=True), 64, num_heads=4, num_kv_heads=4, head_dim=8, hardware="nowhere/cpu.json")
    assert "nowhere/cpu.json" in str(err.value) and "{hw}" not in str(err.value)
    assert "--save nowhere/cpu.json" in str(err.value)


def test_window_predictions_order_strategies_as_measured():
    """2 ranks, 16K, window 4096, 8/8 heads, cpu profile: four measured runs (BENCHMARKS.md,
    "parallel=auto on window masks") put ulysses first, ring/contiguous next and all-gather
    after it by CPU time; the model orders them the same way, so auto picks ulysses."""
    mask, seqlen, world = MaskSpec(causal=True, window=4096), 16384, 2
    lay = Layout(seqlen, 8, 8, 64)
    scored = {(s, b): predicted_time(s, b, o, mask, seqlen, world, lay, CPU)
              for s, b, o in candidates(["ring", "allgather", "ulysses"], world, mask, lay)}
    assert scored[("ulysses", None)] < scored[("ring", "contiguous")] < scored[("allgather", None)]
