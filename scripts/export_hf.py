"""Export a training checkpoint as a Hugging Face folder (config.json + safetensors).

    python -m scripts.export_hf RUN/checkpoints/step_00000300 OUT_DIR [--config RUN/.hydra/config.yaml]
        [--dtype bfloat16] [model.key=value ...]

The model settings come from the run's saved Hydra config (by default the .hydra/config.yaml
two folders above the checkpoint), overridable with model.* arguments; the weights from the
checkpoint of any engine (train/export.py).  A model trained from scratch records its
data.seqlen as max_position_embeddings (the original context a later extension scales from).  The folder loads with
transformers.AutoModelForCausalLM.from_pretrained and with models.hf.from_pretrained.
"""
from __future__ import annotations

import argparse
import os

import torch
from omegaconf import OmegaConf

from models.hf import save_pretrained
from models.llama import LlamaConfig
from train.export import load_trained_model


def run_model_config(checkpoint: str, config: str | None, overrides: list[str]) -> LlamaConfig:
    """The run's `model` settings, with `model.key=value` overrides applied."""
    path = config or os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(checkpoint))), ".hydra", "config.yaml")
    if not os.path.isfile(path):
        raise ValueError(f"no run config at {path}; pass --config <run>/.hydra/config.yaml (the run's Hydra config)")
    bad = [o for o in overrides if not o.startswith("model.")]
    if bad:
        raise ValueError(f"only model.* overrides are taken here, got {bad}")
    run = OmegaConf.load(path)
    model = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(LlamaConfig), run.model,
                                                OmegaConf.from_dotlist([o.removeprefix("model.") for o in overrides])))
    if not model.path and model.rope.max_position_embeddings is None:  # trained from scratch at data.seqlen
        model.rope.max_position_embeddings = int(run.data.seqlen)
    return model


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", help="a <run>/checkpoints/step_<n> folder")
    ap.add_argument("out_dir")
    ap.add_argument("--config", default=None, help="the run's Hydra config (default: <run>/.hydra/config.yaml)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("overrides", nargs="*", help="model.key=value settings that differ from the saved config")
    args = ap.parse_args(argv)
    model = load_trained_model(args.checkpoint, run_model_config(args.checkpoint, args.config, args.overrides))
    save_pretrained(model.to(getattr(torch, args.dtype)), args.out_dir)
    print(f"exported {args.checkpoint} ({model.num_params():,} parameters) to {args.out_dir}")


if __name__ == "__main__":
    main()
