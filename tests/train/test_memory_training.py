"""Training with the memory options (train.activation_checkpoint / loss_chunk / mlp_chunk):
2-rank runs under ddp with ring and ulysses, DeepSpeed ZeRO-3 with ring and megatron TP give
the per-step losses and gradient norms of the same run without them, and a run with them
resumes bitwise.  The logged comm_bytes count the CP forward traffic that full checkpointing
repeats (twice that of the plain run; selective: the same).  One spawn of 2 ranks runs every case.
"""
import os

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from tests.distributed import run_ranks
from train.config import register
from train.loop import run

CONF = os.path.join(os.path.dirname(__file__), "..", "..", "conf")
STEPS = 3
SELECTIVE = ["train.activation_checkpoint=selective"]
FULL_CHUNKED = ["train.activation_checkpoint=full", "train.loss_chunk=24", "train.mlp_chunk=20"]
SETUPS = [
    ["parallel=ring"],
    ["parallel=ulysses"],
    ["parallel=ring", "engine=deepspeed_zero3"],
    ["engine=megatron", "parallel.tp=2"],
]


def config(overrides, out_dir):
    register()
    with initialize_config_dir(config_dir=os.path.abspath(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[
            "+parallel.options.backend=reference", *overrides,
            "model.dim=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
            "data.seqlen=64", f"train.steps={STEPS}", "train.device=cpu", "train.dtype=float32",
            "optim.warmup_steps=1", "train.progress=false", "logger=disabled", f"train.out_dir={out_dir}",
        ])
    return OmegaConf.to_object(cfg)


def losses(cfg, **kwargs):
    return [value for m in run(cfg, **kwargs) for value in (m["loss"], m["grad_norm"])]


def each_rank(rank, world, root):
    results = {}
    for i, setup in enumerate(SETUPS):
        for name, memory in (("none", []), ("selective", SELECTIVE), ("full", FULL_CHUNKED)):
            history = run(config([*setup, *memory], os.path.join(root, f"{i}{name}")))
            results[i, name] = [value for m in history for value in (m["loss"], m["grad_norm"])]
            results[i, name, "comm"] = [m["comm_bytes"] for m in history]
    resume = ["parallel.dp=2", *FULL_CHUNKED, "checkpoint=default", "checkpoint.every=2", f"checkpoint.dir={root}/ckpt"]
    results["stopped"] = losses(config(resume, os.path.join(root, "first")), stop_at_step=2)
    results["resumed"] = losses(config([*resume, "checkpoint.resume=auto"], os.path.join(root, "second")))
    results["straight"] = losses(config(["parallel.dp=2", *FULL_CHUNKED], os.path.join(root, "straight")))
    return results


def test_memory_options_train_like_the_plain_run_and_resume_bitwise(tmp_path):
    for results in run_ranks(each_rank, 2, str(tmp_path), timeout=600):
        for i, setup in enumerate(SETUPS):
            want = results[i, "none"]
            assert want[-2] < want[0]  # the loss went down
            for name in ("selective", "full"):
                assert results[i, name] == pytest.approx(want, rel=1e-5), f"{setup} {name}"
            comm = results[i, "none", "comm"]
            assert results[i, "selective", "comm"] == comm
            assert results[i, "full", "comm"] == [2 * c for c in comm]
            assert all(c > 0 for c in comm) == ("parallel.tp=2" not in setup)  # TP alone: no CP traffic
        assert results["stopped"] + results["resumed"] == results["straight"]


def test_offload_on_cpu_fails_before_training(tmp_path):
    with pytest.raises(ValueError, match="train.activation_offload=true"):
        run(config(["train.activation_offload=true"], str(tmp_path)))
