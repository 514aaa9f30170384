"""Launch on a real Slurm cluster: slurm/train.sbatch as a 2-node job (one torchrun per
node, c10d rendezvous, gloo), preemption (SIGUSR1 -> checkpoint -> requeue -> resume with
the same losses) and the Hydra submitit launcher (hydra/launcher=slurm, which is
submitit_slurm with our settings) on the same cluster; plus make_sbatch's rendering.

The cluster tests skip only where `sbatch` is absent; CI starts a cluster with .ci/slurm.sh.
"""
import glob
import os
import re
import shutil
import subprocess
import sys
import time

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


def wait_until(predicate, what: str, timeout: float, log_path=None, state=lambda: ""):
    deadline = time.time() + timeout
    while not predicate():
        if time.time() >= deadline:
            tail = open(log_path).read()[-3000:] if log_path and os.path.exists(log_path) else ""
            raise AssertionError(f"timed out waiting for {what}\n{tail}\n{state()}")
        time.sleep(0.2)


def losses(log: str) -> dict[int, str]:
    return {int(s): v for s, v in LOSS_LINE.findall(log)}


@needs_slurm
def test_preemption_checkpoints_requeues_and_resumes_with_the_same_losses(tmp_path):
    """SIGUSR1 to the batch shell (what --signal=B:USR1@120 sends): the trainer checkpoints
    and stops, the job requeues itself, resumes from that checkpoint and finishes; every
    step's loss equals an uninterrupted torchrun run's."""
    steps = 300
    args = [*TINY[:3], f"train.steps={steps}", *TINY[4:], f"hydra.run.dir={tmp_path}/hydra"]
    log_path = tmp_path / "job.out"
    submit = subprocess.run(["sbatch", "--parsable", "--nodes=1", f"--output={log_path}", "slurm/train.sbatch", *args],
                            cwd=ROOT, env={**env(), "RUN_DIR": str(tmp_path / "run"), "NPROC_PER_NODE": "2"},
                            capture_output=True, text=True, timeout=60)
    assert submit.returncode == 0, submit.stderr
    job = submit.stdout.strip().split(";")[0]
    try:
        wait_until(lambda: log_path.exists() and "step 3 loss" in log_path.read_text(), "step 3", 300, log_path)
        subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True, timeout=30)
        # Slurm holds a requeued batch job until its old credential expires (120 s by
        # default). Forcing StartTime=now does not shorten that: the early launch fails with
        # "Job credential revoked" and the job ends for good. So the test waits it out.
        wait_until(lambda: log_path.read_text().count("trained ") == 2, "the resumed job to finish", 420, log_path,
                   lambda: subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout)
    finally:
        subprocess.run(["scancel", job], capture_output=True)
    log = log_path.read_text()
    first, _, second = log.partition("resumed from step ")
    stopped = int(re.search(r"^stopped after step (\d+) \(checkpointed\)", first, re.M).group(1))
    assert int(second.split()[0]) == stopped and stopped < steps, log[-3000:]
    assert sorted(losses(first)) == list(range(1, stopped + 1))
    assert sorted(losses(second)) == list(range(stopped + 1, steps + 1))

    reference = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "train", *args,
         f"train.out_dir={tmp_path}/ref"],
        cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert reference.returncode == 0, reference.stderr[-3000:]
    assert {**losses(first), **losses(second)} == losses(reference.stdout)


@needs_slurm
def test_failing_rank_ends_the_job_and_its_error_is_printed_last(tmp_path):
    """An error on rank 1 of a 2-node job: srun ends both nodes, and launch.sh prints the
    earliest torchrun error record (rank, step, message) after everyone else's output."""
    start = time.time()
    proc = subprocess.run(
        ["sbatch", "--wait", "--nodes=2", f"--output={tmp_path}/job-%j.out", "slurm/train.sbatch", *TINY[:3],
         "train.steps=200", *TINY[4:], "faults.inject=raise@1:3", f"hydra.run.dir={tmp_path}/hydra"],
        cwd=ROOT, env={**env(), "RUN_DIR": str(tmp_path / "run"), "MAX_RESTARTS": "0"}, capture_output=True,
        text=True, timeout=300)
    elapsed = time.time() - start
    log = open(glob.glob(str(tmp_path / "job-*.out"))[0]).read()
    assert proc.returncode != 0 and elapsed < 120, (proc.returncode, elapsed, log[-3000:])
    last = log.strip().splitlines()[-3:]
    assert re.match(r"\[launch\] job \d+ failed \(rc=\d+\); root cause \(torchrun's record node\d.json", last[0]), last
    assert last[1:] == ["  train.faults.InjectedFault: faults.inject=raise@1:3: rank 1 raised at step 3",
                        "  [longctx] rank 1 failed at step 3; the other ranks are stopped by the launcher"], last
