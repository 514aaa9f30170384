"""Long-context evaluation of a model: loss by position and passkey retrieval (train/evaluate.py).

    python -m scripts.eval_longctx model=hf model.path=/path/to/hf_folder data=tokens data.path=... \\
        eval.seqlen=8192 eval.passkey_lengths=[2048,4096,8192]
    torchrun --nproc_per_node 2 -m scripts.eval_longctx parallel=ring eval.checkpoint=RUN/checkpoints/step_00000300 ...

Takes the training config tree (same model, data and parallel settings as a run), so it runs
under the same CP strategy; prints the metrics as JSON and writes eval.json, a passkey heat
map and a loss-by-position plot into <run folder>/eval/.
"""
from __future__ import annotations

import json

import hydra

from train.config import register
from train.main import CONF_DIR


def evaluate_and_print(cfg) -> None:
    import torch.distributed

    from train.evaluate import evaluate_run

    metrics = evaluate_run(cfg)
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print(json.dumps(metrics, indent=1), flush=True)


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def app(cfg) -> None:
    """Joined and left like a training run (train.dist.run_joined): a failing rank leaves at once
    and its error is the root cause torchrun prints last."""
    from omegaconf import OmegaConf
    from torch.distributed.elastic.multiprocessing.errors import record

    from train import dist

    record(dist.run_joined)(evaluate_and_print, OmegaConf.to_object(cfg))


def main() -> None:
    register()
    app()


if __name__ == "__main__":
    main()
