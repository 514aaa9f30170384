"""Training from a Hugging Face checkpoint (model=hf) and exporting the run's checkpoint back."""
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from safetensors.torch import load_file

import kernels
from models import hf
from models.llama import Llama, LlamaConfig
from models.rope import RopeConfig, document_positions
from scripts.export_hf import main as export_main
from tests.distributed import run_ranks
from tests.train.test_eval import config, corpus  # noqa: F401 - the fixture
from train.data import build_loader, next_token_labels
from train.loop import build_mask, run


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(3)
    model = Llama(LlamaConfig(vocab_size=300, dim=32, n_heads=4, n_kv_heads=2, qkv_bias=True, tie_embeddings=False))
    hf.save_pretrained(model, tmp_path / "pretrained")
    return tmp_path / "pretrained"


def test_training_starts_from_the_checkpoint_and_exports_back(corpus, checkpoint, tmp_path):  # noqa: F811
    cfg = config(corpus, tmp_path / "run", "model=hf", f"model.path={checkpoint}", "train.steps=1", "optim.lr=0",
                 "optim.warmup_steps=0", "checkpoint=default", "checkpoint.every=1")
    history = run(cfg)
    seq = next(build_loader(cfg.data, cfg.train.seed, 0, 1))
    model = hf.from_pretrained(checkpoint)
    mask = build_mask(seq.doc_lens, cfg.train)
    pos = torch.arange(seq.tokens.numel())
    with torch.no_grad():
        logits = model(seq.tokens, document_positions(pos, mask.cu_doc_starts),
                       lambda q, k, v: kernels.attention(q, k, v, mask, q_pos=pos, k_pos=pos)[0])
    want = F.cross_entropy(logits, next_token_labels(seq.tokens, seq.doc_lens), ignore_index=-100)
    assert history[0]["loss"] == pytest.approx(float(want), abs=1e-5)

    run_config = tmp_path / "run_config.yaml"
    OmegaConf.save(OmegaConf.structured(cfg), run_config)
    step = tmp_path / "run" / "checkpoints" / "step_00000001"
    export_main([str(step), str(tmp_path / "exported"), "--config", str(run_config)])
    original, exported = load_file(checkpoint / hf.WEIGHTS_FILE), load_file(tmp_path / "exported" / hf.WEIGHTS_FILE)
    assert original.keys() == exported.keys()
    for name, t in original.items():
        assert torch.equal(t, exported[name]), name  # lr = 0: the weights went through unchanged


def test_a_tokenizer_larger_than_the_embedding_raises_naming_both(corpus, tmp_path):  # noqa: F811
    small = Llama(LlamaConfig(vocab_size=100, dim=32, n_heads=4, n_kv_heads=2))
    hf.save_pretrained(small, tmp_path / "small")
    cfg = config(corpus, tmp_path / "run", "model=hf", f"model.path={tmp_path / 'small'}", "train.steps=1")
    with pytest.raises(ValueError, match=r"data.source=stdlib: 257 ids.*config.json: vocab_size=100"):
        run(cfg)


def test_model_rope_replaces_the_checkpoint_rope_keeping_its_theta(checkpoint):
    cfg = hf.resolve_config(LlamaConfig(path=str(checkpoint), rope=RopeConfig(type="yarn", factor=4.0)), 257, "x")
    assert cfg.rope.type == "yarn" and cfg.rope.theta == 10000.0 and cfg.rope.original_context == 4096
    assert hf.resolve_config(LlamaConfig(path=str(checkpoint), rope=RopeConfig(type="checkpoint")), 257,
                             "x").rope.type == "default"
    with pytest.raises(ValueError, match="model.rope.type=checkpoint needs model.path"):
        Llama(LlamaConfig(vocab_size=10, rope=RopeConfig(type="checkpoint")))


