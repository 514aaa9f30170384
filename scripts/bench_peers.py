"""Peer CP implementations run side by side with ours, behind the same shard/attention face.

Each peer is wrapped so the harness can time it and check it against `kernels.attention`
exactly like our strategies.  A peer that cannot run here raises ValueError with the reason
at construction (the same on every rank, before any collective), and the harness records
the reason in the table instead of a time.

  deepspeed-ulysses  deepspeed.sequence.layer.DistributedAttention (all-to-all over heads)
                     around kernels.attention on the gathered full sequence.
  torch-cp           torch.distributed.tensor.experimental.context_parallel (ring over SDPA).
  yunchang           long-context-attention's LongContextAttention (torch backend).
"""
from __future__ import annotations

import importlib.util

import torch
import torch.distributed as dist

import kernels

PEERS = ("deepspeed-ulysses", "torch-cp", "yunchang")


class _Contiguous:
    """Contiguous row sharding shared by the wrapped peers."""

    def __init__(self, mask, seqlen):
        world, rank = dist.get_world_size(), dist.get_rank()
        if seqlen % world:
            raise ValueError(f"seqlen={seqlen} must be divisible by the world size {world}")
        self.mask, self.seqlen, self.world = mask, seqlen, world
        self.index = torch.arange(rank * seqlen // world, (rank + 1) * seqlen // world)
        self.stats = None

    @property
    def positions(self):
        return self.index

    def shard(self, x):
        return x.index_select(0, self.index.to(x.device))


class _FullSequenceKernel(torch.nn.Module):
    """DeepSpeed's local attention: [T, 1, H/P, D] over the whole sequence in global order."""

    def __init__(self, mask):
        super().__init__()
        self.mask = mask

    def forward(self, q, k, v, *args, **kwargs):
        out, _ = kernels.attention(q[:, 0], k[:, 0], v[:, 0], self.mask)
        return out.unsqueeze(1)


class DeepSpeedUlysses(_Contiguous):
    def __init__(self, mask, seqlen, cell):
        super().__init__(mask, seqlen)
        if cell["hkv"] % self.world or cell["hq"] % self.world:
            raise ValueError(f"deepspeed-ulysses needs heads divisible by {self.world} (hq={cell['hq']}, "
                             f"hkv={cell['hkv']}); DistributedAttention does not replicate KV heads")
        import deepspeed.comm as ds_comm
        from deepspeed.sequence.layer import DistributedAttention

        if not ds_comm.is_initialized():
            ds_comm.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)
        self.layer = DistributedAttention(_FullSequenceKernel(mask), dist.group.WORLD, scatter_idx=2, gather_idx=0)

    def attention(self, q, k, v):
        return self.layer(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), 1)[:, 0]


def _torch_cp_reason(device: torch.device) -> str | None:
    if device.type != "cuda":
        return ("torch-cp: context_parallel shards SDPA's flash/efficient/cuDNN CUDA ops only; "
                "no CPU/gloo path in torch " + torch.__version__)
    return "torch-cp: wrapper not written for document/window masks (SDPA takes is_causal only)"


def build_peer(name: str, mask, seqlen: int, cell: dict):
    """Construct a peer, or raise ValueError saying why it cannot run here."""
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if name == "deepspeed-ulysses":
        return DeepSpeedUlysses(mask, seqlen, cell)
    if name == "torch-cp":
        raise ValueError(_torch_cp_reason(device))
    if name == "yunchang":
        if importlib.util.find_spec("yunchang") is None:
            raise ValueError("yunchang: package not installed (PyPI yunchang needs flash-attn for its "
                             "default backend; not installed in this environment)")
        raise ValueError("yunchang: installed but its wrapper is not written yet")
    raise ValueError(f"peer={name!r} is unknown; choose one of {', '.join(PEERS)}")
