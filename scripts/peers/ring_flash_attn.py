"""ring-flash-attn (zhuzilin/ring-flash-attention), through the flash_attn stand-in on CPU.

  ring-flash-attn-zigzag   zigzag_ring_flash_attn_func: ring with its zigzag layout
                           (chunks r and 2P-1-r), causal.  It has no document mask, and
                           its window_size is applied to every ring block in the block's
                           own coordinates, so windows across blocks would be wrong.
  ring-flash-attn-llama3   llama3_flash_attn_varlen_func: all-gathers K/V (heads_k_stride
                           heads at a time), per-document varlen kernel with cu_seqlens,
                           the window as window_size: its recipe for packed documents.
`+fp32fix`: the patched copy (scripts.peers.imports.fp32fix_copy).
"""
from __future__ import annotations

import importlib.metadata

import torch.distributed as dist

from scripts.peers.base import Peer, cu_seqlens, window_size
from scripts.peers.imports import fp32fix_copy, submodule


class RingFlashAttn(Peer):
    needs = ("ring_flash_attn",)
    fixed = False

    def load(self, module: str):
        what = "flash_attn"
        if self.device.type == "cpu":
            from scripts.peers.standin import use_flash_attn_standin

            what = use_flash_attn_standin()
        package, path = ("ring_flash_attn", None)
        if self.fixed:
            package, path = fp32fix_copy("ring_flash_attn")
        self.version = (f"ring-flash-attn {importlib.metadata.version('ring-flash-attn')}"
                        + (" +fp32fix (patched copy)" if self.fixed else "") + f", {what}")
        return submodule(package, module, path)


class RingFlashAttnZigzag(RingFlashAttn):
    name = "ring-flash-attn-zigzag"
    masks = ("causal",)
    why_not = ("zigzag_ring_flash_attn_func takes no document boundaries, and applies window_size per ring "
               "block in block-local coordinates (llama3_flash_attn_varlen_func is its recipe for those)")

    def __init__(self, mask, cell, device):
        super().__init__(mask, cell, device)
        self.fn = self.load("zigzag_ring_flash_attn").zigzag_ring_flash_attn_func
        self.index = self.rows("headtail")  # its layout: chunks r and 2P-1-r of 2P

    def attention(self, q, k, v):
        return self.fn(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), causal=True, group=dist.group.WORLD)[0]


class RingFlashAttnZigzagFixed(RingFlashAttnZigzag):
    name = "ring-flash-attn-zigzag+fp32fix"
    fixed = True


class RingFlashAttnLlama3(RingFlashAttn):
    name = "ring-flash-attn-llama3"
    masks = ("causal", "document", "window", "document+window")

    def __init__(self, mask, cell, device):
        super().__init__(mask, cell, device)
        mod = self.load("llama3_flash_attn_varlen")
        self.fn = mod.llama3_flash_attn_varlen_func
        self.cu_q, self.cu_k, self.max_q, self.max_k, self.k_slice = mod.llama3_flash_attn_prepare_cu_seqlens(
            cu_seqlens(cell), True, self.rank, self.world)
        self.index = self.rows("contiguous")
        self.version += ", heads_k_stride=Hkv"

    def attention(self, q, k, v):
        return self.fn(q, k, v, self.cu_q, self.cu_k, self.max_q, self.max_k, self.hkv, self.k_slice, causal=True,
                       window_size=window_size(self.cell), group=dist.group.WORLD)