def test_a_checkpoint_folder_tokenizer_prepares_data_that_trains(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from scripts.prepare_data import prepare

    words = ["<unk>", "</s>"] + [f"w{i}" for i in range(30)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    folder = tmp_path / "model"
    hf.save_pretrained(Llama(LlamaConfig(vocab_size=len(words), dim=32, n_heads=4, n_kv_heads=2)), folder)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text('{"eos_token": "</s>"}')
    (tmp_path / "text").mkdir()
    for d in range(4):
        (tmp_path / "text" / f"{d}.txt").write_text(" ".join(f"w{(d * i) % 30}" for i in range(60)))
    meta = prepare(str(tmp_path / "text"), str(tmp_path / "tokens"), tokenizer=str(folder))
    assert meta["vocab_size"] == len(words) and meta["eos_id"] == 1
    history = run(config(str(tmp_path / "text"), tmp_path / "run", "model=hf", f"model.path={folder}", "data=tokens",
                         f"data.path={tmp_path / 'tokens'}", "data.seqlen=32", "train.steps=2"))
    assert len(history) == 2


def test_tensor_parallel_shards_merge_back_into_the_plain_weights():
    from train.engines.tensor_parallel import COLUMN, ROW
    from train.export import _merge_tp

    model = Llama(LlamaConfig(vocab_size=50, dim=32, n_heads=4, n_kv_heads=2))
    saved = {}
    for name, t in model.state_dict().items():
        layer = name.rsplit(".", 1)[0]
        dim = 0 if layer.endswith(COLUMN) else 1 if layer.endswith(ROW) else None
        if dim is None:
            saved[name] = t
        else:  # what megatron's rank r holds: rows / columns [r n / 2, (r + 1) n / 2)
            saved.update({f"{name}@tp{r}": part for r, part in enumerate(t.chunk(2, dim=dim))})
    merged = _merge_tp(saved)
    assert merged.keys() == model.state_dict().keys()
    assert all(torch.equal(merged[k], v) for k, v in model.state_dict().items())


def test_extend_context_experiment_rescales_rope_for_the_new_seqlen(checkpoint, tmp_path):
    cfg = config("unused", tmp_path, "model=hf", f"model.path={checkpoint}", "experiment=extend_context",
                 "data.seqlen=2048")
    assert (cfg.model.rope.type, cfg.model.rope.factor, cfg.model.rope.max_position_embeddings) == ("yarn", 4.0, 2048)
    assert cfg.optim.lr < 1e-3 and cfg.eval.every > 0
    resolved = hf.resolve_config(cfg.model, 257, "bytes")
    assert resolved.rope.original_context == 4096 and resolved.rope.theta == 10000.0


def _train_and_checkpoint(rank, world, configs):
    for cfg in configs:
        run(cfg)


def test_deepspeed_and_megatron_tp_checkpoints_export_the_same_model(corpus, tmp_path):  # noqa: F811
    """Both engines train the same sequences from the same init (DeepSpeed on 2 CP ranks, megatron
    on 2 TP ranks); their sharded checkpoints (ZeRO-1 partitions; TP row/column shards) read
    back into one plain model that agrees."""
    from train.export import load_trained_model

    common = ["train.steps=2", "checkpoint=default", "checkpoint.every=2"]
    runs = {"deepspeed": ["engine=deepspeed", "engine.options.zero_stage=1", "parallel=ring"],
            "megatron": ["engine=megatron", "parallel.tp=2"]}
    configs = [config(corpus, tmp_path / name, *engine, *common) for name, engine in runs.items()]
    run_ranks(_train_and_checkpoint, 2, configs, timeout=600)
    models = [load_trained_model(str(tmp_path / name / "checkpoints" / "step_00000002"), cfg.model)
              for name, cfg in zip(runs, configs)]
    ds, mg = (m.state_dict() for m in models)
    assert ds.keys() == mg.keys()
    for name in ds:
        torch.testing.assert_close(ds[name], mg[name], rtol=0, atol=1e-5)
    torch.manual_seed(configs[0].train.seed)  # the loop's init: two steps moved every weight away from it
    init = Llama(LlamaConfig(vocab_size=257, dim=32, n_heads=4, n_kv_heads=2)).state_dict()
    assert all(not torch.equal(init[name], ds[name]) for name in ds if "norm" not in name)
