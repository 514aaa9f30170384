"""CP benchmark: strategy x balancer x mask x seqlen x world x heads, under torchrun.

    python -m scripts.bench_cp                       # small default matrix, 2 CPU ranks
    python -m scripts.bench_cp +experiment=cp_acceptance out_dir=bench_cp_acceptance

Every cell of one world size shares one `torchrun` launch of `scripts.bench_worker`; each
cell is timed (warm-up + repeats, slowest rank per repeat) and checked against single-
process `kernels.attention` (out and grads).  Results are appended to `results.jsonl`
(cells already there are skipped, so an interrupted run resumes), then summarised as
`results.md`, PNG plots and, optionally, a wandb table.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import hydra
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf
from tqdm import tqdm

from scripts.bench_cells import REPO_ROOT, expand
from scripts.bench_report import load_records, write_reports


@dataclass
class BenchConfig:
    """Schema of the bench app; conf/bench/*.yaml only choose and override."""

    out_dir: str = "bench_out"
    strategies: list = field(default_factory=lambda: ["ring", "allgather", "ulysses", "auto"])
    # scripts.bench_peers.PEERS names; conf/bench/experiment/peers.yaml runs every one
    peers: list = field(default_factory=lambda: ["torch-cp-alltoall", "deepspeed-ulysses", "deepspeed-ulysses-varlen",
                                                 "ring-flash-attn-llama3", "yunchang-ulysses"])
    balancers: list = field(default_factory=lambda: ["contiguous", "headtail", "per_doc"])
    masks: list = field(default_factory=lambda: ["causal", "document"])
    seqlens: list = field(default_factory=lambda: [4096, 8192])
    worlds: list = field(default_factory=lambda: [1, 2])
    heads: list = field(default_factory=lambda: [[8, 8], [8, 2]])
    head_dim: int = 64
    dtype: str = "float32"
    window: int = 512
    # file: a JSON list of document lengths; null = $LONGCTX_DOCLENS, else the packaged ProLong mix
    docs: dict = field(default_factory=lambda: {"file": None, "fixed_len": None})
    options: dict = field(default_factory=lambda: {"usp": {"ulysses_degree": 2}})
    extra_strategies: dict = field(default_factory=dict)
    extra_peers: dict = field(default_factory=dict)  # name -> "module:Class", like extra_strategies
    warmup: int = 1
    repeats: int = 3
    seed: int = 0
    omp_threads: int = 1
    launch_timeout_s: int = 3600
    plots: bool = True
    wandb: bool = False


ConfigStore.instance().store(name="bench_schema", node=BenchConfig)


def _launch(cells: list[dict], world: int, results: str, cfg) -> int:
    """Run one world size's cells under torchrun; a tqdm bar follows the JSONL as it grows."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(cells, f)
    env = dict(os.environ, OMP_NUM_THREADS=str(cfg.omp_threads),
               PYTHONPATH=os.pathsep.join([REPO_ROOT, os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
           "-m", "scripts.bench_worker", f.name, results]
    start_done = len(load_records(results))
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env)
    deadline = time.time() + cfg.launch_timeout_s
    with tqdm(total=len(cells), desc=f"world={world}", unit="cell") as bar:
        while proc.poll() is None and time.time() < deadline:
            time.sleep(0.5)
            bar.update(len(load_records(results)) - start_done - bar.n)
        if proc.poll() is None:
            proc.kill()
        bar.update(len(load_records(results)) - start_done - bar.n)
    os.unlink(f.name)
    return proc.wait()


def run(cfg) -> list[dict]:
    """Expand the matrix, run the missing cells, write the reports; returns all records."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    plain["strategies"] = list(plain["strategies"]) + [f"peer:{p}" for p in plain["peers"]]
    out_dir = plain["out_dir"] if os.path.isabs(plain["out_dir"]) else os.path.join(os.getcwd(), plain["out_dir"])
    os.makedirs(out_dir, exist_ok=True)
    results = os.path.join(out_dir, "results.jsonl")
    cells = expand(plain)
    done = {r["id"] for r in load_records(results)}
    failed = []
    for world in sorted({c["world"] for c in cells}):
        todo = [c for c in cells if c["world"] == world and c["id"] not in done]
        if todo and _launch(todo, world, results, cfg) != 0:
            failed.append(world)
    wanted = {c["id"] for c in cells}
    records = [r for r in load_records(results) if r["id"] in wanted]
    write_reports(records, out_dir, plots=cfg.plots, use_wandb=cfg.wandb)
    if failed:
        raise SystemExit(f"bench_cp: the launch for world sizes {failed} failed; finished cells are in {results}, "
                         "re-run the same command to resume")
    return records


@hydra.main(config_path="../conf/bench", config_name="bench", version_base=None)
def main(cfg) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
