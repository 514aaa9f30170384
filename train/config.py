"""The config schema: dataclasses registered in Hydra's ConfigStore.

conf/ holds thin YAML groups that only choose and override these fields; a typo or a
wrong type in a YAML or on the command line fails at composition, before any rank starts.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from models.llama import LlamaConfig

from .evaluate import EvalConfig


@dataclass
class ParallelConfig:
    """Context-parallel strategy and the rank grid.  cp=None takes world / (tp * dp)."""

    strategy: str = "none"
    balancer: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    tp: int = 1
    cp: int | None = None
    dp: int = 1


@dataclass
class DataConfig:
    source: str = "stdlib"              # stdlib | synthetic | tokens
    seqlen: int = 256
    path: str | None = None             # stdlib: root folder (None: this Python's); tokens: prepared folder
    doclens: str | None = None          # synthetic: JSON list of document lengths
    doclens_context: int = 65536        # synthetic: lengths are scaled by seqlen / doclens_context
    vocab_size: int = 257               # synthetic: token ids drawn from [0, vocab_size)
    num_docs: int = 100000              # synthetic: documents per epoch


@dataclass
class OptimConfig:
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0


@dataclass
class LoggerConfig:
    """wandb; mode offline (default: no account or network), online, or disabled."""

    mode: str = "offline"
    project: str = "longctx"
    entity: str | None = None
    name: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    log_every: int = 1


@dataclass
class TrainConfig:
    steps: int = 300
    grad_accum: int = 1
    seed: int = 0
    device: str = "auto"                # auto | cpu | cuda
    dtype: str = "auto"                 # auto (bf16 autocast on CUDA, fp32 on CPU) | float32 | bfloat16
    mask: str = "document"              # causal | document | window
    window: int | None = None           # mask=window: tokens see the previous `window` tokens of their document
    peak_tflops: float | None = None    # for MFU; None: a table of known accelerators (CPU: unknown, no MFU)
    progress: bool = True
    out_dir: str | None = None          # None: Hydra's run folder
    dist_timeout_s: float = 600.0       # how long a collective waits for a peer before the run fails


@dataclass
class EngineConfig:
    """ddp | deepspeed | megatron; engine-specific settings go in options."""

    name: str = "ddp"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class CheckpointConfig:
    every: int = 0                      # steps between checkpoints; 0 = never
    dir: str = "checkpoints"            # relative to the run folder unless absolute
    keep: int = 2
    resume: str | None = None           # None | auto (newest in dir) | a checkpoint path


@dataclass
class FaultsConfig:
    nan_policy: str = "raise"           # raise | skip (skip the step) | rewind (reload the last checkpoint)
    max_bad_steps: int = 3


@dataclass
class Config:
    model: LlamaConfig = field(default_factory=LlamaConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def register() -> None:
    """Store the schema as `base_config`, which conf/config.yaml names first in its defaults,
    and the `div` resolver the YAML uses for derived sizes (head_dim = dim / n_heads)."""
    ConfigStore.instance().store(name="base_config", node=Config)
    if not OmegaConf.has_resolver("div"):
        OmegaConf.register_new_resolver("div", lambda a, b: int(a) // int(b))
