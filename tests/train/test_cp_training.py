"""CP training equivalence: 2-rank runs under each CP strategy give the per-step losses of
a single-process parallel=none run on the same data and seed (float32, reference kernel).
And data parallelism: parallel=none with dp=2 equals one process accumulating 2 micro-batches.

The baselines run here in the test process; ONE spawn of 2 ranks runs every case.
"""
import os

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from tests.distributed import run_ranks
from train.config import register
from train.loop import run

CONF = os.path.join(os.path.dirname(__file__), "..", "..", "conf")
STEPS = 20

WINDOW = ["train.mask=document+window", "train.window=24"]
# (strategy yaml, its overrides, the single-process baseline's overrides); usp on 2 ranks
# is one of its degrees x 1; parallel=none with dp=2 must equal one process accumulating 2
CASES = [
    ("ring", [], []),
    ("ring", WINDOW, WINDOW),
    ("allgather", [], []),
    ("ulysses", [], []),
    ("usp", ["parallel.options.ulysses_degree=2", "parallel.options.ring_degree=1"], []),
    ("usp", ["parallel.options.ulysses_degree=1", "parallel.options.ring_degree=2"], []),
    ("cad", [], []),
    ("none", ["parallel.dp=2"], ["train.grad_accum=2"]),
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


def train_each(rank, world, configs):
    return [[m["loss"] for m in run(cfg)] for cfg in configs]


def test_two_rank_losses_match_single_process(tmp_path):
    baselines = {}
    for _, _, base in CASES:
        if tuple(base) not in baselines:
            baselines[tuple(base)] = [m["loss"] for m in run(config("none", base, str(tmp_path)))]
    assert all(losses[-1] < losses[0] for losses in baselines.values())
    configs = [config(strategy, extra, str(tmp_path)) for strategy, extra, _ in CASES]
    per_rank = run_ranks(train_each, 2, configs)
    for (strategy, extra, base), rank0, rank1 in zip(CASES, *per_rank):
        assert rank0 == rank1, f"{strategy} {extra}: ranks disagree on the logged loss"
        assert rank0 == pytest.approx(baselines[tuple(base)], abs=1e-4), f"{strategy} {extra}"


def usp_on_the_mesh(rank, world, cfg):
    """Train with usp, counting strategy builds; report the losses and whether the Ulysses
    all-to-all ran over the rank grid's ulysses group."""
    import train.loop as loop

    builds = []
    build = loop.parallel.build

    def counting_build(*args, **kwargs):
        builds.append(kwargs.get("mesh"))
        return build(*args, **kwargs)

    loop.parallel.build = counting_build
    try:
        trainer = loop.Trainer(cfg)
        losses = [m["loss"] for m in loop.train(trainer, None)]
    finally:
        loop.parallel.build = build
    return {"losses": losses, "builds": len(builds), "mesh_given": all(m is trainer.groups for m in builds),
            "uses_ulysses_group": trainer.cp.exchange.group is trainer.groups.ulysses_group}


def test_usp_uses_the_grids_ulysses_group_and_is_built_once_for_a_causal_mask(tmp_path):
    causal = ["train.mask=causal", "train.steps=3"]
    baseline = [m["loss"] for m in run(config("none", causal, str(tmp_path)))]
    cfg = config("usp", [*causal, "parallel.options.ulysses_degree=2"], str(tmp_path))
    for result in run_ranks(usp_on_the_mesh, 2, cfg):
        assert result["uses_ulysses_group"] and result["mesh_given"]
        assert result["builds"] == 1, "a causal mask is the same every step: one strategy for the run"
        assert result["losses"] == pytest.approx(baseline, abs=1e-4)
