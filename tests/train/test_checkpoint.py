"""Checkpointer: atomic commit, keep-last-N, automatic resume, interrupted writes, bad settings."""
import multiprocessing as mp
import os
import signal

import pytest
import torch

from train import checkpoint
from train.checkpoint import Checkpointer, complete_checkpoints
from train.config import CheckpointConfig, Config
from train.engines.base import Engine


def toy_engine(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    cfg = Config()
    cfg.train.steps, cfg.optim.warmup_steps = 50, 3
    return Engine(model, cfg, None)


def train_step(engine, step):
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(5, 6, generator=g)
    loss = engine.module(x).pow(2).mean() + 0.01 * torch.rand(())  # draws from the global RNG too
    engine.backward(loss, last_micro=True)
    engine.step()
    return float(loss.detach())


def params(engine):
    return [p.detach().clone() for p in engine.model.parameters()]


def test_rotation_resume_and_exact_continuation(tmp_path):
    cfg = CheckpointConfig(every=2, dir=str(tmp_path), keep=2, resume="auto")
    engine = toy_engine()
    ckpt = Checkpointer(cfg, 0, 1)
    assert ckpt.resume(engine) is None  # nothing saved yet
    losses = []
    for step in range(1, 7):
        losses.append(train_step(engine, step))
        ckpt.maybe_save(step, engine, lambda: {"step": step})
    assert [s for s, _ in complete_checkpoints(str(tmp_path))] == [4, 6]
    assert sorted(os.listdir(tmp_path)) == ["step_00000004", "step_00000006"]
    after6 = params(engine)
    reference = [train_step(engine, step) for step in (7, 8)]

    fresh = toy_engine(seed=123)
    client = Checkpointer(cfg, 0, 1).resume(fresh)
    assert client == {"step": 6}
    for a, b in zip(params(fresh), after6):
        assert torch.equal(a, b)
    assert fresh.scheduler.last_epoch == 6
    assert [train_step(fresh, step) for step in (7, 8)] == reference  # optimizer state and RNG restored


def _die_while_saving(root):
    """Save step 1, then get SIGKILLed half-way through writing step 2."""
    engine = toy_engine()
    ckpt = Checkpointer(CheckpointConfig(every=1, dir=root, keep=3), 0, 1)
    train_step(engine, 1)
    ckpt.save(1, engine, {"step": 1})
    train_step(engine, 2)
    real_save = engine.save

    def save_then_die(path, client_state):
        real_save(path, client_state)
        os.kill(os.getpid(), signal.SIGKILL)

    engine.save = save_then_die
    ckpt.save(2, engine, {"step": 2})


def test_interrupted_save_keeps_previous_checkpoint(tmp_path):
    root = str(tmp_path)
    proc = mp.get_context("spawn").Process(target=_die_while_saving, args=(root,))
    proc.start()
    proc.join(120)
    assert proc.exitcode == -signal.SIGKILL
    assert sorted(os.listdir(root)) == [".step_00000002.partial", "step_00000001"]
    assert [s for s, _ in complete_checkpoints(root)] == [1]

    cfg = CheckpointConfig(every=1, dir=root, keep=3, resume="auto")
    engine = toy_engine(seed=5)
    ckpt = Checkpointer(cfg, 0, 1)
    assert ckpt.resume(engine) == {"step": 1}
    with pytest.raises(ValueError, match="COMPLETE"):
        checkpoint.validate(CheckpointConfig(resume=os.path.join(root, ".step_00000002.partial")))
    ckpt.save(2, engine, {"step": 2})  # the next save replaces the leftover partial folder
    assert sorted(os.listdir(root)) == ["step_00000001", "step_00000002"]


def test_bad_settings_are_named(tmp_path):
    with pytest.raises(ValueError, match="checkpoint.resume=.*does not exist"):
        checkpoint.validate(CheckpointConfig(resume=str(tmp_path / "nope")))
    with pytest.raises(ValueError, match="checkpoint.keep=0"):
        checkpoint.validate(CheckpointConfig(keep=0))
    with pytest.raises(ValueError, match="checkpoint.every=-1"):
        checkpoint.validate(CheckpointConfig(every=-1))


def test_load_failure_names_the_checkpoint_when_verification_is_off(tmp_path):
    engine = toy_engine()
    path = Checkpointer(CheckpointConfig(every=1, dir=str(tmp_path)), 0, 1).save(1, engine, {"step": 1})
    with open(os.path.join(path, "client_state.pt"), "r+b") as f:
        f.truncate(100)
    unchecked = Checkpointer(CheckpointConfig(dir=str(tmp_path), resume="auto", verify=False), 0, 1)
    with pytest.raises(RuntimeError, match=rf"rank 0 could not load checkpoint {path}: RuntimeError: .*"
                                           r"\(checkpoint.verify=true checks every file before loading\)"):
        unchecked.resume(toy_engine())
