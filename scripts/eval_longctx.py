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


@hydra.main(config_path=CONF_DIR, config_name="config", version_base="1.3")
def app(cfg) -> None:
    import torch.distributed
    from omegaconf import OmegaConf

    from train import dist
    from train.evaluate import evaluate_run

    cfg = OmegaConf.to_object(cfg)
    joined = dist.init_from_config(cfg)
    try:
        metrics = evaluate_run(cfg)
        if not joined or torch.distributed.get_rank() == 0:
            print(json.dumps(metrics, indent=1), flush=True)
    finally:
        if joined:
            dist.shutdown()


def main() -> None:
    register()
    app()


if __name__ == "__main__":
    main()
