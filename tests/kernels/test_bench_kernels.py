"""scripts/bench_kernels.py's mask table: every mask kind runs through the cpu backend and
S2 rows carry the ideal block-count speed-up."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[2])


def test_mask_table_times_each_kind_against_causal_with_s2_ideal():
    cmd = [sys.executable, "scripts/bench_kernels.py", "--parts", "masks", "--masks", "s2", "sink", "prefix",
           "--mask-seqlens", "512", "--window", "128", "--heads", "8", "--head-dim", "8", "--repeats", "1",
           "--warmup", "0", "--threads", "1"]
    run = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"},
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in run.stdout.splitlines()
            if line.startswith("| causal")}
    assert set(rows) == {"causal", "causal+s2=64/16/8/0", "causal+window=128+sink=4", "causal+prefix=2048"}
    # 8 blocks of 64 all inside S2's band of 16: no block is skipped, the ideal is 1x
    assert [c.strip() for c in rows["causal+s2=64/16/8/0"][3:4]] == ["1.00x"]
    assert all(float(r[0]) > 0 for r in rows.values())
    assert rows["causal+window=128+sink=4"][3].strip() == "-"
