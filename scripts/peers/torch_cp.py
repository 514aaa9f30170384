"""torch's experimental `context_parallel`: its own ring over SDPA with its head-tail load
balancer, K/V rotated by all-gather or all-to-all (`set_rotate_method`).

Upstream only intercepts the CUDA SDPA ops.  On CPU, SDPA lowers to
`aten._scaled_dot_product_flash_attention_for_cpu`, for which DTensor has no sharding rule,
so inside `context_parallel` it fails with "Operator ..._for_cpu.default does not have a
sharding strategy registered".  `install_cpu_ring` adds, through private torch APIs, what
the CUDA ops have: a Shard(seq) rule for the CPU op and its backward, and CP handlers that
call torch's own `_templated_ring_attention(_backward)` with the CPU op as the block kernel.
So the ring, merge, rotation and load balancing are torch's; only the kernel is the CPU one.

Document and window masks: torch's CP expresses them only through flex_attention with its
CP block mask (`_create_cp_block_mask`, K/V all-gathered).  On CPU, torch 2.13's
flex_attention refuses the backward ("NotImplementedError: FlexAttention does not support
backward on CPU", tried with 2 gloo ranks and a document mask), so those cells are SKIPPED
with that reason.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from scripts.peers.base import Peer

SEQ_DIM = 2  # SDPA layout [B, H, S, D]: context_parallel shards dim 2
_CPU_RING_INSTALLED = False


def install_cpu_ring():
    """Register the CPU flash op with DTensor and torch CP (once per process)."""
    global _CPU_RING_INSTALLED
    if _CPU_RING_INSTALLED:
        return
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._op_schema import RuntimeSchemaInfo
    from torch.distributed.tensor._ops.utils import expand_to_full_mesh_op_strategy, register_op_strategy
    from torch.distributed.tensor.experimental._context_parallel import _attention as cp_attention
    from torch.distributed.tensor.placement_types import Shard

    fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
    bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default

    def sharded(n_tensors, input_index, validate=True):
        def strategy(op_schema):
            mesh = op_schema.get_mesh_from_args(validate=validate)
            return expand_to_full_mesh_op_strategy(mesh, op_schema, [[Shard(SEQ_DIM)] * n_tensors],
                                                   input_index=input_index)
        return strategy

    # fwd: outputs out, lse + inputs q, k, v; bwd: outputs dq, dk, dv + 6 tensor inputs
    register_op_strategy(fwd, schema_info=RuntimeSchemaInfo(3, static_kwargkey=["scale"]))(sharded(5, 2))
    register_op_strategy(bwd, schema_info=RuntimeSchemaInfo(6, static_kwargkey=["scale"]))(sharded(9, 3, False))

    def handler(op_call, args, kwargs):
        dispatcher = DTensor._op_dispatcher
        info = dispatcher.unwrap_to_op_info(op_call, args, kwargs)
        dispatcher.sharding_propagator.propagate(info)
        if info.output_sharding is None or info.output_sharding.needs_redistribute:
            raise ValueError("torch-cp on CPU: q, k, v must all be sharded on the sequence dimension")
        group, a, kw = info.compute_mesh.get_group(), info.local_args, dict(info.local_kwargs)
        if kw.get("attn_mask") is not None:
            raise ValueError("torch-cp on CPU: SDPA's attn_mask is not supported by torch's ring")
        if op_call is fwd:
            res = cp_attention._templated_ring_attention(group, SEQ_DIM, fwd, *a[:3], is_causal=a[4],
                                                         dropout_p=a[3], scale=kw.get("scale"))
        else:
            dout, q, k, v, out, lse, dropout_p, is_causal = a[:8]
            res = cp_attention._templated_ring_attention_backward(
                group, SEQ_DIM, bwd, grad_out=dout, grad_out_name="grad_out", query=q, key=k, value=v, out=out,
                logsumexp=lse, is_causal=is_causal, dropout_p=dropout_p, scale=kw.get("scale"))
        return dispatcher.wrap(tuple(res), info.output_sharding.output_spec)

    cp_attention.custom_ops[fwd] = handler  # read when context_parallel() enables its dispatcher
    cp_attention.custom_ops[bwd] = handler
    _CPU_RING_INSTALLED = True


class TorchCP(Peer):
    name = "torch-cp-allgather"
    masks = ("causal",)
    why_not = ("torch CP takes document/window masks only through flex_attention's CP block mask, and on CPU "
               "flex_attention has no backward ('FlexAttention does not support backward on CPU', torch 2.13)")
    rotate = "allgather"

    def __init__(self, mask, cell, device):
        super().__init__(mask, cell, device)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor.experimental import context_parallel
        from torch.distributed.tensor.experimental._attention import set_rotate_method
        from torch.distributed.tensor.experimental._context_parallel._load_balancer import (
            _create_default_load_balancer)

        if device.type == "cpu":
            install_cpu_ring()
        set_rotate_method(self.rotate)
        mesh = init_device_mesh(device.type, (self.world,))
        balancer = _create_default_load_balancer(self.seqlen, self.world, device)
        order = balancer._generate_indices()[0]
        n = self.seqlen // self.world
        self.index = order[self.rank * n:(self.rank + 1) * n].cpu()
        # context_parallel shards its buffers with the same balancer: hold the positions to check it
        pos = torch.arange(self.seqlen, dtype=torch.float32, device=device).view(1, 1, -1, 1)
        self._held = context_parallel(mesh, buffers=[pos], buffer_seq_dims=[SEQ_DIM], no_restore_buffers={pos})
        self._held.__enter__()
        if not torch.equal(pos.reshape(-1).long().cpu(), self.index):
            self.close()
            raise ValueError("torch-cp: context_parallel sharded positions differently from its load balancer")
        self.version = (f"torch {torch.__version__}, rotate={self.rotate}, {type(balancer).__name__}"
                        + (", CPU ring handlers (scripts.peers.torch_cp)" if device.type == "cpu" else ""))

    def attention(self, q, k, v):
        bhsd = [x.transpose(0, 1).unsqueeze(0) for x in (q, k, v)]
        out = F.scaled_dot_product_attention(*bhsd, is_causal=True, enable_gqa=self.hq != self.hkv)
        return out[0].transpose(0, 1)

    def close(self):
        if self._held is not None:
            self._held.__exit__(None, None, None)
            self._held = None


class TorchCPAllToAll(TorchCP):
    name = "torch-cp-alltoall"
    rotate = "alltoall"
