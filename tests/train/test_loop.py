"""The engine's optimizer steps, the LR schedule, setting validation and the Hydra app end to end."""
import glob
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import kernels
from kernels import MaskSpec
from models.llama import Llama, LlamaConfig
from train.config import register
from train.engines import build
from train.optim import warmup_cosine
from train.validate import validate

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def config(*overrides):
    register()
    with initialize_config_dir(config_dir=os.path.join(ROOT, "conf"), version_base="1.3"):
        return OmegaConf.to_object(compose("config", overrides=list(overrides)))


def test_optimizer_steps_reduce_the_loss():
    torch.manual_seed(0)
    cfg = config("optim.warmup_steps=0", "train.steps=1000")
    model = Llama(LlamaConfig(vocab_size=40, dim=32, n_heads=4, n_kv_heads=2))
    engine = build("ddp", model, cfg, None)
    tokens = torch.randint(0, 40, (33,))
    pos, mask = torch.arange(32), MaskSpec(causal=True)

    def attn(q, k, v):
        return kernels.attention(q, k, v, mask, backend="reference")[0]

    losses = []
    for _ in range(15):
        loss = F.cross_entropy(engine.module(tokens[:-1], pos, attn), tokens[1:])
        engine.backward(loss, last_micro=True)
        out = engine.step()
        losses.append(loss.item())
        assert out["grad_norm"] > 0 and out["lr"] > 0
    assert losses[-1] < 0.7 * losses[0]


def test_warmup_then_cosine():
    assert warmup_cosine(0, 100, 10, 0.1) == pytest.approx(0.1)
    assert warmup_cosine(9, 100, 10, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(10, 100, 10, 0.1) == pytest.approx(1.0)
    assert warmup_cosine(99, 100, 10, 0.1) == pytest.approx(0.1)
    mid = warmup_cosine(10 + 89 // 2, 100, 10, 0.1)
    assert 0.5 < mid < 0.6


@pytest.mark.parametrize("overrides, world, match", [
    (["train.mask=window"], 1, "train.window"),
    (["train.mask=document+window"], 1, "train.window"),
    (["train.window=8"], 1, "train.window is only for those"),
    (["optim.lr=-1"], 1, r"optim.lr=-1.0 must be a learning rate >= 0"),
    (["optim.betas=[0.9,1.5]"], 1, r"optim.betas=\[0.9, 1.5\] must be two numbers in \[0, 1\)"),
    (["optim.warmup_steps=-2"], 1, "optim.warmup_steps=-2 must be >= 0"),
    (["train.mask=sliding"], 1, "train.mask"),
    (["parallel.dp=3"], 2, "parallel.dp"),
    ([], 2, "parallel.strategy=none with cp=2"),
    (["parallel=ring", "parallel.cp=4"], 2, r"tp\*cp=1\*4"),
    (["parallel=ring", "parallel.tp=2"], 2, "engine=megatron"),
])
def test_bad_settings_raise_value_error_naming_them(overrides, world, match):
    with pytest.raises(ValueError, match=match):
        validate(config(*overrides), world)


def test_app_trains_with_progress_bar_and_offline_wandb(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "train", "train.steps=40", "data.seqlen=128", "model.dim=64",
         "optim.warmup_steps=5", f"hydra.run.dir={tmp_path}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "train: 100%" in proc.stderr and "40/40" in proc.stderr
    runs = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(runs) == 1 and os.path.getsize(runs[0]) > 0
    log = (tmp_path / "train.log").read_text()
    summary = log.split("trained 40 steps: loss ")[1]
    first, last = float(summary.split(" ")[0]), float(summary.split("-> ")[1].split(" ")[0])
    assert last < first - 1.0


def test_trains_on_a_prepared_token_folder(tmp_path):
    from scripts.prepare_data import prepare
    from train.loop import run

    (tmp_path / "in").mkdir()
    for i in range(5):
        (tmp_path / "in" / f"{i}.txt").write_text(f"document {i}: " + "abc " * (10 + 7 * i))
    prepare(str(tmp_path / "in"), str(tmp_path / "tok"))
    common = ["data.seqlen=64", "model.dim=32", "train.steps=3", "logger=disabled", "train.progress=false",
              f"train.out_dir={tmp_path}"]
    history = run(config("data=tokens", f"data.path={tmp_path / 'tok'}", *common))
    assert len(history) == 3 and all(m["tokens_per_s"] > 0 for m in history)
    with pytest.raises(ValueError, match="model.vocab_size=100"):
        run(config("data=tokens", f"data.path={tmp_path / 'tok'}", "model.vocab_size=100", *common))


@pytest.mark.parametrize("mask, window", [("causal", None), ("document", None), ("window", 5),
                                          ("document+window", 5)])
def test_attention_pairs_match_the_dense_mask(mask, window):
    from train.validate import build_mask
    from train.metrics import attention_pairs

    doc_lens = [3, 9, 1, 12]
    tcfg = config(f"train.mask={mask}", f"train.window={window if window else 'null'}").train
    pos = torch.arange(25)
    assert attention_pairs(doc_lens, 25, mask, window) == build_mask(doc_lens, tcfg).pairs(pos, pos)
