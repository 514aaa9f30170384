"""The training loop: one packed sequence per micro-batch, core attention by the CP strategy.

Per micro-batch: the sequence's documents give the mask; `parallel.build` (rebuilt every
step, no collectives) picks this rank's rows and their global positions; the model runs on
those rows with `cp.attention` as its core attention (which keeps the global positions for
the mask) and RoPE at the rows' document-relative positions.
Loss invariant: loss_local = sum of cross-entropy over this rank's rows / number of
predicted tokens in the WHOLE sequence, so the sum over the CP group is the DP rank's mean
loss; the engine turns gradients into SUM over CP, MEAN over DP, and the logged loss is
reduced the same way (sum over CP, mean over DP).

Around the step: resume from the newest complete checkpoint and a checkpoint every
checkpoint.every steps (train/checkpoint.py), the non-finite-loss policy and stop requests
(train/faults.py), and a lost peer reported with the step it happened at (train/dist.py).
"""
from __future__ import annotations

import dataclasses
import importlib
import logging
import math
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

import parallel
from kernels import MaskSpec
from models import hf
from models.rope import document_positions
from parallel.groups import ParallelDims

from . import checkpoint, engines, evaluate, faults
from .dist import describe_timeout, is_timeout
from .data import build_loader, next_token_labels
from .logger import WandbLogger
from .metrics import attention_pairs, peak_flops, peak_memory_mb, throughput

MASKS = ("causal", "document", "window")
log = logging.getLogger(__name__)


def resolve_device(tcfg) -> tuple[torch.device, torch.dtype | None]:
    """(device, autocast dtype or None for plain float32)."""
    if tcfg.device == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    elif tcfg.device in ("cpu", "cuda"):
        name = tcfg.device
    else:
        raise ValueError(f"train.device={tcfg.device!r} is unknown; choose auto, cpu or cuda")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device=cuda but no CUDA device is visible; use train.device=cpu")
    device = torch.device(name, int(os.environ.get("LOCAL_RANK", 0))) if name == "cuda" else torch.device("cpu")
    dtypes = {"float32": None, "bfloat16": torch.bfloat16, "auto": torch.bfloat16 if name == "cuda" else None}
    if tcfg.dtype not in dtypes:
        raise ValueError(f"train.dtype={tcfg.dtype!r} is unknown; choose auto, float32 or bfloat16")
    return device, dtypes[tcfg.dtype]


def build_mask(doc_lens: list[int], tcfg) -> MaskSpec:
    if tcfg.mask == "causal":
        return MaskSpec(causal=True)
    if tcfg.mask == "document":
        return MaskSpec.from_doc_lens(doc_lens, causal=True)
    return MaskSpec.from_doc_lens(doc_lens, causal=True, window=tcfg.window)


def validate(cfg, world: int) -> ParallelDims:
    """Every setting checked here, identically on every rank, before any collective."""
    t, p = cfg.train, cfg.parallel
    if t.steps < 1 or t.grad_accum < 1:
        raise ValueError(f"train.steps={t.steps} and train.grad_accum={t.grad_accum} must be >= 1")
    if t.mask not in MASKS:
        raise ValueError(f"train.mask={t.mask!r} is unknown; choose one of {', '.join(MASKS)}")
    if (t.mask == "window") != (t.window is not None):
        raise ValueError(f"train.mask={t.mask} with train.window={t.window}: train.mask=window needs "
                         f"train.window=<tokens>, and train.window is only for train.mask=window")
    if p.strategy not in parallel.STRATEGIES:
        raise ValueError(f"parallel.strategy={p.strategy!r} is unknown; choose one of {', '.join(parallel.STRATEGIES)}")
    if p.tp < 1 or p.dp < 1 or world % (p.tp * p.dp):
        raise ValueError(f"parallel.tp={p.tp} * parallel.dp={p.dp} must divide the number of ranks ({world})")
    if p.tp > 1 and cfg.engine.name != "megatron":
        raise ValueError(f"parallel.tp={p.tp} needs engine=megatron (engine={cfg.engine.name} has no tensor parallelism)")
    cp = world // (p.tp * p.dp) if p.cp is None else p.cp
    if p.strategy == "none" and cp != 1:
        raise ValueError(
            f"parallel.strategy=none with cp={cp} ranks would repeat the same sequence on each; "
            f"set parallel.dp={world // p.tp} (data parallel) or choose a CP strategy"
        )
    if cfg.engine.name not in engines.ENGINES:
        raise ValueError(f"engine.name={cfg.engine.name!r} is unknown; choose one of {', '.join(engines.ENGINES)}")
    engine_module = importlib.import_module(engines.ENGINES[cfg.engine.name].split(":")[0])
    if hasattr(engine_module, "validate_config"):
        engine_module.validate_config(cfg)
    checkpoint.validate(cfg.checkpoint)
    faults.validate(cfg.faults, cfg.checkpoint)
    opts = p.options
    return ParallelDims(world, tp=p.tp, cp=cp, dp=p.dp,
                        ulysses_degree=opts.get("ulysses_degree"), ring_degree=opts.get("ring_degree"))


