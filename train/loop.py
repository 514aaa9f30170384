"""The training loop: one packed sequence per micro-batch, core attention by the CP strategy.

Per micro-batch: the sequence's documents give the mask; the CP strategy, built over the
rank grid (`mesh=`, so usp uses its Ulysses / ring subgroups) and rebuilt only when the
mask changes (document lengths; never for train.mask=causal or window), picks this rank's
rows and their global positions; the model runs on those rows with `cp.attention` as its
core attention.  With model.layer_masks, one strategy per distinct layer mask over one
shared layout (train/layer_cp.py) gives every layer its own core attention.
Loss invariant: loss_local = sum of cross-entropy over this rank's rows / number of
predicted tokens in the WHOLE sequence, so the sum over the CP group is the DP rank's mean
loss; the engine turns gradients into SUM over CP, MEAN over DP, and the logged loss is
reduced the same way (sum over CP, mean over DP).

`Trainer` is set up once (`__init__`), runs one optimizer step at a time (`train_step`) and
ends with `finish`. Around the step: resume from the newest complete checkpoint and a
checkpoint every checkpoint.every steps (train/checkpoint.py), the non-finite-loss policy
and stop requests (train/faults.py), and a lost peer reported with the step it happened at
(train/dist.py). Status goes through `logging` (rank 0), the progress bar to the terminal.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import time

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

import parallel
from models import hf
from models.memory import MemoryOptions

from . import checkpoint, config, engines, evaluate, faults
from .data import build_loader, next_token_labels
from .dist import beat, build_groups, describe_timeout, is_timeout, join_single_process
from .layer_cp import LayerStrategies, hide_prefix_targets
from .logger import WandbLogger, run_name
from .metrics import attention_pairs, peak_flops, peak_memory_mb, throughput
from .validate import build_mask, layer_kinds, resolve_device, uses_documents, validate, validate_layer_masks

log = logging.getLogger(__name__)


class Trainer:
    """One training run: everything is set up in __init__ (checks first, then the first
    collective), `train_step` runs one optimizer step, `finish` closes it."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.distributed = dist.is_available() and dist.is_initialized()
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if self.distributed else (0, 1)
        self.dims = validate(cfg, self.world)
        self.device, self.amp_dtype = resolve_device(cfg.train)
        self.memory = memory = MemoryOptions.from_train(cfg.train)
        memory.check_device(self.device)
        self.loader = build_loader(cfg.data, cfg.train.seed, self.dims.coordinates(self.rank)[0], self.dims.dp)
        model_cfg = hf.resolve_config(cfg.model, self.loader.corpus.vocab_size, f"data.source={cfg.data.source}")
        validate_layer_masks(cfg.model.layer_masks, model_cfg.n_layers, model_cfg.n_kv_heads, cfg.parallel.tp)
        self.mask_kinds, self.layer_mask = layer_kinds(cfg.train, cfg.model.layer_masks, model_cfg.n_layers)
        self.evaluator = evaluate.build_evaluator(cfg, (self.mask_kinds, self.layer_mask))
        # the first collective: every check is above
        self.groups = build_groups(cfg, self.dims) if self.distributed else None
        self.cp_group = self.groups.cp_group if self.groups else None
        self.info(f"world {self.world}: dp={self.dims.dp} cp={self.dims.cp} tp={self.dims.tp}, "
                  f"engine={cfg.engine.name}, parallel={cfg.parallel.strategy}")
        torch.manual_seed(cfg.train.seed)
        model = hf.build_model(model_cfg).to(self.device)
        model.memory = memory
        # FLOPs per token are linear in attention pairs; taken from the whole model before an
        # engine shards it (TP) or partitions it (ZeRO-3)
        self.dense_flops = model.flops_per_token(0.0)
        self.pair_flops = model.flops_per_token(1.0) - self.dense_flops
        self.engine = engines.build(cfg.engine.name, model, cfg, self.groups)
        self.folder = config.run_folder(cfg.train)
        self.ckpt = None
        if cfg.checkpoint.every or cfg.checkpoint.resume:
            self.ckpt = checkpoint.Checkpointer(cfg.checkpoint, self.rank, self.world, self.folder)
        client = self.ckpt.resume(self.engine) if self.ckpt else None
        self.step = client["step"] if client else 0
        if client:
            self.loader.load_state_dict(client["data"])
            self.info(f"resumed from step {self.step} ({self.ckpt.root})")
        self.guard, self.stop = faults.LossGuard(cfg.faults, self.rank), faults.StopRequest()
        self.config = self.resolved_config()
        self.logger = WandbLogger(cfg.logger, self.folder, self.config, self.rank, name=run_name(cfg))
        self.peak = peak_flops(self.device, cfg.train.peak_tflops)
        self.layer_cps, self.cp, self.cp_key, self.choice = None, None, None, None

    def info(self, message: str) -> None:
        if self.rank == 0:
            log.info(message)

    def resolved_config(self) -> dict:
        """The config as run: the grid the world size gave, not the `cp: null` asked for."""
        values = dataclasses.asdict(self.cfg)
        values["parallel"].update(dp=self.dims.dp, cp=self.dims.cp, tp=self.dims.tp, world=self.world,
                                  ulysses_degree=self.dims.ulysses_degree, ring_degree=self.dims.ring_degree)
        return values

    def client_state(self) -> dict:
        return {"step": self.step, "data": self.loader.state_dict()}

    def strategy(self, doc_lens: list[int]) -> LayerStrategies:
        """The CP strategies for this sequence's layer masks, rebuilt only when the masks change."""
        key = tuple(doc_lens) if uses_documents(self.cfg.train.mask) else ()
        if self.layer_cps is None or key != self.cp_key:
            masks = [build_mask(doc_lens, self.cfg.train, kinds) for kinds in self.mask_kinds]
            cp = LayerStrategies(masks, self.layer_mask, self.cfg.data.seqlen, self.cfg.parallel,
                                 group=self.cp_group, mesh=self.groups)
            self.note_strategy(cp.lead, first=self.cp is None)
            if self.cp is None and len(masks) > 1:
                self.info(f"model.layer_masks: {len(masks)} masks, one strategy each\n{cp.describe()}")
            self.layer_cps, self.cp, self.cp_key = cp, cp.lead, key
            self.rope_positions = cp.rope_positions().to(self.device)
            self.layer_pairs = cp.mean_pairs() if len(masks) > 1 else None
        return self.layer_cps

    def note_strategy(self, cp, first: bool) -> None:
        """The first strategy's balancer (and what parallel=auto chose) into the wandb config and
        run name; auto's choice logged when it changes."""
        choice = getattr(cp, "choice", None)
        if first:
            self.config["parallel"].update(balancer=getattr(cp, "balancer", None), choice=choice)  # cad: its planner
            self.logger.update({"parallel": self.config["parallel"]},
                               run_name(self.cfg, f"auto({choice})" if choice else None))
        if choice is not None and choice != self.choice:
            self.info(f"parallel=auto chose {choice} (predicted {cp.predicted_s:.4g} s fwd+bwd)"
                      + (f"; was {self.choice}" if self.choice else ""))
            self.choice = choice

    def micro_step(self, seq, last: bool) -> tuple[torch.Tensor, dict]:
        """Forward and backward of one packed sequence under the CP strategy.  Returns this rank's
        loss (the module docstring's loss_local, detached) and the attention work it did."""
        t, seqlen, device = self.cfg.train, self.cfg.data.seqlen, self.device
        cp = self.strategy(seq.doc_lens)
        labels = next_token_labels(seq.tokens, seq.doc_lens if uses_documents(t.mask) else None)
        labels = hide_prefix_targets(labels, cp.mask, self.mask_kinds)
        n_predicted = max(int((labels != -100).sum()), 1)
        amp = self.amp_dtype
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            local = self.engine.module(cp.shard(seq.tokens.to(device)), self.rope_positions, cp.attention,
                                       labels=cp.shard(labels.to(device)))
        loss = local / n_predicted
        self.engine.backward(loss, last_micro=last)
        stats = cp.stats
        cp_rank = dist.get_rank(self.cp_group) if self.cp_group is not None else 0
        forward_bytes = stats.bytes_sent[cp_rank] + stats.bytes_recv[cp_rank] if stats.bytes_sent else 0
        return loss.detach(), {
            "pairs": self.layer_pairs or attention_pairs(seq.doc_lens, seqlen, t.mask, t.window),
            "attn_imbalance": stats.imbalance("pairs") if stats.pairs else 1.0,
            "comm_bytes": forward_bytes * self.memory.attention_forwards,  # full checkpointing: twice
        }

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def train_step(self) -> dict | None:
        """One optimizer step over train.grad_accum micro-batches; its metrics, or None when a
        non-finite loss rewound the run to the last checkpoint."""
        self.step += 1
        beat(self.step)  # heartbeat for the peer watchdog; failure notes name this step
        faults.begin_step(self.cfg.faults, self.rank, self.step)
        accum, seqlen = self.cfg.train.grad_accum, self.cfg.data.seqlen
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=self.device)
        pairs = comm = 0
        imbalance, sequences = [], []
        for micro in range(accum):
            seq = next(self.loader)
            sequences.append(seq.index)
            loss, work = self.micro_step(seq, last=micro == accum - 1)
            loss_sum += loss / accum
            pairs += work["pairs"]
            comm += work["comm_bytes"]
            imbalance.append(work["attn_imbalance"])
        local_finite = bool(torch.isfinite(loss_sum))
        if self.distributed:  # before the step, so that every rank takes the same branch below
            dist.all_reduce(loss_sum, group=self.groups.dp_cp_group)
            loss_sum /= self.dims.dp
        self.sync()
        t1 = time.perf_counter()
        loss_value = float(loss_sum)
        action = self.guard.check(loss_value, self.step, sequences, local_finite)
        if action == "ok":
            out = self.engine.step()
        else:
            out = {"grad_norm": math.nan, "lr": self.engine.optimizer.param_groups[0]["lr"]}
            faults.discard_gradients(self.engine)
            if action == "rewind":  # model, optimizer and RNG go back; the data moves on
                self.step = self.ckpt.rewind(self.engine)["step"]
                self.info(f"non-finite loss: rewound to step {self.step}")
                return None
        self.sync()
        t2 = time.perf_counter()
        flops_per_token = self.dense_flops + self.pair_flops * pairs / (seqlen * accum)
        return {
            "step": self.step, "loss": loss_value, "lr": out["lr"], "grad_norm": out["grad_norm"],
            **throughput(tokens=seqlen * accum * self.dims.dp, step_s=t2 - t0, world=self.world,
                         flops_per_token=flops_per_token, peak=self.peak),
            "attn_imbalance": sum(imbalance) / len(imbalance),
            "comm_bytes": comm,
            "memory/peak_mb": peak_memory_mb(self.device),
            "time/step_s": t2 - t0, "time/fwd_bwd_s": t1 - t0, "time/optim_s": t2 - t1,
        }

    def report(self, metrics: dict) -> None:
        """wandb every logger.log_every steps (and the last); a log line too without a progress bar."""
        step = metrics["step"]
        if step % self.cfg.logger.log_every == 0 or step == self.cfg.train.steps:
            self.logger.log(metrics, step)
            if not self.cfg.train.progress:
                self.info(f"step {step} loss {metrics['loss']:.6f} grad_norm {metrics['grad_norm']:.4f} "
                          f"lr {metrics['lr']:.3e} tokens_per_s {metrics['tokens_per_s']:.0f}")

    def checkpoint_or_stop(self, stop_at_step: int | None) -> bool:
        """Save when due; on a stop request (or stop_at_step) save now and say so. True: stop."""
        saved = self.ckpt.maybe_save(self.step, self.engine, self.client_state) if self.ckpt else None
        if not (self.stop.requested(self.device) or self.step == stop_at_step):
            return False
        if self.ckpt and not saved:
            self.ckpt.save(self.step, self.engine, self.client_state())
        self.info(f"stopped after step {self.step}" + (" (checkpointed)" if self.ckpt else ""))
        return True

    def finish(self, history: list[dict]) -> None:
        """Close wandb and log the summary line (rank 0)."""
        self.logger.finish()
        if history:
            tail = history[-max(len(history) // 10, 1):]
            self.info(f"trained {len(history)} steps: loss {history[0]['loss']:.3f} (first step) -> "
                      f"{sum(m['loss'] for m in tail) / len(tail):.3f} (mean of the last {len(tail)}), "
                      f"{sum(m['tokens_per_s'] for m in history) / len(history):.0f} tokens/s; "
                      f"wandb: {self.logger.dir or 'off'}")


def run(cfg, stop_at_step: int | None = None) -> list[dict]:
    """Train up to cfg.train.steps steps; returns the metrics of the steps this call ran
    (identical losses on all ranks). stop_at_step ends this call after that step the way a
    preemption does: checkpoint (when checkpointing is on), then return."""
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_object(cfg)
    own_group = not dist.is_initialized() and engines.needs_process_group(cfg.engine.name)
    if own_group:
        join_single_process()
    try:
        return train(Trainer(cfg), stop_at_step)
    finally:
        if own_group:
            dist.destroy_process_group()


def train(trainer: Trainer, stop_at_step: int | None) -> list[dict]:
    cfg = trainer.cfg
    history, smooth = [], None
    bar = tqdm(total=cfg.train.steps, initial=trainer.step, disable=trainer.rank != 0 or not cfg.train.progress,
               desc="train", unit="step")
    try:
        with logging_redirect_tqdm():
            while trainer.step < cfg.train.steps:
                metrics = trainer.train_step()
                if metrics is None:
                    continue
                history.append(metrics)
                trainer.report(metrics)
                evaluate.maybe_eval(trainer.evaluator, trainer.step, trainer.engine.module, trainer.cp_group,
                                    trainer.device, trainer.amp_dtype, trainer.logger, trainer.rank, trainer.folder)
                smooth = metrics["loss"] if smooth is None else 0.9 * smooth + 0.1 * metrics["loss"]
                bar.update()
                bar.set_postfix(loss=f"{metrics['loss']:.3f}", avg=f"{smooth:.3f}",
                                tok_s=f"{metrics['tokens_per_s']:.0f}")
                if trainer.checkpoint_or_stop(stop_at_step):
                    break
    except (RuntimeError, dist.DistError) as e:
        if trainer.distributed and is_timeout(e):
            raise RuntimeError(describe_timeout(e, trainer.step, cfg.train.dist_timeout_s)) from e
        raise
    finally:
        bar.close()
    trainer.finish(history)
    return history
