"""The Hydra app: `python -m train ...` or `longctx-train ...`.

Composes conf/ over the schema in train/config.py, joins the process group when launched
by torchrun (gloo on CPU, nccl on GPU; a single process otherwise) and runs the loop.
"""
from __future__ import annotations

import os

import hydra
import torch
import torch.distributed as dist

from .config import register

CONF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")


def init_distributed(device: str) -> bool:
    """Join the torchrun process group if this process was launched by torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return True


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def app(cfg) -> None:
    from .loop import run

    joined = init_distributed(cfg.train.device)
    try:
        run(cfg)
    finally:
        if joined:
            dist.destroy_process_group()


def main() -> None:
    register()
    app()