def build_groups(cfg, dims: ParallelDims):
    """megatron takes its rank grid from megatron-core's parallel_state; the others from ParallelDims."""
    if cfg.engine.name == "megatron":
        from .engines.megatron import build_groups as megatron_groups

        return megatron_groups(dims)
    return dims.build()


def run_dir(tcfg) -> str:
    if tcfg.out_dir:
        return tcfg.out_dir
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return HydraConfig.get().runtime.output_dir
    return os.path.join("runs", time.strftime("%Y-%m-%d/%H-%M-%S"))


def micro_step(seq, cfg, engine, cp_group, device, amp_dtype, last: bool) -> tuple[torch.Tensor, dict]:
    """Forward and backward of one packed sequence under the CP strategy.  Returns this rank's
    loss (the module docstring's loss_local, detached) and the attention work it did."""
    mask = build_mask(seq.doc_lens, cfg.train)
    seqlen = cfg.data.seqlen
    cp = parallel.build(cfg.parallel.strategy, mask, seqlen, group=cp_group,
                        balancer=cfg.parallel.balancer, **cfg.parallel.options)
    labels = next_token_labels(seq.tokens, None if cfg.train.mask == "causal" else seq.doc_lens)
    n_predicted = max(int((labels != -100).sum()), 1)
    with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        positions = document_positions(cp.positions, mask.cu_doc_starts).to(device)
        logits = engine.module(cp.shard(seq.tokens.to(device)), positions, cp.attention)
    local = F.cross_entropy(logits.float(), cp.shard(labels.to(device)), ignore_index=-100, reduction="sum")
    loss = local / n_predicted
    engine.backward(loss, last_micro=last)
    stats = cp.stats
    cp_rank = dist.get_rank(cp_group) if cp_group is not None else 0
    return loss.detach(), {
        "pairs": attention_pairs(seq.doc_lens, seqlen, cfg.train.mask, cfg.train.window),
        "attn_imbalance": stats.imbalance("pairs") if stats.pairs else 1.0,
        "comm_bytes": stats.bytes_sent[cp_rank] + stats.bytes_recv[cp_rank] if stats.bytes_sent else 0,
    }


