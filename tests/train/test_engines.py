"""Engine equivalence: DeepSpeed ZeRO 1/2/3 and megatron-core TP, with and without ring CP,
give the per-step losses (and gradient norms) of a single-process run on the same data
and seed for 10+ steps. One spawn of 2 ranks and one of 4 ranks run every case.

A 2-rank data-parallel case equals one process accumulating 2 micro-batches; a CP or TP
case (dp = 1) equals one process on the same sequence.
"""
import os

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from tests.distributed import run_ranks
from train.config import register
from train.loop import run
from train.validate import validate

CONF = os.path.join(os.path.dirname(__file__), "..", "..", "conf")
STEPS = 10
RING = ["parallel=ring"]

# (engine overrides, parallel overrides, the single-process baseline's overrides)
CASES_2 = [
    (["engine=deepspeed", "engine.options.zero_stage=1"], ["parallel.dp=2"], ["train.grad_accum=2"]),
    (["engine=deepspeed", "engine.options.zero_stage=2"], RING, []),
    (["engine=deepspeed_zero3"], ["parallel.dp=2"], ["train.grad_accum=2"]),
    (["engine=deepspeed_zero3"], RING, []),
    (["engine=megatron"], ["parallel.tp=2"], []),
    (["engine=megatron"], [*RING, "parallel.dp=1"], []),
]
CASES_4 = [
    (["engine=megatron"], [*RING, "parallel.tp=2"], []),
]


def config(overrides, out_dir):
    register()
    with initialize_config_dir(config_dir=os.path.abspath(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[
            *overrides, "model.dim=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
            "data.seqlen=64", f"train.steps={STEPS}", "train.device=cpu", "train.dtype=float32",
            "optim.warmup_steps=2", "train.progress=false", "logger=disabled", f"train.out_dir={out_dir}",
        ])
    return OmegaConf.to_object(cfg)


def train_each(rank, world, configs):
    return [[(m["loss"], m["grad_norm"]) for m in run(cfg)] for cfg in configs]


def check(cases, world, tmp_path):
    baselines = {}
    for _, _, base in cases:
        if tuple(base) not in baselines:
            baselines[tuple(base)] = [(m["loss"], m["grad_norm"]) for m in run(config(base, str(tmp_path)))]
    configs = [config([*engine, *par], str(tmp_path)) for engine, par, _ in cases]
    per_rank = run_ranks(train_each, world, configs, timeout=600)
    for i, (engine, par, base) in enumerate(cases):
        name = " ".join(engine + par)
        got = per_rank[0][i]
        assert all(r[i] == got for r in per_rank), f"{name}: ranks disagree on the logged loss"
        want = baselines[tuple(base)]
        assert [loss for loss, _ in got] == pytest.approx([loss for loss, _ in want], abs=1e-4), name
        assert [norm for _, norm in got] == pytest.approx([norm for _, norm in want], rel=1e-3), name


def test_two_ranks_match_single_process(tmp_path):
    check(CASES_2, 2, tmp_path)


def test_four_ranks_tp_x_cp_match_single_process(tmp_path):
    check(CASES_4, 4, tmp_path)


@pytest.mark.parametrize("overrides, world, match", [
    (["engine=deepspeed", "engine.options.zero_stage=4", "parallel.dp=2"], 2, "engine.options.zero_stage=4 must be one of 0, 1, 2, 3"),
    (["engine=megatron", "parallel.tp=3", "model.n_heads=4", "parallel.dp=1"], 3, "model.n_heads=4 is not divisible by parallel.tp=3"),
    (["engine=megatron", "parallel=ring", "parallel.tp=2", "parallel.cp=2"], 2, r"tp\*cp=2\*2"),
    (["engine=deepspeed", "parallel.tp=2"], 2, "parallel.tp=2 needs engine=megatron"),
    (["checkpoint=default", "checkpoint.resume=/nonexistent/step_00000010"], 1, "checkpoint.resume=.* does not exist"),
])
def test_bad_settings_fail_before_any_process_group(overrides, world, match, tmp_path):
    import torch.distributed as dist

    with pytest.raises(ValueError, match=match):
        validate(config(overrides, str(tmp_path)), world)
    assert not dist.is_initialized()
