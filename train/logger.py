"""wandb logging from rank 0; offline by default so a run needs no account or network.

The offline run lands in <run folder>/wandb; `wandb sync` uploads it later. One run folder is
one wandb run: its id is kept in <run folder>/wandb/run_id, so a restarted or requeued job
(same folder) resumes the same run. The transaction log is flushed every FLUSH_S seconds
instead of wandb's 15, so a killed attempt keeps its history up to about its last step.
"""
from __future__ import annotations

import os
import uuid

MODES = ("offline", "online", "disabled")
FLUSH_S = 0.2
RUN_ID_FILE = "run_id"


def run_name(cfg, strategy: str | None = None) -> str:
    """<experiment, else model>-<strategy>[-<engine>], e.g. tiny-ring or gpu_small_synthetic-usp-deepspeed;
    the experiment and model are the config groups Hydra composed ("run" outside Hydra)."""
    from hydra.core.hydra_config import HydraConfig

    choices = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
    parts = [choices.get("experiment") or choices.get("model") or "run", strategy or cfg.parallel.strategy]
    if cfg.engine.name != "ddp":
        parts.append(cfg.engine.name)
    return "-".join(parts)


def run_id(folder: str) -> str:
    """The wandb run id of this run folder: read back if an earlier attempt wrote it, else new."""
    path = os.path.join(folder, RUN_ID_FILE)
    if os.path.isfile(path):
        with open(path) as f:
            return f.read().strip()
    rid = uuid.uuid4().hex[:12]
    os.makedirs(folder, exist_ok=True)
    with open(path + ".tmp", "w") as f:
        f.write(rid)
    os.replace(path + ".tmp", path)
    return rid


class WandbLogger:
    def __init__(self, cfg, run_dir: str, config: dict, rank: int, name: str | None = None):
        if cfg.mode not in MODES:
            raise ValueError(f"logger.mode={cfg.mode!r} is unknown; choose one of {', '.join(MODES)}")
        self.run = None
        self.dir = None
        if rank != 0 or cfg.mode == "disabled":
            return
        import wandb

        rid = run_id(os.path.join(run_dir, "wandb"))
        self.run = wandb.init(
            mode=cfg.mode, project=cfg.project, entity=cfg.entity, name=cfg.name or name, group=cfg.group,
            tags=list(cfg.tags), dir=run_dir, config=config, id=rid, resume="allow",
            settings=wandb.Settings(console="off", silent=True, x_transaction_log_flush_interval=FLUSH_S),
        )
        self.dir = os.path.dirname(self.run.dir)  # the offline-run-* folder (run.dir is its files/)

    def update(self, config: dict, name: str) -> None:
        """Settings only known once the run is going (what parallel=auto chose), and the name that says so."""
        if self.run is not None:
            self.run.config.update(config, allow_val_change=True)
            self.run.name = name

    def log(self, metrics: dict, step: int) -> None:
        if self.run is not None:
            self.run.log(metrics, step=step)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
