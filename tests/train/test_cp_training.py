"""CP training equivalence: 2-rank runs under each CP strategy give the per-step losses of
a single-process parallel=none run on the same data and seed (float32, reference kernel).
And data parallelism: parallel=none with dp=2 equals one process accumulating 2 micro-batches.

The baselines run here in the test process; ONE spawn of 2 ranks runs every case.
"""
import os

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import parallel
from tests.distributed import run_ranks
from train.config import register
from train.loop import run

CONF = os.path.join(os.path.dirname(__file__), "..", "..", "conf")
STEPS = 20

# (strategy yaml, extra overrides); usp on 2 ranks is one of its degrees x 1
CASES = [
    ("ring", []),
    ("allgather", []),
    ("ulysses", []),
    ("usp", ["parallel.options.ulysses_degree=2", "parallel.options.ring_degree=1"]),
    ("usp", ["parallel.options.ulysses_degree=1", "parallel.options.ring_degree=2"]),
    ("cad", []),
]


def config(strategy, extra, out_dir):
    register()
    with initialize_config_dir(config_dir=os.path.abspath(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[
            f"parallel={strategy}", "+parallel.options.backend=reference", *extra,
            "model.dim=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
            "data.seqlen=64", f"train.steps={STEPS}", "train.device=cpu", "train.dtype=float32",
            "optim.warmup_steps=2", "train.progress=false", "logger=disabled", f"train.out_dir={out_dir}",
        ])
    return OmegaConf.to_object(cfg)


def available(strategy):
    module = parallel.STRATEGIES[strategy].split(":")[0]
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def train_each(rank, world, configs):
    return [[m["loss"] for m in run(cfg)] for cfg in configs]


def test_two_rank_losses_match_single_process(tmp_path):
    cases = [(s, extra) for s, extra in CASES if available(s)]
    assert cases, "no CP strategy is available"
    baseline = [m["loss"] for m in run(config("none", [], str(tmp_path)))]
    assert baseline[-1] < baseline[0]
    accum_baseline = [m["loss"] for m in run(config("none", ["train.grad_accum=2"], str(tmp_path)))]
    cases.append(("none", ["parallel.dp=2"]))
    configs = [config(s, extra, str(tmp_path)) for s, extra in cases]
    per_rank = run_ranks(train_each, 2, configs)
    for (strategy, extra), rank0, rank1 in zip(cases, *per_rank):
        assert rank0 == rank1, f"{strategy} {extra}: ranks disagree on the logged loss"
        want = accum_baseline if strategy == "none" else baseline
        assert rank0 == pytest.approx(want, abs=1e-4), f"{strategy} {extra}"
    missing = sorted({s for s, _ in CASES} - {s for s, _ in cases})
    if missing:
        pytest.xfail(f"strategies not yet in this build: {missing}; the others matched")
