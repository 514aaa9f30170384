"""wandb logging from rank 0; offline by default so a run needs no account or network.

The offline run lands in <run folder>/wandb; `wandb sync` uploads it later.
"""
from __future__ import annotations

import os

MODES = ("offline", "online", "disabled")


class WandbLogger:
    def __init__(self, cfg, run_dir: str, config: dict, rank: int):
        if cfg.mode not in MODES:
            raise ValueError(f"logger.mode={cfg.mode!r} is unknown; choose one of {', '.join(MODES)}")
        self.run = None
        self.dir = None
        if rank != 0 or cfg.mode == "disabled":
            return
        import wandb

        os.makedirs(run_dir, exist_ok=True)
        self.run = wandb.init(
            mode=cfg.mode, project=cfg.project, entity=cfg.entity, name=cfg.name, group=cfg.group,
            tags=list(cfg.tags), dir=run_dir, config=config, settings=wandb.Settings(console="off", silent=True),
        )
        self.dir = os.path.dirname(self.run.dir)  # the offline-run-* folder (run.dir is its files/)

    def log(self, metrics: dict, step: int) -> None:
        if self.run is not None:
            self.run.log(metrics, step=step)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None
