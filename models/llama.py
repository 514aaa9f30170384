"""A Llama-style decoder in one plain file, with the core attention handed in.

The model works on one packed sequence of documents (no batch dimension): tokens [T]
and their positions [T], so a context-parallel strategy can give each rank any subset of
rows.  RoPE rotates at the positions given (document-relative ones for packed documents,
models/rope.py, which also holds the scaling rules for longer contexts); the core attention
softmax(QK^T)V is the `attn(q, k, v)` callable of the caller (a CP strategy's
`attention`, or `kernels.attention` with a mask), which owns the mask and every
cross-rank exchange; a list of callables, one per layer, gives each layer its own core
attention (per-layer masks, `model.layer_masks`: train/layer_cp.py).  Linear layers are
plain `nn.Linear` attributes with stable names (attn.wq/wk/wv/wo, mlp.w1/w2/w3) so a
tensor-parallel transform can swap them later.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .memory import MemoryOptions
from .rope import RopeConfig, Rotary


@dataclass
class S2Heads:
    """S2-Attention per-KV-head sparsity of a `LayerMask` (kernels.HeadStride's fields)."""

    block: int
    local_blocks: int
    vert_stride: int
    dense_heads: int = 0


@dataclass
class LayerMask:
    """One `model.layer_masks` entry: the layers it covers (`layers`, else every layer l with
    l % every == offset) and their mask kinds on top of train.mask's documents.  Kinds left
    unset are off, so an entry with none is the plain causal (document) mask; layers no entry
    covers keep train.mask as it is.  The first entry covering a layer wins."""

    layers: list[int] | None = None
    every: int = 1
    offset: int = 0
    window: int | None = None           # causal sliding window (tokens)
    sink: int | None = None             # every query also sees its document's first `sink` tokens
    prefix: int | None = None           # bidirectional prefix of every document (shorter documents: all of it)
    heads: S2Heads | None = None        # S2 per-head sparsity

    def covers(self, layer: int) -> bool:
        return layer in self.layers if self.layers is not None else layer % self.every == self.offset


@dataclass
class LlamaConfig:
    """Shape of the model.  `ffn_dim=None` takes the Llama rule 8/3 * dim rounded up to
    `multiple_of`; `vocab_size=None` is filled in from the data's tokenizer."""

    vocab_size: int | None = None
    dim: int = 128
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    ffn_dim: int | None = None
    multiple_of: int = 32
    rope_theta: float = 10000.0
    rope: RopeConfig = field(default_factory=RopeConfig)    # RoPE and its scaling rule (models/rope.py)
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    qkv_bias: bool = False              # biases on the q/k/v projections (Qwen2)
    o_bias: bool = False                # a bias on the output projection (Llama's attention_bias=True)
    init_std: float = 0.02
    path: str | None = None             # model=hf: a Hugging Face checkpoint folder; its config.json sets the shape
    layer_masks: list[LayerMask] = field(default_factory=list)  # per-layer masks (empty: train.mask everywhere)

    def __post_init__(self):
        if self.n_heads < 1 or self.dim % self.n_heads != 0:
            raise ValueError(f"model.dim={self.dim} must be a positive multiple of model.n_heads={self.n_heads}")
        if self.n_kv_heads < 1 or self.n_heads % self.n_kv_heads != 0:
            raise ValueError(f"model.n_kv_heads={self.n_kv_heads} must divide model.n_heads={self.n_heads}")
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim = model.dim / model.n_heads = {self.head_dim} must be even for RoPE")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def hidden_dim(self) -> int:
        if self.ffn_dim is not None:
            return self.ffn_dim
        hidden = int(8 * self.dim / 3)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return y.to(x.dtype) * self.weight


class Attention(nn.Module):
    """QKV projection, RoPE at the given positions, core attention by `attn`, O projection."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.rotary = Rotary(cfg.rope, cfg.rope.theta or cfg.rope_theta, cfg.head_dim)
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=cfg.o_bias)

    def forward(self, x, positions, attn):
        t = x.shape[0]
        q = self.wq(x).view(t, -1, self.head_dim)
        k = self.wk(x).view(t, -1, self.head_dim)
        v = self.wv(x).view(t, -1, self.head_dim)
        q, k = self.rotary(q, positions), self.rotary(k, positions)
        out = attn(q, k, v)
        return self.wo(out.reshape(t, -1))


class MLP(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.w2 = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, positions, attn, memory: MemoryOptions = MemoryOptions()):
        x = x + self.attn(self.attn_norm(x), positions, attn)
        return x + memory.mlp(self.mlp, self.mlp_norm(x))


class Llama(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        if cfg.vocab_size is None or cfg.vocab_size < 1:
            raise ValueError(f"model.vocab_size={cfg.vocab_size} must be set (the loop fills it from the tokenizer)")
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.memory = MemoryOptions()  # train.activation_checkpoint / mlp_chunk / loss_chunk / offload
        self.apply(self._init)
        if cfg.tie_embeddings:
            self.output.weight = self.embed.weight

    def _init(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.cfg.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, attn, labels=None) -> torch.Tensor:
        """tokens [T] long, positions [T] long (RoPE positions: document-relative in packed
        training, see models.rope.document_positions), attn(q, k, v) -> out, or a list of
        n_layers such callables (layer i's core attention); logits [T, V].
        With labels [T] (-100: no target): the summed float32 cross-entropy of those logits
        instead, `self.memory.loss_chunk` tokens at a time when set."""
        with self.memory.saving():
            hidden = self.hidden(tokens, positions, attn)
            if labels is None:
                return self.output(hidden)
            return self.memory.cross_entropy(self.output, hidden, labels)

    def hidden(self, tokens: torch.Tensor, positions: torch.Tensor, attn) -> torch.Tensor:
        """The final-normed hidden states [T, dim] that `output` turns into logits."""
        attns = list(attn) if isinstance(attn, (list, tuple)) else [attn] * len(self.layers)
        if len(attns) != len(self.layers):
            raise ValueError(f"got {len(attns)} core attentions for {len(self.layers)} layers; pass one callable "
                             "or one per layer")
        x = self.embed(tokens)
        for layer, layer_attn in zip(self.layers, attns):
            x = self.memory.block(layer, x, positions, layer_attn)
        return self.norm(x)

    def num_params(self, exclude_embedding: bool = False) -> int:
        """Parameter count (tied weights counted once)."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embedding:
            n -= self.embed.weight.numel()
        return n

    def flops_per_token(self, attn_pairs_per_token: float) -> float:
        """Training FLOPs per token: 6N for the dense weights plus core attention, whose
        forward is 4 * pairs * Hq * D (QK^T and PV) and backward 2.5x that."""
        dense = 6 * self.num_params(exclude_embedding=not self.cfg.tie_embeddings)
        attention = 3.5 * 4 * attn_pairs_per_token * self.cfg.n_heads * self.cfg.head_dim * self.cfg.n_layers
        return dense + attention
