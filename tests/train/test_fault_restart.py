"""Fault tolerance under torchrun: SIGKILL one rank at a random moment after step 10's
checkpoint (a step, a save, or between them); torchrun restarts the group (--max-restarts),
the ranks resume from the newest complete checkpoint, the job finishes, and only the steps
after that checkpoint are redone, with the same losses."""
import os
import random
import re
import signal
import subprocess
import sys
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
EVERY, STEPS = 5, 60


def worker_with_rank(agent_pid: int, rank: int) -> int | None:
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{pid}/environ", "rb") as f:
                environ = f.read().split(b"\0")
        except OSError:
            continue
        if ppid == agent_pid and f"RANK={rank}".encode() in environ:
            return int(pid)
    return None


def test_killed_rank_costs_at_most_the_steps_since_the_last_checkpoint(tmp_path):
    ckpt = tmp_path / "ckpt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max_restarts=1",
           "-m", "train", "model.dim=32", "model.n_layers=2", "data.seqlen=64", f"train.steps={STEPS}",
           "train.device=cpu", "optim.warmup_steps=2", "logger=disabled", "train.progress=false", "parallel.dp=2",
           "checkpoint=default", f"checkpoint.every={EVERY}", f"checkpoint.dir={ckpt}", f"train.out_dir={tmp_path}/run",
           f"hydra.run.dir={tmp_path}/hydra"]
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "out.log", "w") as out:
        agent = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.time() + 300
        while not (ckpt / "step_00000010").exists():
            assert agent.poll() is None and time.time() < deadline, open(tmp_path / "out.log").read()[-3000:]
            time.sleep(0.05)
        delay = random.uniform(0.0, 1.0)  # in the failure messages below, to replay a kill point
        time.sleep(delay)
        victim = worker_with_rank(agent.pid, 1)
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        rc = agent.wait(timeout=300)
    log = open(tmp_path / "out.log").read()
    assert rc == 0, (delay, log[-4000:])
    before, marker, after = log.partition("resumed from step ")
    assert marker, (delay, log[-4000:])
    resumed = int(after.split()[0])
    assert resumed >= 10 and resumed % EVERY == 0
    first = {int(s): v for s, v in re.findall(r"^step (\d+) loss (\S+)", before, re.M)}
    second = {int(s): v for s, v in re.findall(r"^step (\d+) loss (\S+)", after, re.M)}
    assert sorted(second) == list(range(resumed + 1, STEPS + 1)), "the job did not finish after the restart"
    redone = sorted(set(first) & set(second))
    assert redone == list(range(resumed + 1, max(first) + 1)) and len(redone) <= EVERY, (redone, resumed, delay)
    assert all(first[s] == second[s] for s in redone), f"redone steps must repeat the same losses (delay {delay})"