def run(cfg, stop_at_step: int | None = None) -> list[dict]:
    """Train up to cfg.train.steps steps; returns the metrics of the steps this call ran
    (identical losses on all ranks). stop_at_step ends this call after that step the way a
    preemption does: checkpoint (when checkpointing is on), then return."""
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_object(cfg)
    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    dims = validate(cfg, world)
    device, amp_dtype = resolve_device(cfg.train)
    loader = build_loader(cfg.data, cfg.train.seed, dims.coordinates(rank)[0], dims.dp)
    model_cfg = hf.resolve_config(cfg.model, loader.corpus.vocab_size, f"data.source={cfg.data.source}")
    evaluator = evaluate.build_evaluator(cfg)
    groups = build_groups(cfg, dims) if distributed else None  # the first collective: every check is above
    cp_group = groups.cp_group if groups else None
    if rank == 0 and not cfg.train.progress:
        print(f"world {world}: dp={dims.dp} cp={dims.cp} tp={dims.tp}, engine={cfg.engine.name}, "
              f"parallel={cfg.parallel.strategy}", flush=True)
    torch.manual_seed(cfg.train.seed)
    model = hf.build_model(model_cfg).to(device)
    # FLOPs per token are linear in attention pairs; taken from the whole model before an
    # engine shards it (TP) or partitions it (ZeRO-3)
    dense_flops = model.flops_per_token(0.0)
    pair_flops = model.flops_per_token(1.0) - dense_flops
    engine = engines.build(cfg.engine.name, model, cfg, groups)
    ckpt = None
    if cfg.checkpoint.every or cfg.checkpoint.resume:
        ckpt = checkpoint.Checkpointer(cfg.checkpoint, rank, world, run_dir(cfg.train))
    client = ckpt.resume(engine) if ckpt else None
    step = client["step"] if client else 0
    if client:
        loader.load_state_dict(client["data"])
        if rank == 0:
            print(f"resumed from step {step} ({ckpt.root})", flush=True)
    guard, stop = faults.LossGuard(cfg.faults, rank), faults.StopRequest()
    logger = WandbLogger(cfg.logger, run_dir(cfg.train), dataclasses.asdict(cfg), rank)
    peak = peak_flops(device, cfg.train.peak_tflops)
    seqlen, accum = cfg.data.seqlen, cfg.train.grad_accum

    def client_state():
        return {"step": step, "data": loader.state_dict()}

    history, smooth = [], None
    bar = tqdm(total=cfg.train.steps, initial=step, disable=rank != 0 or not cfg.train.progress, desc="train",
               unit="step")
    try:
        while step < cfg.train.steps:
            step += 1
            t0 = time.perf_counter()
            loss_sum = torch.zeros((), device=device)
            pairs = comm = 0
            imbalance, sequences = [], []
            for micro in range(accum):
                seq = next(loader)
                sequences.append(seq.index)
                loss, work = micro_step(seq, cfg, engine, cp_group, device, amp_dtype, last=micro == accum - 1)
                loss_sum += loss / accum
                pairs += work["pairs"]
                comm += work["comm_bytes"]
                imbalance.append(work["attn_imbalance"])
            local_finite = bool(torch.isfinite(loss_sum))
            if distributed:  # before the step, so that every rank takes the same branch below
                dist.all_reduce(loss_sum, group=groups.dp_cp_group)
                loss_sum /= dims.dp
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t1 = time.perf_counter()
            loss_value = float(loss_sum)
            action = guard.check(loss_value, step, sequences, local_finite)
            if action == "ok":
                out = engine.step()
            else:
                out = {"grad_norm": math.nan, "lr": engine.optimizer.param_groups[0]["lr"]}
                faults.discard_gradients(engine)
                if action == "rewind":  # model, optimizer and RNG go back; the data moves on
                    step = ckpt.rewind(engine)["step"]
                    if rank == 0:
                        print(f"non-finite loss: rewound to step {step}", flush=True)
                    continue
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t2 = time.perf_counter()
            flops_per_token = dense_flops + pair_flops * pairs / (seqlen * accum)
            metrics = {
                "step": step, "loss": loss_value, "lr": out["lr"], "grad_norm": out["grad_norm"],
                **throughput(tokens=seqlen * accum * dims.dp, step_s=t2 - t0, world=world,
                             flops_per_token=flops_per_token, peak=peak),
                "attn_imbalance": sum(imbalance) / len(imbalance),
                "comm_bytes": comm,
                "memory/peak_mb": peak_memory_mb(device),
                "time/step_s": t2 - t0, "time/fwd_bwd_s": t1 - t0, "time/optim_s": t2 - t1,
            }
            history.append(metrics)
            if step % cfg.logger.log_every == 0 or step == cfg.train.steps:
                logger.log(metrics, step)
                if rank == 0 and not cfg.train.progress:
                    print(f"step {step} loss {loss_value:.6f} grad_norm {out['grad_norm']:.4f} lr {out['lr']:.3e} "
                          f"tokens_per_s {metrics['tokens_per_s']:.0f}", flush=True)
            evaluate.maybe_eval(evaluator, step, engine.module, cp_group, device, amp_dtype, logger, rank,
                                run_dir(cfg.train))
            smooth = loss_value if smooth is None else 0.9 * smooth + 0.1 * loss_value
            bar.update()
            bar.set_postfix(loss=f"{loss_value:.3f}", avg=f"{smooth:.3f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
            saved = ckpt.maybe_save(step, engine, client_state) if ckpt else None
            if stop.requested(device) or step == stop_at_step:
                if ckpt and not saved:
                    ckpt.save(step, engine, client_state())
                if rank == 0:
                    print(f"stopped after step {step}" + (" (checkpointed)" if ckpt else ""), flush=True)
                break
    except (RuntimeError, dist.DistError) as e:
        if distributed and is_timeout(e):
            raise RuntimeError(describe_timeout(e, step, cfg.train.dist_timeout_s)) from e
        raise
    finally:
        bar.close()
    logger.finish()
    if rank == 0 and history:
        tail = history[-max(len(history) // 10, 1):]
        log.info("trained %d steps: loss %.3f (first step) -> %.3f (mean of the last %d), %.0f tokens/s; wandb: %s",
                 len(history), history[0]["loss"], sum(m["loss"] for m in tail) / len(tail), len(tail),
                 sum(m["tokens_per_s"] for m in history) / len(history), logger.dir or "off")
    return history
