"""Launch on a real Slurm cluster: slurm/train.sbatch as a 2-node job (one torchrun per
node, c10d rendezvous, gloo) and the Hydra submitit launcher (hydra/launcher=slurm, which
is submitit_slurm with our settings) on the same cluster; plus make_sbatch's rendering.

The cluster tests skip only where `sbatch` is absent; CI starts a cluster with .ci/slurm.sh.
"""
import glob
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
TINY = ["model.dim=32", "model.n_layers=2", "data.seqlen=64", "train.steps=4", "train.device=cpu",
        "optim.warmup_steps=1", "logger=disabled", "train.progress=false", "parallel.dp=2"]
needs_slurm = pytest.mark.skipif(shutil.which("sbatch") is None,
                                 reason="sbatch not found; start a local cluster with .ci/slurm.sh")
LOSS_LINE = re.compile(r"^step (\d+) loss ([0-9.]+)", re.M)


def env():
    e = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "SLURM_"))}
    e.update(PYTHONPATH=ROOT, OMP_NUM_THREADS="1", PYTHON=sys.executable)
    return e


def assert_trained(log: str, steps: int, world: int):
    assert f"world {world}: dp={world}" in log, log[-3000:]
    found = [(int(s), float(v)) for s, v in LOSS_LINE.findall(log)]
    assert [s for s, _ in found] == list(range(1, steps + 1)), log[-3000:]
    assert all(0 < v < 20 for _, v in found)


@needs_slurm
def test_sbatch_two_nodes_one_torchrun_each(tmp_path):
    proc = subprocess.run(
        ["sbatch", "--wait", "--nodes=2", f"--output={tmp_path}/job-%j.out", "slurm/train.sbatch", *TINY],
        cwd=ROOT, env={**env(), "RUN_DIR": str(tmp_path / "run")}, capture_output=True, text=True, timeout=600,
    )
    logs = glob.glob(str(tmp_path / "job-*.out"))
    log = open(logs[0]).read() if logs else ""
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}\n{log[-4000:]}"
    assert "2 node(s) x 1 rank(s)" in log
    assert_trained(log, 4, 2)


@needs_slurm
def test_hydra_submitit_launcher_on_slurm(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "train", "-m", "hydra/launcher=slurm", "hydra.launcher.nodes=2",
         "hydra.launcher.tasks_per_node=1", "hydra.launcher.timeout_min=10", f"hydra.sweep.dir={tmp_path}/sweep", *TINY],
        cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600,
    )
    logs = sorted(glob.glob(str(tmp_path / "sweep" / ".submitit" / "*" / "*_log.out")))
    text = {os.path.basename(p): open(p).read() for p in logs}
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}\n{text}"
    assert len(logs) == 2, logs  # one log per Slurm task (= rank)
    assert_trained(text[os.path.basename(logs[0])], 4, 2)


def test_make_sbatch_fills_the_template_and_refuses_zero_nodes(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    from make_sbatch import render

    text = render(["hydra.launcher.nodes=4", "hydra.launcher.gpus_per_node=8", "hydra.launcher.partition=gpu",
                   "hydra.launcher.account=proj", "hydra.launcher.timeout_min=90", "parallel=ring", "engine=megatron",
                   "parallel.tp=2"])
    for line in ["#SBATCH --nodes=4", "#SBATCH --gpus-per-node=8", "#SBATCH --partition=gpu",
                 "#SBATCH --account=proj", "#SBATCH --time=01:30:00", "export NPROC_PER_NODE=${NPROC_PER_NODE:-8}",
                 "set -- parallel=ring engine=megatron parallel.tp=2 \"$@\"", "slurm/launch.sh\" train"]:
        assert line in text, line
    with pytest.raises(ValueError, match="hydra.launcher.nodes=0 must be a positive number of nodes"):
        render(["hydra.launcher.nodes=0"])
    with pytest.raises(ValueError, match=r"parallel.tp=3 \* parallel.dp=1 must divide the number of ranks \(8\)"):
        render(["hydra.launcher.nodes=1", "hydra.launcher.gpus_per_node=8", "parallel.tp=3"])
