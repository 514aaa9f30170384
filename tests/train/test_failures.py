"""A failing or stopped rank ends a torchrun job fast, and the last thing printed says why.

Error on one rank (faults.inject=raise@1:3): the job exits non-zero within seconds of the
error (rank 0 would otherwise train on for a million steps) and torchrun's root cause, printed last, names rank 1 and step 3. A SIGSTOPped rank:
the peer watchdog ends the job within train.dist_timeout_s + 15 s with one message naming
the stopped rank and the step.
"""
import os
import re
import signal
import subprocess
import sys
import time

from tests.train.test_fault_restart import ROOT, worker_with_rank

TINY = ["model.dim=32", "model.n_layers=2", "data.seqlen=64", "train.device=cpu", "optim.warmup_steps=2",
        "logger=disabled", "train.progress=false", "parallel.dp=2"]


def launch(tmp_path, *overrides):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "train",
           *TINY, f"train.out_dir={tmp_path}/run", f"hydra.run.dir={tmp_path}/hydra", *overrides]
    out = open(tmp_path / "out.log", "w")
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


def wait_for_line(agent, log_path, pattern, timeout=120):
    deadline = time.time() + timeout
    while not re.search(pattern, open(log_path).read(), re.M):
        if agent.poll() is not None or time.time() > deadline:  # read once more: it may have just been written
            assert re.search(pattern, open(log_path).read(), re.M), open(log_path).read()[-3000:]
            return
        time.sleep(0.05)


def root_cause(log: str) -> str:
    """torchrun's 'Root Cause' block, which must close the output."""
    head, found, tail = log.rpartition("Root Cause (first observed failure):")
    assert found, log[-3000:]
    assert tail.rstrip().endswith("=" * 20), "the root cause must be the last thing printed"
    return tail


def test_error_on_one_rank_ends_the_job_within_seconds_and_is_reported_last(tmp_path):
    agent = launch(tmp_path, "train.steps=1000000", "faults.inject=raise@1:3")
    wait_for_line(agent, tmp_path / "out.log", r"InjectedFault")  # rank 1's own report of its error
    raised = time.time()
    rc = agent.wait(timeout=120)
    ended = time.time() - raised
    log = open(tmp_path / "out.log").read()
    assert rc != 0 and ended < 15, (rc, ended, log[-3000:])
    cause = root_cause(log)
    assert "rank      : 1 " in cause
    assert "InjectedFault: faults.inject=raise@1:3: rank 1 raised at step 3" in cause
    lines = [line.strip() for line in cause.splitlines() if line.strip()]
    assert lines[-2] == "[longctx] rank 1 failed at step 3; the other ranks are stopped by the launcher", lines[-4:]
    assert not re.search(r"^step [4-9] loss", log, re.M), "rank 0 must not train on"


def test_stopped_rank_ends_the_job_within_the_timeout_and_is_named(tmp_path):
    timeout_s = 10
    agent = launch(tmp_path, "train.steps=1000000", f"train.dist_timeout_s={timeout_s}")
    wait_for_line(agent, tmp_path / "out.log", r"^step 3 loss")
    victim = worker_with_rank(agent.pid, 1)
    assert victim is not None
    os.kill(victim, signal.SIGSTOP)
    stopped = time.time()
    try:
        rc = agent.wait(timeout=timeout_s + 60)
    finally:
        if agent.poll() is None:
            os.kill(victim, signal.SIGKILL)
            agent.kill()
    ended = time.time() - stopped
    log = open(tmp_path / "out.log").read()
    assert rc != 0 and ended < timeout_s + 15, (rc, ended, log[-3000:])
    message = re.findall(r"^\[longctx watchdog\] (.*)$", log, re.M)
    assert len(message) == 1, log[-3000:]
    assert re.match(r"rank 1 stopped answering at step \d+: no heartbeat for \d+s \(train.dist_timeout_s=10;", message[0])
    cause = root_cause(log)
    assert "PeerStopped: " + message[0] in cause
    assert "Application timeout" not in log and "a peer rank died" not in log
