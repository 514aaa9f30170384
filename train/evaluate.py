"""Long-context evaluation: loss by position and passkey retrieval, under the run's CP strategy.

- Loss by position: the first `seqlen` tokens of held-out documents longer than that, one
  document per sequence; the per-token loss averaged over documents inside equal-width
  position buckets (`eval/loss_by_pos/<end of bucket>` = mean over positions [start, end)).
- Passkey: filler text from the corpus with a needle ("The pass key is 48213. ...") at a
  depth (0 = start, 1 = end of the filler), then "What is the pass key? The pass key is"
  and the key's tokens.  A trial counts when the model's greedy choice is right at every
  answer token given the ones before (teacher forcing: exactly greedy decoding of the answer,
  in one forward pass).  Targets inside a bidirectional prefix (which those rows can see)
  are left out of the losses.  `eval/passkey/<length>/<depth>` = fraction of trials right.

Every sequence is one document under the run's own masks (train.mask's window and, with
model.layer_masks, each layer's window, sink, prefix or S2 heads) through the training
strategy (one per distinct layer mask, train.layer_cp), and per-token results come back
with `cp.unshard`, so every rank of a CP group gets the full result and
the numbers equal a 1-rank evaluation (up to float32 merge order).  Sequences are pure
functions of (corpus, eval settings), the same on every rank.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .config import EvalConfig
from .data import build_corpus, next_token_labels
from .data.tokenizer import ByteTokenizer, load_tokenizer
from .layer_cp import LayerStrategies, hide_prefix_targets
from .validate import base_kinds, build_mask

PASSKEY_INTRO = "Find the pass key in this text.\n"
PASSKEY_NEEDLE = "\nThe pass key is {key}. Remember it.\n"
PASSKEY_QUESTION = "\nWhat is the pass key? The pass key is "


def validate(ecfg: EvalConfig, data_seqlen: int) -> None:
    """Settings checked identically on every rank before any collective."""
    seqlen = ecfg.seqlen or data_seqlen
    if ecfg.every < 0 or ecfg.num_docs < 1 or ecfg.passkey_trials < 1:
        raise ValueError(f"eval.every={ecfg.every}, eval.num_docs={ecfg.num_docs} and eval.passkey_trials="
                         f"{ecfg.passkey_trials} must be >= 0, >= 1 and >= 1")
    if not 1 <= ecfg.buckets <= seqlen:
        raise ValueError(f"eval.buckets={ecfg.buckets} must be in [1, eval.seqlen={seqlen}]")
    if any(not 0.0 <= d <= 1.0 for d in ecfg.passkey_depths):
        raise ValueError(f"eval.passkey_depths={list(ecfg.passkey_depths)} must lie in [0, 1]")
    if not 1 <= ecfg.passkey_digits <= 18:
        raise ValueError(f"eval.passkey_digits={ecfg.passkey_digits} must be in [1, 18]")


@dataclass
class Passkey:
    tokens: torch.Tensor      # [length]
    answer_start: int         # index of the first answer token


class Evaluator:
    """The evaluation sequences of one run (built once, identical on every rank) and the
    forward passes that score them under the CP strategy."""

    def __init__(self, cfg, layers: tuple[list[dict], list[int]] | None = None):
        """`layers`: the run's distinct layer mask kinds and each layer's index into them
        (train.validate.layer_kinds); None: train.mask's kinds for every layer."""
        ecfg, self.cfg = cfg.eval, cfg
        self.mask_kinds, self.layer_mask = layers or ([base_kinds(cfg.train)], [0])
        validate(ecfg, cfg.data.seqlen)
        self.ecfg = ecfg
        self.seqlen = ecfg.seqlen or cfg.data.seqlen
        data = dataclasses.replace(cfg.data, path=ecfg.path) if ecfg.path else cfg.data
        corpus = build_corpus(data, self.seqlen, ecfg.seed)
        self.tokenizer = corpus_tokenizer(corpus)
        self.docs = long_documents(corpus, self.seqlen + 1, ecfg.num_docs, ecfg.seed)
        lengths = list(ecfg.passkey_lengths) or [self.seqlen // 4, self.seqlen // 2, self.seqlen]
        eos = getattr(corpus, "meta", {}).get("eos_id", self.tokenizer.eos_id)  # prepare_data records the one it used
        filler = filler_stream(corpus, max(lengths), ecfg.seed, eos)
        self.passkeys = {
            (n, d): [passkey_sequence(self.tokenizer, filler, n, d, ecfg.passkey_digits, [ecfg.seed, n, i, round(d * 1000)])
                     for i in range(ecfg.passkey_trials)]
            for n in lengths for d in ecfg.passkey_depths
        }

    def _forward(self, model, tokens, labels, cp_group, device, amp_dtype):
        """Per-token loss and greedy-correctness of one single-document sequence against its
        next-token labels (-100: none), [T] each."""
        masks = [build_mask([tokens.numel()], self.cfg.train, kinds) for kinds in self.mask_kinds]
        cp = LayerStrategies(masks, self.layer_mask, tokens.numel(), self.cfg.parallel, group=cp_group)
        labels = cp.shard(hide_prefix_targets(labels, cp.mask, self.mask_kinds)).to(device)
        positions = cp.rope_positions().to(device)
        with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(cp.shard(tokens).to(device), positions, cp.attention).float()
        loss = F.cross_entropy(logits, labels, ignore_index=-100, reduction="none").masked_fill(labels == -100, torch.nan)
        correct = (logits.argmax(-1) == labels).float()
        return cp.unshard(loss).cpu(), cp.unshard(correct).cpu()

    def run(self, model, cp_group=None, device=torch.device("cpu"), amp_dtype=None) -> dict[str, float]:
        """All metrics, identical on every rank of the CP group."""
        was_training = model.training
        model.eval()
        try:
            losses = torch.stack([self._forward(model, doc[:-1], doc[1:], cp_group, device, amp_dtype)[0]
                                  for doc in self.docs])
            metrics = {"eval/loss": float(losses.nanmean())}
            edges = np.linspace(0, self.seqlen, self.ecfg.buckets + 1).round().astype(int)
            for lo, hi in zip(edges[:-1], edges[1:]):
                metrics[f"eval/loss_by_pos/{hi}"] = float(losses[:, lo:hi].nanmean())
            for (n, d), trials in self.passkeys.items():
                right = 0
                for trial in trials:
                    labels = next_token_labels(trial.tokens, None)
                    _, correct = self._forward(model, trial.tokens, labels, cp_group, device, amp_dtype)
                    right += bool(correct[trial.answer_start - 1:-1].all())
                metrics[f"eval/passkey/{n}/{d:g}"] = right / len(trials)
        finally:
            model.train(was_training)
        return metrics


def corpus_tokenizer(corpus):
    """The tokenizer that made a corpus's token ids (bytes for the stdlib corpus)."""
    if hasattr(corpus, "tokenizer"):
        return corpus.tokenizer
    name = getattr(corpus, "meta", {}).get("tokenizer", "bytes")
    return ByteTokenizer() if name == "bytes" else load_tokenizer(name)


def long_documents(corpus, length: int, count: int, seed: int) -> list[torch.Tensor]:
    """The first `length` tokens of `count` documents at least that long (seeded choice)."""
    long = np.flatnonzero(corpus.lengths >= length)
    if long.size < count:
        raise ValueError(f"eval: only {long.size} documents have >= {length} tokens (eval.seqlen + 1) but eval.num_docs="
                         f"{count}; lower eval.seqlen or eval.num_docs, or point eval.path at longer documents")
    chosen = np.random.default_rng([seed, 0]).choice(long, size=count, replace=False)
    return [torch.from_numpy(corpus.read(int(i))[:length]).long() for i in sorted(chosen)]


def filler_stream(corpus, length: int, seed: int, eos_id: int | None) -> np.ndarray:
    """At least `length` tokens of corpus text (documents end to end, end-of-document ids removed)."""
    order = np.random.default_rng([seed, 1]).permutation(len(corpus.lengths))
    pieces, total = [], 0
    for i in order:
        doc = corpus.read(int(i))
        doc = doc[doc != eos_id] if eos_id is not None else doc
        pieces.append(doc)
        total += doc.size
        if total >= length:
            return np.concatenate(pieces)
    raise ValueError(f"eval: the corpus holds {total} tokens, fewer than the longest passkey length {length}")


def passkey_sequence(tokenizer, filler: np.ndarray, length: int, depth: float, digits: int, seed) -> Passkey:
    """intro + filler with the needle at `depth` + question + answer, exactly `length` tokens."""
    rng = np.random.default_rng(seed)
    key = str(rng.integers(10 ** (digits - 1), 10 ** digits))
    intro = tokenizer.encode(PASSKEY_INTRO)
    needle = tokenizer.encode(PASSKEY_NEEDLE.format(key=key))
    question = tokenizer.encode(PASSKEY_QUESTION)
    answer = tokenizer.encode(PASSKEY_QUESTION + key)[len(question):]
    n_filler = length - len(intro) - len(needle) - len(question) - len(answer)
    if n_filler < 0:
        raise ValueError(f"eval.passkey_lengths: {length} tokens cannot hold the passkey prompt "
                         f"({length - n_filler} tokens); use longer lengths")
    start = int(rng.integers(0, filler.size - n_filler + 1))
    text = filler[start:start + n_filler]
    cut = round(depth * n_filler)
    parts = [intro, text[:cut], needle, text[cut:], question, answer]
    tokens = torch.from_numpy(np.concatenate([np.asarray(p, dtype=np.int64) for p in parts]))
    return Passkey(tokens, length - len(answer))


# ---- outputs --------------------------------------------------------------------------------
def write_outputs(metrics: dict[str, float], folder: str, tag: str) -> list[str]:
    """metrics JSON, a passkey heat map (depth x length) and a loss-vs-position plot in `folder`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(folder, exist_ok=True)
    paths = [os.path.join(folder, f"{tag}.json"), os.path.join(folder, f"passkey_{tag}.png"),
             os.path.join(folder, f"loss_by_pos_{tag}.png")]
    with open(paths[0], "w") as f:
        json.dump(metrics, f, indent=2)
    grid = passkey_grid(metrics)
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(grid["lengths"]), 1.2 + 0.6 * len(grid["depths"])))
    image = ax.imshow(grid["accuracy"], vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    for (r, c), v in np.ndenumerate(grid["accuracy"]):
        ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(grid["lengths"])), grid["lengths"])
    ax.set_yticks(range(len(grid["depths"])), grid["depths"])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(f"passkey accuracy ({tag})")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(paths[1], dpi=100)
    plt.close(fig)
    plot_loss_by_position({tag: metrics}, paths[2])
    return paths


def passkey_grid(metrics: dict[str, float]) -> dict:
    cells = {tuple(k.split("/")[2:]): v for k, v in metrics.items() if k.startswith("eval/passkey/")}
    lengths = sorted({int(n) for n, _ in cells})
    depths = sorted({float(d) for _, d in cells})
    acc = np.array([[cells[(str(n), f"{d:g}")] for n in lengths] for d in depths])
    return {"lengths": lengths, "depths": [f"{d:g}" for d in depths], "accuracy": acc}


def loss_curve(metrics: dict[str, float]) -> tuple[list[int], list[float]]:
    """(bucket ends, mean loss) in position order."""
    points = sorted((int(k.rsplit("/", 1)[1]), v) for k, v in metrics.items() if k.startswith("eval/loss_by_pos/"))
    return [p for p, _ in points], [v for _, v in points]


def plot_loss_by_position(runs: dict[str, dict[str, float]], path: str) -> None:
    """One line per labelled metrics dict: loss of each bucket against its end position."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for label, metrics in runs.items():
        ends, losses = loss_curve(metrics)
        ax.plot(ends, losses, marker="o", label=label)
    ax.set_xlabel("position in document (bucket end, tokens)")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title("loss by position")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def maybe_eval(evaluator: Evaluator | None, step: int, model, cp_group, device, amp_dtype, logger, rank: int,
               out_dir: str) -> dict[str, float] | None:
    """In the loop: evaluate every eval.every steps, log to wandb, write plots from rank 0."""
    if evaluator is None or not evaluator.ecfg.every or step % evaluator.ecfg.every:
        return None
    metrics = evaluator.run(model, cp_group, device, amp_dtype)
    logger.log(metrics, step)
    if rank == 0:
        write_outputs(metrics, os.path.join(out_dir, "eval"), f"step_{step:08d}")
    return metrics


def build_evaluator(cfg, layers: tuple[list[dict], list[int]] | None = None) -> Evaluator | None:
    """The run's evaluator when eval.every is set (built before any collective: it reads data only)."""
    return Evaluator(cfg, layers) if cfg.eval.every else None


def evaluate_run(cfg) -> dict[str, float]:
    """scripts.eval_longctx: the model of `model` (or of eval.checkpoint) evaluated once under
    the configured CP strategy; outputs written into the run folder's eval/ from rank 0."""
    import torch.distributed as dist

    from models.hf import build_model, resolve_config

    from .export import load_trained_model
    from .config import run_folder
    from .dist import build_groups
    from .validate import layer_kinds, resolve_device, validate as validate_run, validate_layer_masks

    distributed = dist.is_available() and dist.is_initialized()
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    dims = validate_run(cfg, world)
    if dims.tp != 1:
        raise ValueError(f"scripts.eval_longctx runs context parallelism only; parallel.tp={dims.tp} must be 1")
    device, amp_dtype = resolve_device(cfg.train)
    evaluator = Evaluator(cfg)
    if cfg.eval.checkpoint:
        model = load_trained_model(cfg.eval.checkpoint, cfg.model)
    else:
        vocab = max(int(evaluator.tokenizer.vocab_size), 1)
        torch.manual_seed(cfg.train.seed)  # the fresh model a run starts from, the same on every rank
        model = build_model(resolve_config(cfg.model, vocab, f"data.source={cfg.data.source}"))
    validate_layer_masks(cfg.model.layer_masks, model.cfg.n_layers, model.cfg.n_kv_heads)
    evaluator.mask_kinds, evaluator.layer_mask = layer_kinds(cfg.train, cfg.model.layer_masks, model.cfg.n_layers)
    groups = build_groups(cfg, dims) if distributed else None  # the first collective: every check is above
    metrics = evaluator.run(model.to(device), groups.cp_group if groups else None, device, amp_dtype)
    if rank == 0:
        write_outputs(metrics, os.path.join(run_folder(cfg.train), "eval"), "eval")
    return metrics
