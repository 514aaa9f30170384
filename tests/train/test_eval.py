"""Long-context evaluation: passkey prompts, scoring, exactness under CP, and eval.every in training."""
import json
import os
import shutil
import sysconfig

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from models.llama import Llama, LlamaConfig
from tests.distributed import run_ranks
from train.config import register
from train.data.tokenizer import ByteTokenizer
from train.evaluate import PASSKEY_INTRO, PASSKEY_NEEDLE, PASSKEY_QUESTION, Evaluator, passkey_sequence, write_outputs
from train.loop import run

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
STDLIB_FILES = ("argparse.py", "typing.py", "inspect.py", "dataclasses.py", "textwrap.py")


@pytest.fixture
def corpus(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    for name in STDLIB_FILES:
        shutil.copy(os.path.join(sysconfig.get_paths()["stdlib"], name), folder / name)
    return str(folder)


def config(corpus, out_dir, *overrides):
    register()
    with initialize_config_dir(config_dir=os.path.join(ROOT, "conf"), version_base="1.3"):
        return OmegaConf.to_object(compose("config", overrides=[
            f"data.path={corpus}", "data.seqlen=64", "model.dim=32", "model.n_heads=4", "model.n_kv_heads=2",
            "train.device=cpu", "train.dtype=float32", "train.progress=false", "logger=disabled",
            f"train.out_dir={out_dir}", "eval.num_docs=2", "eval.buckets=4", "eval.passkey_lengths=[128,256]",
            "eval.passkey_depths=[0,0.5,1]", "eval.passkey_trials=2", *overrides]))


def test_passkey_prompt_holds_the_needle_at_its_depth_and_ends_with_the_answer():
    tok = ByteTokenizer()
    filler = tok.encode("x = 1\n" * 200)
    for depth in (0.0, 0.5, 1.0):
        p = passkey_sequence(tok, filler, 300, depth, 5, [0, int(depth * 10)])
        assert p.tokens.numel() == 300
        text = tok.decode(p.tokens.tolist())  # one byte per token
        key = text[p.answer_start:]
        assert len(key) == 5 and key.isdigit() and text[:p.answer_start].endswith(PASSKEY_QUESTION)
        needle = PASSKEY_NEEDLE.format(key=key)
        filler_len = 300 - len(PASSKEY_INTRO) - len(needle) - len(PASSKEY_QUESTION) - 5
        assert text.index(needle) == len(PASSKEY_INTRO) + round(depth * filler_len)


class Oracle(torch.nn.Module):
    """Predicts token i + 1 from the sequence it is given (shifted=True: repeats token i instead)."""

    def __init__(self, shifted=False):
        super().__init__()
        self.shifted, self.weight = shifted, torch.nn.Parameter(torch.zeros(()))

    def forward(self, tokens, positions, attn):
        nxt = tokens if self.shifted else torch.cat([tokens[1:], tokens[-1:]])
        return torch.nn.functional.one_hot(nxt, 257).float() * 30.0


def test_passkey_scores_greedy_answers_and_loss_buckets_cover_every_position(corpus, tmp_path):
    ev = Evaluator(config(corpus, tmp_path))
    right, wrong = ev.run(Oracle()), ev.run(Oracle(shifted=True))
    cells = [k for k in right if k.startswith("eval/passkey/")]
    assert len(cells) == 6 and all(right[k] == 1.0 for k in cells) and all(wrong[k] == 0.0 for k in cells)
    assert sorted(int(k.rsplit("/", 1)[1]) for k in right if "loss_by_pos" in k) == [16, 32, 48, 64]
    assert right["eval/loss_by_pos/16"] < 1e-6 < wrong["eval/loss_by_pos/16"]
    paths = write_outputs(right, str(tmp_path / "out"), "oracle")
    assert json.loads(open(paths[0]).read()) == right and all(os.path.getsize(p) > 1000 for p in paths[1:])


def _eval_on_ranks(rank, world, cfg):
    import torch.distributed as dist

    torch.manual_seed(0)
    model = Llama(LlamaConfig(vocab_size=257, dim=32, n_heads=4, n_kv_heads=2))
    return Evaluator(cfg).run(model, dist.group.WORLD)


def test_two_rank_evaluation_equals_one_rank(corpus, tmp_path):
    torch.manual_seed(0)
    model = Llama(LlamaConfig(vocab_size=257, dim=32, n_heads=4, n_kv_heads=2))
    one = Evaluator(config(corpus, tmp_path)).run(model)
    ring = config(corpus, tmp_path, "parallel=ring", "+parallel.options.backend=reference")
    two = run_ranks(_eval_on_ranks, 2, ring)
    assert two[0] == two[1]
    assert two[0].keys() == one.keys()
    for key, value in one.items():
        assert two[0][key] == pytest.approx(value, abs=1e-5), key


def test_evaluation_runs_the_models_own_layer_masks(corpus, tmp_path):
    """A model trained with per-layer masks is scored under them: a window on every layer
    equals train.mask's window, a prefix layer leaves its visible targets out."""
    from train.validate import layer_kinds

    torch.manual_seed(0)
    model = Llama(LlamaConfig(vocab_size=257, dim=32, n_heads=4, n_kv_heads=2))

    def evaluate(*overrides):
        cfg = config(corpus, tmp_path, *overrides)
        return Evaluator(cfg, layer_kinds(cfg.train, cfg.model.layer_masks, 2)).run(model)

    plain, window = evaluate(), evaluate("train.mask=document+window", "train.window=8")
    assert evaluate("model.layer_masks=[{window:8}]") == window != plain
    mixed = evaluate("model.layer_masks=[{layers:[1],window:8}]")
    assert mixed["eval/loss"] not in (plain["eval/loss"], window["eval/loss"])
    prefix = evaluate("model.layer_masks=[{layers:[0],prefix:20}]")
    assert torch.isnan(torch.tensor(prefix["eval/loss_by_pos/16"])) and prefix["eval/loss"] == prefix["eval/loss"]


def test_eval_every_logs_and_plots_during_training(corpus, tmp_path):
    history = run(config(corpus, tmp_path, "train.steps=2", "eval.every=2", "optim.warmup_steps=1"))
    assert len(history) == 2
    for name in ("step_00000002.json", "passkey_step_00000002.png", "loss_by_pos_step_00000002.png"):
        assert os.path.isfile(tmp_path / "eval" / name)


@pytest.mark.parametrize("override, match", [
    ("eval.passkey_depths=[1.5]", "eval.passkey_depths"),
    ("eval.num_docs=50", "eval.num_docs=50"),
    ("eval.passkey_lengths=[32]", "eval.passkey_lengths"),
])
def test_bad_eval_settings_raise_naming_them(corpus, tmp_path, override, match):
    with pytest.raises(ValueError, match=match):
        Evaluator(config(corpus, tmp_path, override))


def test_eval_without_checkpoint_starts_from_the_seeded_fresh_model(corpus, tmp_path):
    """scripts.eval_longctx with no eval.checkpoint builds the model under train.seed, so every
    rank (and a 1-rank run) evaluates the same weights whatever the RNG did before."""
    from train.evaluate import evaluate_run

    cfg = config(corpus, tmp_path)
    results = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        results.append(evaluate_run(cfg))
    assert results[0] == results[1]
