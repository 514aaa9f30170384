"""The offline wandb run of a training run holds the stable metric names and the config."""
import os

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from tests.train.wandb_records import offline_runs, read_run
from train.config import register
from train.loop import run

CONF = os.path.join(os.path.dirname(__file__), "..", "..", "conf")
METRICS = {"loss", "lr", "grad_norm", "tokens_per_s", "tokens_per_s_per_rank", "mfu", "tflops", "attn_imbalance",
           "comm_bytes", "memory/peak_mb", "time/step_s", "time/fwd_bwd_s", "time/optim_s"}


def test_offline_run_has_the_metric_names_and_config(tmp_path, monkeypatch):
    for key in [k for k in os.environ if k.startswith("WANDB_")]:
        monkeypatch.delenv(key)
    register()
    with initialize_config_dir(config_dir=os.path.abspath(CONF), version_base="1.3"):
        cfg = OmegaConf.to_object(compose("config", overrides=[
            "model.dim=32", "data.seqlen=64", "train.steps=3", "train.peak_tflops=1.0", "train.progress=false",
            "logger.mode=offline", f"train.out_dir={tmp_path}",
        ]))
    history = run(cfg)
    runs = offline_runs(str(tmp_path))
    assert len(runs) == 1
    logged = read_run(runs[0])
    assert len(logged["history"]) == 3
    for row, metrics in zip(logged["history"], history):
        assert METRICS <= set(row), f"missing: {METRICS - set(row)}"
        assert row["loss"] == metrics["loss"]
    assert logged["config"]["train"]["steps"] == 3
    assert logged["config"]["model"]["dim"] == 32
