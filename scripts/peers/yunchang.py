"""yunchang (feifeibear/long-context-attention) with AttnType.FA, through the flash_attn
stand-in on CPU (its pure-torch backends call CUDA-only ops or return a zero lse on CPU).

  yunchang-ulysses  UlyssesAttention: all-to-all, flash_attn_func on the whole sequence;
                    causal and windows (window_size), no document boundaries.
  yunchang-ring     zigzag_ring_flash_attn_func (its zigzag ring), causal.
  yunchang-usp      LongContextAttention (Ulysses x zigzag ring), ulysses_degree 2 when
                    world >= 4 and even, else 1 (then it is the zigzag ring behind its API).
Rows come from yunchang's own EXTRACT_FUNC_DICT applied to positions.
`+fp32fix`: the patched copy (scripts.peers.imports.fp32fix_copy).
"""
from __future__ import annotations

import importlib

import torch
import torch.distributed as dist

from scripts.peers.base import Peer, window_size
from scripts.peers.imports import fp32fix_copy

NO_DOCS = "its attention layers take no document boundaries (cu_seqlens)"
RING_WINDOW = "its ring applies window_size per ring block in block-local coordinates"


class Yunchang(Peer):
    needs = ("yunchang",)
    fixed = False

    def __init__(self, mask, cell, device):
        super().__init__(mask, cell, device)
        what = "flash_attn"
        if device.type == "cpu":
            from scripts.peers.standin import use_flash_attn_standin

            what = use_flash_attn_standin()
        package = fp32fix_copy("yunchang")[0] if self.fixed else "yunchang"
        self.yc = importlib.import_module(package)
        self.kernels = importlib.import_module(f"{package}.kernels")
        self.version = f"yunchang {self.yc.__version__}" + (" +fp32fix (patched copy)" if self.fixed else "") + f", {what}"

    def extract_rows(self, kind: str, ud: int, rd: int) -> torch.Tensor:
        pos = torch.arange(self.seqlen).view(1, -1)
        return self.yc.EXTRACT_FUNC_DICT[kind](pos, self.rank, world_size=self.world, rd=rd, ud=ud)[0].clone()

    def call(self, q, k, v):
        raise NotImplementedError

    def attention(self, q, k, v):
        return self.call(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0))[0]


class YunchangUlysses(Yunchang):
    name = "yunchang-ulysses"
    masks = ("causal", "window")
    why_not = NO_DOCS

    def __init__(self, mask, cell, device):
        super().__init__(mask, cell, device)
        self.need_heads_divisible(self.world)
        self.layer = self.yc.UlyssesAttention(dist.group.WORLD, attn_type=self.kernels.AttnType.FA)
        self.index = self.extract_rows("basic", self.world, 1)

    def call(self, q, k, v):
        return self.layer(q, k, v, causal=True, window_size=window_size(self.cell))


class YunchangRing(Yunchang):
    name = "yunchang-ring"
    masks = ("causal",)
    why_not = f"{NO_DOCS}, and {RING_WINDOW}"

    def degrees(self) -> tuple[int, int]:
        """(ulysses, ring) degrees of yunchang's process groups."""
        return 1, self.world

    def __init__(self, mask, cell, device):
        super().__init__(mask, cell, device)
        ud, rd = self.degrees()
        self.need_heads_divisible(ud)
        self.yc.set_seq_parallel_pg(ud, rd, self.rank, self.world)
        self.index = self.extract_rows("zigzag", ud, rd)
        self.version += f", ulysses {ud} x ring {rd}"

    def call(self, q, k, v):
        out = self.yc.zigzag_ring_flash_attn_func(q, k, v, causal=True, group=dist.group.WORLD,
                                                  attn_type=self.kernels.AttnType.FA)
        return out[0] if isinstance(out, tuple) else out


class YunchangUSP(YunchangRing):
    name = "yunchang-usp"

    def degrees(self):
        ud = 2 if self.world >= 4 and self.world % 2 == 0 else 1
        return ud, self.world // ud

    def __init__(self, mask, cell, device):
        super().__init__(mask, cell, device)
        self.layer = self.yc.LongContextAttention(ring_impl_type="zigzag", attn_type=self.kernels.AttnType.FA)

    def call(self, q, k, v):
        return self.layer(q, k, v, causal=True)


class YunchangRingFixed(YunchangRing):
    name = "yunchang-ring+fp32fix"
    fixed = True


class YunchangUSPFixed(YunchangUSP):
    name = "yunchang-usp+fp32fix"
    fixed = True
