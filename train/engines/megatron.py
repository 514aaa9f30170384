"""megatron-core as an engine: its parallel_state builds the tp x cp x dp grid (pp = 1),
its ColumnParallelLinear / RowParallelLinear shard the model (tensor_parallel.py).

Gradient rule (base.py): after the last micro-batch, gradients are all-reduced (SUM) over
the dp x cp group and divided by dp: SUM over CP, MEAN over DP. The gradient norm counts
every TP shard once and replicated parameters once (megatron's duplicate rule), summed
over the TP group, so clipping matches the unsharded model.

Checkpoints go through torch.distributed.checkpoint; a TP-sharded tensor is stored under
its name plus `@tp<rank>`, so DCP keeps every shard once while deduplicating replicas
(DP/CP copies, and replicated parameters across TP ranks).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from parallel.groups import ParallelGroups

from .base import Engine
from .tensor_parallel import apply_tensor_parallel, is_tensor_parallel, validate_tp


def validate_config(cfg) -> None:
    """Settings checked on every rank before any process group exists."""
    if cfg.parallel.tp < 1:
        raise ValueError(f"parallel.tp={cfg.parallel.tp} must be >= 1")
    validate_tp(cfg.model, cfg.parallel.tp)


def build_groups(dims) -> ParallelGroups:
    """The rank grid from megatron-core parallel_state (same order as ParallelDims: tp
    innermost, then cp, then dp); the Ulysses x ring split of CP from ParallelDims."""
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=dims.tp, context_parallel_size=dims.cp,
                                 create_gloo_process_groups=False)
    lists = dims.rank_lists()
    ulysses, _ = dist.new_subgroups_by_enumeration(lists["ulysses"])
    ring, _ = dist.new_subgroups_by_enumeration(lists["ring"])
    rank = dist.get_rank()
    dp_rank, cp_rank, tp_rank = dims.coordinates(rank)
    if (tp_rank, cp_rank, dp_rank) != (ps.get_tensor_model_parallel_rank(), ps.get_context_parallel_rank(),
                                       ps.get_data_parallel_rank()):
        raise RuntimeError("megatron-core parallel_state laid out the ranks differently from ParallelDims")
    uly_rank, ring_rank = dims.cp_split(cp_rank)
    return ParallelGroups(
        dims=dims, rank=rank, dp_rank=dp_rank, cp_rank=cp_rank, tp_rank=tp_rank,
        ulysses_rank=uly_rank, ring_rank=ring_rank,
        tp_group=ps.get_tensor_model_parallel_group(), cp_group=ps.get_context_parallel_group(),
        dp_group=ps.get_data_parallel_group(), dp_cp_group=ps.get_data_parallel_group(with_context_parallel=True),
        ulysses_group=ulysses, ring_group=ring,
    )


class MegatronEngine(Engine):
    def __init__(self, model, cfg, groups):
        validate_config(cfg)
        tp = groups.dims.tp if groups is not None else 1
        if tp > 1:
            apply_tensor_parallel(model, tp)
        super().__init__(model, cfg, groups)  # the optimizer sees the sharded parameters
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.suffix = {p: f"@tp{groups.tp_rank}" if is_tensor_parallel(p) else "" for p in self.params} if groups else {}

    def _reduce_gradients(self) -> None:
        if self.groups is None or not dist.is_initialized():
            return
        grads = [p.grad for p in self.params if p.grad is not None]
        flat = torch._utils._flatten_dense_tensors(grads)
        dist.all_reduce(flat, group=self.groups.dp_cp_group)
        flat /= self.groups.dims.dp
        for g, reduced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
            g.copy_(reduced)

    def _grad_norm(self) -> torch.Tensor:
        tp_rank = self.groups.tp_rank if self.groups else 0
        own = [p.grad for p in self.params if p.grad is not None and (is_tensor_parallel(p) or tp_rank == 0)]
        sq = torch.nn.utils.get_total_norm(own).square() if own else torch.zeros(())
        if self.groups is not None and self.groups.dims.tp > 1:
            dist.all_reduce(sq, group=self.groups.tp_group)
        return sq.sqrt()

    def step(self) -> dict:
        self._reduce_gradients()
        norm = self._grad_norm()
        if self.grad_clip and self.grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(self.params, self.grad_clip, norm)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"grad_norm": float(norm), "lr": lr}

    def _dcp_state(self):
        """Model and optimizer state keyed by parameter name (+ @tp<rank> for shards)."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        names = {p: n for n, p in self.model.named_parameters()}
        rename = {names[p]: names[p] + s for p, s in self.suffix.items() if s}
        model_sd = {rename.get(k, k): v for k, v in model_sd.items()}
        # param_groups keep the plain names: they are identical on every rank, as DCP expects
        optim_sd = {"state": {rename.get(k, k): v for k, v in optim_sd["state"].items()},
                    "param_groups": optim_sd["param_groups"]}
        return {"model": model_sd, "optimizer": optim_sd}, {v: k for k, v in rename.items()}

    def save(self, path: str, client_state: dict) -> None:
        import torch.distributed.checkpoint as dcp

        state, _ = self._dcp_state()
        dcp.save(state, checkpoint_id=path)
        self.save_client_state(path, client_state)

    def load(self, path: str) -> dict:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        state, back = self._dcp_state()
        dcp.load(state, checkpoint_id=path)
        model_sd = {back.get(k, k): v for k, v in state["model"].items()}
        optim_sd = {"state": {back.get(k, k): v for k, v in state["optimizer"]["state"].items()},
                    "param_groups": state["optimizer"]["param_groups"]}
        set_state_dict(self.model, self.optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
        return self.load_client_state(path)
