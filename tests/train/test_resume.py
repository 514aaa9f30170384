"""Resume exactness and the non-finite-loss policies across ranks.

Train 20 steps straight; then 10 steps that stop with a checkpoint, and a fresh start that
resumes and trains 10 more: the per-step losses are bitwise identical (CPU, same seed) for
ddp, DeepSpeed ZeRO-2 and megatron TP. Then a NaN injected on one rank at step 3: with
nan_policy=raise every rank stops naming the step; with skip the step is dropped on every
rank (no optimizer or LR step) and training carries on. One spawn of 2 ranks runs it all.
"""
import math
import os

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from tests.distributed import run_ranks
from train.config import register
from train.loop import run

CONF = os.path.join(os.path.dirname(__file__), "..", "..", "conf")
ENGINES = [
    ["parallel.dp=2"],
    ["engine=deepspeed", "engine.options.zero_stage=2", "parallel.dp=2"],
    ["engine=megatron", "parallel.tp=2"],
]


def config(overrides, out_dir):
    register()
    with initialize_config_dir(config_dir=os.path.abspath(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[
            "model.dim=32", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2",
            "data.seqlen=64", "train.steps=20", "train.device=cpu", "train.dtype=float32",
            "optim.warmup_steps=2", "train.progress=false", "logger=disabled", f"train.out_dir={out_dir}", *overrides,
        ])
    return OmegaConf.to_object(cfg)


def inject_nan(rank, at_call):
    """Make rank 1's model return NaN logits on its at_call-th forward."""
    import models.llama as llama

    forward, calls = llama.Llama.forward, [0]

    def poisoned(self, *args, **kwargs):
        calls[0] += 1
        out = forward(self, *args, **kwargs)
        return out * math.nan if rank == 1 and calls[0] == at_call else out

    llama.Llama.forward = poisoned
    return lambda: setattr(llama.Llama, "forward", forward)


def each_rank(rank, world, root):
    results = []
    for i, engine in enumerate(ENGINES):
        folder = os.path.join(root, f"engine{i}")
        straight = run(config(engine, os.path.join(folder, "straight")))
        ckpt = [*engine, "checkpoint=default", "checkpoint.every=5", f"checkpoint.dir={folder}/ckpt"]
        first = run(config(ckpt, os.path.join(folder, "first")), stop_at_step=10)
        second = run(config(ckpt, os.path.join(folder, "second")))
        results.append({
            "straight": [m["loss"] for m in straight],
            "first": [(m["step"], m["loss"]) for m in first],
            "second": [(m["step"], m["loss"]) for m in second],
        })
    nan = {}
    for i, engine in enumerate(ENGINES[:2]):
        restore = inject_nan(rank, at_call=3)
        try:
            run(config([*engine, "train.steps=5"], os.path.join(root, f"raise{i}")))
            nan[f"raise{i}"] = None
        except FloatingPointError as e:
            nan[f"raise{i}"] = str(e)
        finally:
            restore()
        restore = inject_nan(rank, at_call=3)
        try:
            skipped = run(config([*engine, "train.steps=6", "faults.nan_policy=skip"], os.path.join(root, f"skip{i}")))
        finally:
            restore()
        nan[f"skip{i}"] = [(m["loss"], m["grad_norm"], m["lr"]) for m in skipped]
    return results, nan


def test_resume_is_bitwise_exact_and_nan_policies_agree_across_ranks(tmp_path):
    per_rank = run_ranks(each_rank, 2, str(tmp_path), timeout=900)
    (results, nan), (results1, nan1) = per_rank
    for engine, r, r1 in zip(ENGINES, results, results1):
        assert r == r1, f"{engine}: ranks disagree"
        assert [s for s, _ in r["first"]] == list(range(1, 11)), engine
        assert [s for s, _ in r["second"]] == list(range(11, 21)), engine
        assert [loss for _, loss in r["first"] + r["second"]] == r["straight"], f"{engine}: resume is not exact"
        assert r["straight"][-1] < r["straight"][0]
    for i in range(2):
        assert "at step 3" in nan[f"raise{i}"] and "its local loss was finite" in nan[f"raise{i}"]
        assert "at step 3" in nan1[f"raise{i}"] and "its local loss was NOT finite" in nan1[f"raise{i}"]
        skipped = nan[f"skip{i}"]
        assert repr(skipped) == repr(nan1[f"skip{i}"])  # nan != nan, so compare the printed values
        assert math.isnan(skipped[2][0]) and math.isnan(skipped[2][1])
        assert all(math.isfinite(loss) for j, (loss, _, _) in enumerate(skipped) if j != 2)
        assert skipped[3][2] == pytest.approx(skipped[2][2]), "the skipped step must not advance the LR schedule"
