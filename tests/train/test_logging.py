"""The offline wandb run of a training run: stable metric names, the config as run, one wandb
run per run folder across restarts, and a killed attempt's history kept."""
import os
import signal
import subprocess
import sys
import time

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from tests.train.wandb_records import offline_runs, read_run
from train.config import register
from train.loop import run

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
CONF = os.path.join(ROOT, "conf")
METRICS = {"loss", "lr", "grad_norm", "tokens_per_s", "tokens_per_s_per_rank", "mfu", "tflops", "attn_imbalance",
           "comm_bytes", "memory/peak_mb", "time/step_s", "time/fwd_bwd_s", "time/optim_s"}
TINY = ["model.dim=32", "data.seqlen=64", "train.progress=false", "logger.mode=offline"]


def config(*overrides):
    register()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return OmegaConf.to_object(compose("config", overrides=[*TINY, *overrides]))


def clean_wandb_env(monkeypatch):
    for key in [k for k in os.environ if k.startswith("WANDB_")]:
        monkeypatch.delenv(key)


def test_offline_run_has_the_metric_names_and_the_config_as_run(tmp_path, monkeypatch):
    clean_wandb_env(monkeypatch)
    history = run(config("parallel=auto", "train.steps=3", "train.peak_tflops=1.0", f"train.out_dir={tmp_path}"))
    runs = offline_runs(str(tmp_path))
    assert len(runs) == 1
    logged = read_run(runs[0])
    assert len(logged["history"]) == 3
    for row, metrics in zip(logged["history"], history):
        assert METRICS <= set(row), f"missing: {METRICS - set(row)}"
        assert row["loss"] == metrics["loss"]
    assert logged["config"]["train"]["steps"] == 3
    assert logged["config"]["model"]["dim"] == 32
    parallel = logged["config"]["parallel"]
    assert (parallel["cp"], parallel["dp"], parallel["tp"], parallel["world"]) == (1, 1, 1, 1)
    assert parallel["strategy"] == "auto" and parallel["choice"] and parallel["balancer"]
    assert logged["name"] == f"run-auto({parallel['choice']})"  # outside Hydra there is no experiment / model name


def test_a_second_attempt_in_the_same_folder_resumes_the_same_wandb_run(tmp_path, monkeypatch):
    clean_wandb_env(monkeypatch)
    common = ["checkpoint=default", "checkpoint.every=2", f"train.out_dir={tmp_path}", "train.steps=4"]
    run(config(*common), stop_at_step=2)
    run(config(*common))
    runs = offline_runs(str(tmp_path))
    assert len(runs) == 2 and runs[0].rsplit("-", 1)[1] == runs[1].rsplit("-", 1)[1], runs  # run-<id>.wandb
    assert [r["loss"] is not None for r in read_run(runs[1])["history"]] == [True, True]


def test_a_killed_attempt_keeps_its_history_up_to_its_last_steps(tmp_path, monkeypatch):
    clean_wandb_env(monkeypatch)
    cmd = [sys.executable, "-m", "train", *TINY, "train.steps=1000", f"train.out_dir={tmp_path}"]
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "out.log", "w") as out:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while "step 8 loss" not in (tmp_path / "out.log").read_text():
            assert proc.poll() is None and time.time() < deadline, (tmp_path / "out.log").read_text()[-3000:]
            time.sleep(0.05)
        # every step logged by now has the flush interval (0.2 s) five times over before the kill;
        # steps logged during that second may be lost (how many depends on the machine's speed)
        logged_before = (tmp_path / "out.log").read_text().count(" loss ")
        time.sleep(1.0)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    printed = (tmp_path / "out.log").read_text().count(" loss ")
    runs = offline_runs(str(tmp_path))
    assert len(runs) == 1
    history = read_run(runs[0], wait_s=2.0)["history"]
    assert len(history) >= max(8, logged_before), (len(history), logged_before, printed)
    assert [r["_step"] for r in history] == list(range(1, len(history) + 1))  # a prefix, nothing skipped
