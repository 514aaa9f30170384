"""Trading compute for activation memory: checkpointed blocks, tiled MLP, chunked loss.

Every mechanism recomputes in the backward pass what the forward pass did not keep, with
`torch.utils.checkpoint` in its non-reentrant form, so the autograd graph (and therefore
every gradient hook an engine puts on parameters: DDP, ZeRO, megatron) is the plain one;
only the saved tensors are dropped and rebuilt.  Results equal the plain path's up to the
order of float32 sums (chunked loss, tiled MLP weight gradients).

- `activation_checkpoint=full`: a block keeps only its input; the backward pass runs the
  whole block again, core attention included, so a CP strategy's forward communication
  happens twice per step.
- `activation_checkpoint=selective`: the block is recomputed except its core attention
  call, whose saved tensors (q, k, v, out, lse) are kept; the recomputation reuses the
  kept output, so the strategy communicates exactly as without checkpointing.
- `mlp_chunk=C`: the SwiGLU MLP runs C tokens at a time, each tile recomputed in the
  backward pass, so [T, ffn] intermediates never exist whole (ALST's tiled MLP).
- `loss_chunk=C`: output projection + cross-entropy C tokens at a time, recomputed per
  chunk in the backward pass, so [T, vocab] float32 logits never exist whole.
- `activation_offload=True` (CUDA): tensors kept across the forward pass (with checkpointing:
  the block inputs) go to pinned host memory as they are saved and come back when the
  backward pass unpacks them (`torch.autograd.graph.save_on_cpu`).

No process groups here: this module and `activation_memory` (the byte formulas) are plain
model arithmetic that a simulator can call.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

CHECKPOINT_MODES = ("none", "selective", "full")


def _chunk_size(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"train.{name}={value!r} must be a whole number of tokens >= 0 (0 = off)")
    return value


@dataclass(frozen=True)
class MemoryOptions:
    """The train.* memory settings, checked on construction (the same check on every rank)."""

    activation_checkpoint: str = "none"
    loss_chunk: int = 0
    mlp_chunk: int = 0
    activation_offload: bool = False

    def __post_init__(self):
        if self.activation_checkpoint not in CHECKPOINT_MODES:
            raise ValueError(f"train.activation_checkpoint={self.activation_checkpoint!r} is unknown; "
                             f"choose one of {', '.join(CHECKPOINT_MODES)}")
        _chunk_size(self.loss_chunk, "loss_chunk")
        _chunk_size(self.mlp_chunk, "mlp_chunk")
        if not isinstance(self.activation_offload, bool):
            raise ValueError(f"train.activation_offload={self.activation_offload!r} must be true or false")

    @classmethod
    def from_train(cls, tcfg) -> "MemoryOptions":
        return cls(tcfg.activation_checkpoint, tcfg.loss_chunk, tcfg.mlp_chunk, tcfg.activation_offload)

    def check_device(self, device: torch.device) -> None:
        if self.activation_offload and device.type != "cuda":
            raise ValueError(f"train.activation_offload=true moves activations to pinned host memory and needs "
                             f"CUDA; the run is on {device.type}. Set train.activation_offload=false")

    @property
    def attention_forwards(self) -> int:
        """How often a step runs each block's core attention forward, and with it the CP
        strategy's forward communication: twice under `full` (the recomputation), else once."""
        return 2 if self.activation_checkpoint == "full" else 1

    def saving(self):
        """The context the model's forward pass runs in: offload kept tensors, or nothing."""
        if self.activation_offload:
            return torch.autograd.graph.save_on_cpu(pin_memory=True)
        return contextlib.nullcontext()

    def block(self, layer, x, positions, attn):
        """One transformer block under the checkpoint mode (layer(x, positions, attn, self))."""
        if self.activation_checkpoint == "none" or not torch.is_grad_enabled():
            return layer(x, positions, attn, self)
        if self.activation_checkpoint == "selective":
            attn = KeptAttention(attn, self)
        return checkpoint(layer, x, positions, attn, self, use_reentrant=False)

    def mlp(self, mlp, x):
        """mlp(x), `mlp_chunk` rows at a time with each tile recomputed in the backward pass."""
        if not self.mlp_chunk or x.shape[0] <= self.mlp_chunk or not torch.is_grad_enabled():
            return mlp(x)
        return torch.cat([checkpoint(mlp, part, use_reentrant=False) for part in x.split(self.mlp_chunk)])

    def cross_entropy(self, output, hidden, labels):
        """Summed cross-entropy of output(hidden) [T, V] in float32 against labels [T] (-100: ignored),
        `loss_chunk` rows at a time with each chunk's logits recomputed in the backward pass."""
        if not self.loss_chunk or hidden.shape[0] <= self.loss_chunk:
            return _summed_cross_entropy(output, hidden, labels)
        parts = zip(hidden.split(self.loss_chunk), labels.split(self.loss_chunk))
        return sum(checkpoint(_summed_cross_entropy, output, h, y, use_reentrant=False) for h, y in parts)


