"""A strategy carries its own cost hooks: registering one new class is all the benchmark,
the simulator and parallel=auto need to see it."""
import contextlib
import io

import pytest

import parallel
from kernels import MaskSpec
from parallel.auto import candidates, predicted_time
from parallel.base import ContextParallel
from parallel.perf.cost import Layout, bytes_sent, has_hook, memory_per_rank
from parallel.perf.hardware import H100
from parallel.perf.predict import compare_strategies
from scripts import simulate_cp
from scripts.bench_cells import expand


class Toy(ContextParallel):
    """Free compute, 7 bytes per rank each way, two auto settings."""

    name = "toy"

    @classmethod
    def cost_bytes(cls, lay, world, **_):
        return {"fwd": [7] * world, "bwd": [7] * world}

    @classmethod
    def cost_time(cls, pairs, lay, hw, *, speed=1, **_):
        return 1e-12 * max(pairs) / speed, 0.0

    @classmethod
    def auto_candidates(cls, world, mask, lay, balancer=None):
        return [("contiguous", {"speed": 1}), ("headtail", {"speed": 2})]


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(parallel.STRATEGIES, "toy", f"{__name__}:Toy")


def test_bench_simulate_and_auto_see_a_registered_strategy(toy):
    mask, lay = MaskSpec(causal=True), Layout(4096, 8, 8, 64)
    # benchmark: cells for every balancer, bytes formula available to the worker
    cfg = dict(strategies=["toy"], balancers=["contiguous", "headtail"], masks=["causal"], seqlens=[64],
               worlds=[1, 2], heads=[[2, 2]], head_dim=8, dtype="float32", seed=0, warmup=0, repeats=1, window=16,
               docs={"file": None, "fixed_len": 8})
    assert [(c["strategy"], c["balancer"]) for c in expand(cfg)] == [("kernel", None), ("toy", "contiguous"),
                                                                    ("toy", "headtail")]
    assert has_hook("toy", "cost_bytes") and bytes_sent("toy", lay, 4) == {"fwd": [7] * 4, "bwd": [7] * 4}
    # simulator: one row per auto setting, bytes shown, memory not modelled
    rows = [r for r in compare_strategies(mask, lay, 4, H100) if r["strategy"] == "toy"]
    assert [(r["balancer"], r["options"], r["bytes"], r["memory"]) for r in rows] == [
        ("contiguous", {"speed": 1}, 14, None), ("headtail", {"speed": 2}, 14, None)]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        simulate_cp.main(["predict", "--gpus", "4", "--seqlen", "4096", "--hq", "8", "--hkv", "8"])
    assert "| toy (speed=2) | headtail |" in out.getvalue()
    # auto: the toy's settings are candidates and its time model prices them
    found = [c for c in candidates(["ring", "toy"], 4, mask, lay) if c[0] == "toy"]
    assert found == [("toy", "contiguous", {"speed": 1}), ("toy", "headtail", {"speed": 2})]
    times = {b: predicted_time("toy", b, o, mask, 4096, 4, lay, H100) for _, b, o in found}
    ring = predicted_time("ring", "headtail", {}, mask, 4096, 4, lay, H100)
    assert times["headtail"] < times["contiguous"] < ring


def test_a_strategy_without_a_model_says_so(toy):
    with pytest.raises(ValueError, match="strategy 'toy' has no memory model"):
        memory_per_rank("toy", Layout(64, 2, 2, 8), 2)
    assert not has_hook("toy", "cost_kernel_cut") and not has_hook("nope", "cost_time")
