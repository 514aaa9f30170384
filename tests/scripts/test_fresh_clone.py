"""The commands that read document lengths work with no ../shared and $LONGCTX_DOCLENS unset,
run from a folder outside the clone (the packaged distribution is the default)."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

COMMANDS = {
    "train data=synthetic": ["-m", "train", "data=synthetic", "train.steps=2", "data.seqlen=64", "model=tiny",
                             "model.dim=32", "logger=disabled", "train.progress=false", "data.num_docs=50",
                             "hydra.run.dir=run"],
    "bench_cp": ["-m", "scripts.bench_cp", "strategies=[ring]", "peers=[]", "balancers=[headtail]",
                 "masks=[document]", "seqlens=[64]", "worlds=[1]", "heads=[[2,2]]", "head_dim=8", "warmup=0",
                 "repeats=1", "plots=false", "out_dir=bench"],
    "simulate_cp validate": ["-m", "scripts.simulate_cp", "validate"],
    "simulate_cp straggle": ["-m", "scripts.simulate_cp", "straggle", "--gpus", "16", "--tp", "2", "--cp", "2",
                             "--pp", "2", "--steps", "1", "--tokens", "8192"],
}


@pytest.mark.parametrize("name", list(COMMANDS))
def test_runs_without_shared_data(tmp_path, name):
    env = {k: v for k, v in os.environ.items() if k != "LONGCTX_DOCLENS"}
    env.update(PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, *COMMANDS[name]], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    if name == "bench_cp":
        assert (tmp_path / "bench" / "results.jsonl").read_text().count('"correct": true') == 1
    if name.startswith("simulate_cp"):
        assert "| cad |" in proc.stdout or "DistCA" in proc.stdout
