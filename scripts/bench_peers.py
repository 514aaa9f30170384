"""Peers: published context-parallel attention run side by side with our strategies in
`scripts.bench_cp` (strategy `peer:<name>`), each with its own kernel, its own row layout
and its own way of expressing the mask, as its users would run it.  Every peer cell is
checked against single-process `kernels.attention` like ours: a wrong result is reported
WRONG with its error and gets no speed figures.

A peer that is not installed, or cannot express a cell's mask, raises ValueError at
construction (the same on every rank, before any collective) and the cell is reported
SKIPPED with the reason (the install command, or what the peer lacks).  Install the
optional ones with `pip install -e '.[peers]'` (or the --no-deps line in scripts/peers/base.py).

On CPU, flash-attn based peers run through `scripts/peers/flash_attn_cpu` (a `flash_attn`
stand-in over torch's CPU flash-attention op) and torch CP through CPU ring handlers
(`scripts/peers/torch_cp.py`): every peer and our `cpu` backend share one local kernel, so
the comparison is of partitioning, communication and masking, not of kernels.
"""
from __future__ import annotations

import torch

from parallel import load_entry

PEERS = {
    "torch-cp-allgather": "scripts.peers.torch_cp:TorchCP",
    "torch-cp-alltoall": "scripts.peers.torch_cp:TorchCPAllToAll",
    "deepspeed-ulysses": "scripts.peers.deepspeed_ulysses:DeepSpeedUlysses",
    "deepspeed-ulysses-varlen": "scripts.peers.deepspeed_ulysses:DeepSpeedUlyssesVarlen",
    "ring-flash-attn-zigzag": "scripts.peers.ring_flash_attn:RingFlashAttnZigzag",
    "ring-flash-attn-zigzag+fp32fix": "scripts.peers.ring_flash_attn:RingFlashAttnZigzagFixed",
    "ring-flash-attn-llama3": "scripts.peers.ring_flash_attn:RingFlashAttnLlama3",
    "yunchang-ulysses": "scripts.peers.yunchang:YunchangUlysses",
    "yunchang-ring": "scripts.peers.yunchang:YunchangRing",
    "yunchang-ring+fp32fix": "scripts.peers.yunchang:YunchangRingFixed",
    "yunchang-usp": "scripts.peers.yunchang:YunchangUSP",
    "yunchang-usp+fp32fix": "scripts.peers.yunchang:YunchangUSPFixed",
}


def build_peer(name: str, mask, cell: dict, device: torch.device, extra: dict | None = None):
    """Construct a peer for one cell, or raise ValueError saying why it cannot run it.

    extra: more peers by name -> "module:Class" (the tests' deliberately broken ones)."""
    return load_entry({**PEERS, **(extra or {})}, name, "peers")(mask, cell, device)
