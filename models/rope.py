"""Rotary position embeddings and the RoPE scaling rules used to extend a model's context.

A rule turns (theta, head_dim, its parameters) into inverse frequencies [head_dim / 2] and an
attention factor that multiplies cos and sin (only yarn's differs from 1).  The rules follow
the definitions Hugging Face models are published with, so a checkpoint's `rope_parameters`
(or the older top-level `rope_theta` / `rope_scaling`) mean the same thing here:

- default: theta^(-2i/D)
- linear:  position interpolation, every frequency divided by `factor`
- dynamic: NTK-aware, theta grown to theta * (factor * L / M - (factor - 1))^(D / (D - 2)) for
           a context of L > M = max_position_embeddings tokens.  Hugging Face recomputes L from
           each call's largest position; a sharded (context-parallel) call cannot, since ranks
           see different positions, so here L is fixed: `seq_len` (the context the model runs
           at), else M (no change).
- yarn:    per-frequency blend of interpolation and extrapolation by a linear ramp between the
           dimensions that rotate beta_fast and beta_slow times over the original context,
           and attention factor 0.1 ln(factor) + 1 (or mscale / mscale_all_dim's ratio)
- llama3:  low frequencies divided by `factor`, high ones kept, a smooth blend in between

Angles are pos * inv_freq in float32 at *document-relative* positions (`document_positions`),
so a document far into a packed sequence gets the same angles as when it stands alone.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")
FROM_CHECKPOINT = "checkpoint"   # model=hf: keep the checkpoint's RoPE
DEFAULT_CONTEXT = 4096


@dataclass
class RopeConfig:
    """`model.rope`: the rule and its parameters; unused parameters of a rule are ignored.
    With model=hf, type `checkpoint` (conf/model/hf.yaml) keeps the checkpoint's RoPE and any
    other type replaces it (models.hf.with_rope fills in what is left unset)."""

    type: str = "default"
    theta: float | None = None                     # None: model.rope_theta
    factor: float | None = 1.0                     # None (yarn): max_position_embeddings / original
    max_position_embeddings: int | None = None     # the model's context (dynamic; yarn without factor); None: the
                                                   # checkpoint's (model=hf), else DEFAULT_CONTEXT
    original_max_position_embeddings: int | None = None   # the context before scaling (yarn, llama3); None:
                                                   # the checkpoint's max_position_embeddings (model=hf), else the above
    seq_len: int | None = None                     # dynamic: the context the frequencies are computed for
    low_freq_factor: float = 1.0                   # llama3
    high_freq_factor: float = 4.0                  # llama3
    beta_fast: float = 32.0                        # yarn
    beta_slow: float = 1.0                         # yarn
    attention_factor: float | None = None          # yarn: None derives it from factor (and mscale)
    mscale: float | None = None                    # yarn
    mscale_all_dim: float | None = None            # yarn
    truncate: bool = True                          # yarn: round the ramp's ends to whole dimensions

    def __post_init__(self):
        if self.type not in ROPE_TYPES + (FROM_CHECKPOINT,):
            raise ValueError(f"model.rope.type={self.type!r} is not implemented; choose one of {', '.join(ROPE_TYPES)} "
                             f"(or {FROM_CHECKPOINT} with model.path)")
        if self.factor is None and self.type not in ("default", "yarn") or self.factor is not None and self.factor < 1:
            raise ValueError(f"model.rope.factor={self.factor} must be a number >= 1 for rope type {self.type}")
        if self.type == "llama3" and self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(f"model.rope.high_freq_factor={self.high_freq_factor} must exceed "
                             f"model.rope.low_freq_factor={self.low_freq_factor}")

    @property
    def context(self) -> int:
        return self.max_position_embeddings or DEFAULT_CONTEXT

    @property
    def original_context(self) -> int:
        return self.original_max_position_embeddings or self.context


def _base_inv_freq(theta: float, dim: int) -> torch.Tensor:
    """theta^(-2i/D) in float32, rounded exactly as published checkpoints' reference code
    rounds it: at position 10^5 one float32 ulp of a frequency moves an angle by ~10^-2."""
    return 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)


def _yarn(cfg: RopeConfig, theta: float, dim: int) -> tuple[torch.Tensor, float]:
    factor = cfg.factor or cfg.context / cfg.original_context

    def mscale(scale, m=1.0):
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = cfg.attention_factor
    if attention is None:
        attention = mscale(factor, cfg.mscale) / mscale(factor, cfg.mscale_all_dim) \
            if cfg.mscale and cfg.mscale_all_dim else mscale(factor)

    def dim_of(rotations):  # the dimension that turns `rotations` times over the original context
        return dim * math.log(cfg.original_context / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_of(cfg.beta_fast or 32), dim_of(cfg.beta_slow or 1)
    if cfg.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp  # 1: keep the original frequency, 0: interpolate (divide by factor)
    wavelen = theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    return 1.0 / (factor * wavelen) * (1 - extrapolate) + 1.0 / wavelen * extrapolate, float(attention)


def _llama3(cfg: RopeConfig, theta: float, dim: int) -> torch.Tensor:
    base = _base_inv_freq(theta, dim)
    context = cfg.original_context
    wavelen = 2 * math.pi / base
    smooth = (context / wavelen - cfg.low_freq_factor) / (cfg.high_freq_factor - cfg.low_freq_factor)
    blended = (1 - smooth) * base / cfg.factor + smooth * base
    low_freq = wavelen > context / cfg.low_freq_factor
    high_freq = wavelen < context / cfg.high_freq_factor
    return torch.where(low_freq, base / cfg.factor, torch.where(high_freq, base, blended))


def inv_freq_and_scale(cfg: RopeConfig, theta: float, dim: int) -> tuple[torch.Tensor, float]:
    """(inverse frequencies float32 [dim / 2], attention factor) of the rule `cfg.type`; the
    scalars are Python floats (double), the tensors float32, in the reference's order."""
    if cfg.type == FROM_CHECKPOINT:
        raise ValueError(f"model.rope.type={FROM_CHECKPOINT} needs model.path (a Hugging Face checkpoint) to take it from")
    if cfg.type == "default":
        inv, scale = _base_inv_freq(theta, dim), 1.0
    elif cfg.type == "linear":
        inv, scale = _base_inv_freq(theta, dim) / cfg.factor, 1.0
    elif cfg.type == "dynamic":
        m = cfg.context
        length = max(cfg.seq_len or m, m)
        grown = theta * (cfg.factor * length / m - (cfg.factor - 1)) ** (dim / (dim - 2))
        inv, scale = _base_inv_freq(grown, dim), 1.0
    elif cfg.type == "yarn":
        inv, scale = _yarn(cfg, theta, dim)
    else:
        inv, scale = _llama3(cfg, theta, dim), 1.0
    return inv, scale


