"""DeepSpeed's `DistributedAttention` (Ulysses: all-to-all from sequence to heads, local
attention on the whole sequence, all-to-all back) with the local attention a DeepSpeed
user passes:

  deepspeed-ulysses         torch SDPA; causal as is_causal, documents and windows as the
                            dense boolean [T, T] mask SDPA takes (every block computed).
  deepspeed-ulysses-varlen  flash_attn_varlen_func per document (cu_seqlens; the window as
                            flash-attn's window_size), through the CPU stand-in on CPU.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

from scripts.peers.base import Peer, cu_seqlens, doc_lens, window_size


class _LocalAttention(torch.nn.Module):
    """[B=1, T, H/P, D] on the full sequence -> the same shape."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, q, k, v, *args, **kwargs):
        return self.fn(q[0], k[0], v[0]).unsqueeze(0)


class DeepSpeedUlysses(Peer):
    name = "deepspeed-ulysses"
    masks = ("causal", "document", "window", "document+window")

    def __init__(self, mask, cell, device):
        super().__init__(mask, cell, device)
        self.need_heads_divisible(self.world)
        os.environ.setdefault("DS_ACCELERATOR", "cpu" if device.type == "cpu" else "cuda")
        import deepspeed
        import deepspeed.comm as ds_comm
        from deepspeed.sequence.layer import DistributedAttention

        if not ds_comm.is_initialized():
            deepspeed.init_distributed(dist_backend=dist.get_backend(), dist_init_required=False)
        self.index = self.rows("contiguous")
        self.layer = DistributedAttention(_LocalAttention(self.local), dist.group.WORLD, scatter_idx=2, gather_idx=1)
        self.version = f"deepspeed {deepspeed.__version__}, " + self.kernel()

    def kernel(self) -> str:
        if self.cell["mask"] == "causal":
            return "torch SDPA is_causal"
        pos = torch.arange(self.seqlen)
        self.dense = self.mask.allowed(pos, pos).to(self.device)
        return "torch SDPA with a dense boolean mask"

    def local(self, q, k, v):
        bhsd = [x.transpose(0, 1).unsqueeze(0) for x in (q, k, v)]
        causal = self.cell["mask"] == "causal"
        out = F.scaled_dot_product_attention(*bhsd, attn_mask=None if causal else self.dense, is_causal=causal,
                                             enable_gqa=self.hq != self.hkv)
        return out[0].transpose(0, 1)

    def attention(self, q, k, v):
        return self.layer(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), batch_dim_idx=0)[0]


class DeepSpeedUlyssesVarlen(DeepSpeedUlysses):
    name = "deepspeed-ulysses-varlen"
    masks = ("document", "document+window")
    why_not = "a per-document kernel is the document-mask recipe; without documents it is deepspeed-ulysses"

    def kernel(self) -> str:
        from scripts.peers.standin import use_flash_attn_standin

        what = use_flash_attn_standin() if self.device.type == "cpu" else "flash_attn"
        from flash_attn import flash_attn_varlen_func

        self.varlen = flash_attn_varlen_func
        self.cu, self.longest = cu_seqlens(self.cell).to(self.device), max(doc_lens(self.cell))
        return f"flash_attn_varlen_func per document ({what})"

    def local(self, q, k, v):
        return self.varlen(q, k, v, self.cu, self.cu, self.longest, self.longest, causal=True,
                           window_size=window_size(self.cell))