def _summed_cross_entropy(output, hidden, labels):
    return F.cross_entropy(output(hidden).float(), labels, ignore_index=-100, reduction="sum")


class KeptAttention:
    """Core attention inside a checkpointed block that is computed once.

    The first call (the forward pass) runs `attn` with its saved tensors kept outside the
    checkpoint (pushed hooks take precedence over the checkpoint's own); a later call (the
    backward pass's recomputation) returns that output again without running `attn`, so no
    communication is repeated.  Gradients flow through the first call's graph."""

    def __init__(self, attn, options: MemoryOptions):
        self.attn, self.options, self.out = attn, options, None

    def __call__(self, q, k, v):
        if self.out is not None:
            return self.out
        hooks = (torch.autograd.graph.save_on_cpu(pin_memory=True) if self.options.activation_offload
                 else torch.autograd.graph.saved_tensors_hooks(_keep, _keep))
        with hooks:
            out = self.attn(q, k, v)
        self.out = out.detach().requires_grad_(out.requires_grad)  # what the recomputation saves must match
        return out


def _keep(t):
    return t


def block_saved_values(cfg, tokens: int, mlp_rows: int | None = None) -> int:
    """Values one plain block keeps for its backward pass on `tokens` rows (what autograd
    saves, counted by storage): per token the block input, each RMSNorm's normalised input,
    its weighted output and rsqrt (2 x (2 x dim + 1)), the post-attention residual, the
    rotated q and core attention's output (2 x dim), the rotated k and v (2 x kv_dim), lse
    (n_heads) and RoPE's cos/sin for q and k (2 x head_dim); per MLP row (mlp_rows, all
    rows unless tiled) w1 x, silu(w1 x), w3 x and their product (4 x ffn)."""
    d, kv = cfg.dim, cfg.n_kv_heads * cfg.head_dim
    mlp_rows = tokens if mlp_rows is None else mlp_rows
    return (8 * d + 2 + 2 * kv + cfg.n_heads + 2 * cfg.head_dim) * tokens + 4 * cfg.hidden_dim * mlp_rows


def predict_peak_bytes(cfg, tokens: int, options: MemoryOptions = MemoryOptions(), value_bytes: int = 4) -> int:
    """Peak bytes of one training step of `cfg` (a LlamaConfig) on `tokens` rows in one process:
    float32 parameters and gradients plus the activations alive at the worst moment of the
    backward pass (or parameters, gradients and Adam's two moments after it, if larger).

    Activations: each block keeps `block_saved_values` (none), its input plus core
    attention's q_rot, k_rot, v, out and lse (selective) or its input only (full); a
    checkpointed block being recomputed holds the rest again.  A block's backward also holds
    about 3 x dim + 3 x ffn gradient values per token (per MLP tile row when tiled).  The
    loss keeps the final hidden state and its norm (2 x dim) and, at its backward, three
    [rows, vocab] float32 tensors unchunked (log-softmax output, its gradient, the logits'
    gradient), four per chunk when chunked (the chunk's logits are recomputed).
    The process's own baseline (Python, libraries) is not included.
    """
    d, f, v, layers = cfg.dim, cfg.hidden_dim, cfg.vocab_size, cfg.n_layers
    kv = cfg.n_kv_heads * cfg.head_dim
    t = tokens
    mlp_rows = min(options.mlp_chunk or t, t)
    loss_rows = min(options.loss_chunk or t, t)
    block = block_saved_values(cfg, t, mlp_rows)
    selective = (3 * d + 2 * kv + cfg.n_heads) * t        # input, q_rot, out, k_rot, v, lse
    kept = {"none": block, "selective": selective, "full": d * t}[options.activation_checkpoint]
    recomputed = block - kept
    backward_transient = 3 * d * t + 3 * f * mlp_rows
    loss = 2 * d * t + (4 if options.loss_chunk else 3) * v * loss_rows
    activations = layers * kept + max(loss, 2 * d * t + recomputed + backward_transient)
    params = v * d * (1 if cfg.tie_embeddings else 2) + d + layers * (
        d * (d + 2 * kv) + d * d + 3 * d * f + 2 * d)
    return max(2 * params * 4 + activations * value_bytes, 4 * params * 4)
