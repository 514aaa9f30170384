"""The Hydra app: `python -m train ...` or `longctx-train ...`.

Composes conf/ over the schema in train/config.py, validates it, joins the process group
when launched by torchrun (train/dist.py: gloo on CPU, nccl on GPU; a single process
otherwise) and runs the loop. Errors are recorded for torchrun (`record`), so the failing
rank's error, with its rank and step, is the root cause the launcher prints last.
"""
from __future__ import annotations

import os

import hydra

from .config import register

CONF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def app(cfg) -> None:
    from torch.distributed.elastic.multiprocessing.errors import record

    from . import dist
    from .loop import run

    record(dist.run_joined)(run, cfg)


def main() -> None:
    register()
    app()