def document_positions(positions: torch.Tensor, doc_starts: torch.Tensor | None) -> torch.Tensor:
    """Positions relative to their document's start: `doc_starts` [seqlen] holds the start of
    the document of every global position (kernels.MaskSpec.cu_doc_starts); None: one document."""
    if doc_starts is None:
        return positions
    return positions - doc_starts.to(positions.device)[positions]


class Rotary(torch.nn.Module):
    """Rotates x [T, H, D] by pos * inv_freq on the pairs (x[i], x[i + D/2]), cos and sin scaled
    by the rule's attention factor.  inv_freq is a non-persistent buffer (recomputed from the
    config, never read from a checkpoint)."""

    def __init__(self, cfg: RopeConfig, theta: float, dim: int):
        super().__init__()
        self.cfg, self.theta, self.dim = cfg, theta, dim
        inv_freq, self.attention_scaling = inv_freq_and_scale(cfg, theta, dim)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def reset(self) -> None:
        """Recompute the frequencies on the CPU, e.g. after the model was built on `meta`."""
        self.inv_freq = inv_freq_and_scale(self.cfg, self.theta, self.dim)[0]

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        angles = positions.to(torch.float32).unsqueeze(-1) * self.inv_freq.float()  # [T, D/2]
        cos = (angles.cos() * self.attention_scaling).unsqueeze(1)
        sin = (angles.sin() * self.attention_scaling).unsqueeze(1)
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).to(x.dtype)
