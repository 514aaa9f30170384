"""The Hydra app: `python -m train ...` or `longctx-train ...`.

Composes conf/ over the schema in train/config.py, validates it, joins the process group
when launched by torchrun (train/dist.py: gloo on CPU, nccl on GPU; a single process
otherwise) and runs the loop.
"""
from __future__ import annotations

import os

import hydra

from .config import register

CONF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def app(cfg) -> None:
    from . import dist
    from .loop import run

    joined = dist.init_from_config(cfg)
    try:
        run(cfg)
    finally:
        if joined:
            dist.shutdown()


def main() -> None:
    register()
    app()
