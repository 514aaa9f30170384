"""The config schema: dataclasses registered in Hydra's ConfigStore.

conf/ holds thin YAML groups that only choose and override these fields; a typo or a
wrong type in a YAML or on the command line fails at composition, before any rank starts.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from models.llama import LlamaConfig



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
    doclens: str | None = None          # synthetic: JSON list of document lengths (null: $LONGCTX_DOCLENS, else the packaged ProLong mix)
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
    mask: str = "document"              # causal | document | window | document+window (train/validate.py)
    window: int | None = None           # mask=window / document+window: a token sees the previous `window` tokens
    peak_tflops: float | None = None    # for MFU; None: a table of known accelerators (CPU: unknown, no MFU)
    progress: bool = True
    out_dir: str | None = None          # None: Hydra's run folder
    dist_timeout_s: float = 600.0       # how long a collective waits for a peer before the run fails
    activation_checkpoint: str = "none"  # none | selective (all but core attention) | full (whole blocks)
    loss_chunk: int = 0                 # tokens per output-projection + cross-entropy chunk; 0 = off
    mlp_chunk: int = 0                  # tokens per MLP tile; 0 = off
    activation_offload: bool = False    # CUDA: kept activations to pinned host memory


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
    verify: bool = True                 # check every file against the checkpoint's manifest before loading


@dataclass
class FaultsConfig:
    nan_policy: str = "raise"           # raise | skip (skip the step) | rewind (reload the last checkpoint)
    max_bad_steps: int = 3
    inject: str | None = None           # tests only: raise@<rank>:<step> (train/faults.py)


@dataclass
class EvalConfig:
    """`eval.*`: every=N evaluates after every N training steps (0: never)."""

    every: int = 0
    checkpoint: str | None = None           # scripts.eval_longctx: a <run>/checkpoints/step_<n> to evaluate
    seqlen: int | None = None               # loss-by-position context; None: data.seqlen
    path: str | None = None                 # held-out documents (a data.source folder); None: the training corpus
    num_docs: int = 4                       # documents for the loss by position
    buckets: int = 8
    passkey_lengths: list[int] = field(default_factory=list)   # None/empty: [seqlen / 4, seqlen / 2, seqlen]
    passkey_depths: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    passkey_trials: int = 4
    passkey_digits: int = 5
    seed: int = 1234


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


CONF_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "conf")
RUN_DIR_ENV = "LONGCTX_RUN_DIR"
NOT_TRAINING_GROUPS = ("hydra", "bench")  # Hydra's own settings; the benchmark's config (scripts/bench_cp.py)


def config_groups() -> str:
    """One line per training config group of conf/ and its options, for --help."""
    lines = []
    for group in sorted(os.listdir(CONF_DIR)):
        folder = os.path.join(CONF_DIR, group)
        if os.path.isdir(folder) and group not in NOT_TRAINING_GROUPS:
            options = sorted(name[:-5] for name in os.listdir(folder) if name.endswith(".yaml"))
            lines.append(f"  {group}: {', '.join(options)}")
    return "\n".join(lines)


def run_dir(out_dir: str | None) -> str:
    """Hydra's run folder: train.out_dir when set (so it holds .hydra/ and train.log too), else
    $LONGCTX_RUN_DIR (set by train/main.py so every rank of one torchrun job agrees), else
    runs/<date>/<time>."""
    if out_dir:
        return out_dir
    return os.environ.get(RUN_DIR_ENV) or os.path.join("runs", time.strftime("%Y-%m-%d/%H-%M-%S"))


def run_folder(tcfg) -> str:
    """The folder of the run in progress: train.out_dir, else Hydra's run folder, else (no
    Hydra app) run_dir's default."""
    from hydra.core.hydra_config import HydraConfig

    if not tcfg.out_dir and HydraConfig.initialized():
        return HydraConfig.get().runtime.output_dir
    return run_dir(tcfg.out_dir)


def register() -> None:
    """Store the schema as `base_config`, which conf/config.yaml names first in its defaults;
    the `div` resolver the YAML uses for derived sizes (head_dim = dim / n_heads), `run_dir`
    for hydra.run.dir and `train_config_groups` for --help."""
    ConfigStore.instance().store(name="base_config", node=Config)
    resolvers = {"div": lambda a, b: int(a) // int(b), "run_dir": run_dir,
                 "train_config_groups": config_groups}
    for name, fn in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn, use_cache=name == "run_dir")
