"""The Hydra app around the loop: one run folder per torchrun job, --help, known noise silenced."""
import logging
import os
import subprocess
import sys
import warnings

import pytest
import torch.distributed as dist

from tests.distributed import free_port
from train import main, quiet
from train.config import RUN_DIR_ENV

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def test_ranks_that_start_in_different_seconds_agree_on_one_run_folder(monkeypatch):
    port = free_port()
    agent_store = dist.TCPStore("127.0.0.1", port, is_master=True)  # what torchrun's agent holds
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(port))
    monkeypatch.setenv("TORCHELASTIC_USE_AGENT_STORE", "True")
    chosen = []
    for clock in ("2026-01-01/10-00-00", "2026-01-01/10-00-01"):  # rank 0, then rank 1 a second later
        monkeypatch.delenv(RUN_DIR_ENV, raising=False)
        monkeypatch.setattr(main.time, "strftime", lambda fmt, clock=clock: clock)
        main.agree_on_run_dir()
        chosen.append(os.environ[RUN_DIR_ENV])
    assert chosen == [os.path.join("runs", "2026-01-01/10-00-00")] * 2
    del agent_store


def test_help_has_a_header_and_only_training_groups(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "train", "--help"], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": ROOT}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.startswith("longctx-train: train a Llama-style model")
    assert "torchrun --nproc_per_node 2 -m train parallel=ring" in out
    assert "  parallel: allgather, auto, cad, none, ring, ulysses, usp" in out
    assert "bench" not in out


def test_known_noise_is_dropped_and_other_warnings_kept(monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")  # what install() sets on a CPU machine; restored after
    noise = quiet.KnownNoise()

    def record(name, level, msg):
        return logging.LogRecord(name, level, __file__, 1, msg, None, None)

    assert not noise.filter(record("megatron.core.distributed.fsdp.src.x", logging.INFO, "Detected Megatron Core"))
    assert not noise.filter(record("compilers.C.base", logging.INFO, "gcc -c test.c"))
    assert noise.filter(record("megatron.core.distributed.fsdp.src.x", logging.WARNING, "a real problem"))
    assert noise.filter(record("train.loop", logging.INFO, "step 1 loss 5.0"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet.install()
        warnings.warn("Transformer Engine and Apex are not installed. Falling back to Torch optimizers.", UserWarning)
        warnings.warn("something else is wrong", UserWarning)
    assert [str(w.message) for w in caught] == ["something else is wrong"]


def test_known_prints_pass_other_lines_on(capsys):
    with quiet.known_prints():
        print("DeepSpeed deepspeed.ops.comm.deepspeed_shm_comm_op built successfully")
        print("a line someone needs")
    assert capsys.readouterr().out == "a line someone needs\n"


@pytest.mark.parametrize("name", ["small_synthetic", "gpu_small_synthetic"])
def test_the_gpu_experiment_keeps_its_old_name(name):
    from tests.train.test_loop import config

    cfg = config(f"experiment={name}")
    assert (cfg.model.dim, cfg.data.source, cfg.train.steps) == (512, "synthetic", 200)


PROBE = """
import os, sys, time
from train import main
main.agree_on_run_dir()
print("attempt", os.environ["TORCHELASTIC_RESTART_COUNT"], os.environ["LONGCTX_RUN_DIR"], flush=True)
if os.environ["TORCHELASTIC_RESTART_COUNT"] == "0" and os.environ["RANK"] == "1":
    time.sleep(1.5)
    sys.exit(1)
time.sleep(2)
"""


def test_a_restarted_torchrun_attempt_keeps_the_run_folder(tmp_path):
    (tmp_path / "probe.py").write_text(PROBE)
    env = {k: v for k, v in os.environ.items() if k != RUN_DIR_ENV}
    env.update(PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "--max_restarts=1", "probe.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = [line.split()[1:] for line in proc.stdout.splitlines() if line.startswith("attempt")]
    assert sorted(attempt for attempt, _ in seen) == ["0", "0", "1", "1"], proc.stdout
    assert len({folder for _, folder in seen}) == 1, seen  # attempt 1 starts seconds later
