"""Hugging Face checkpoints both ways against transformers itself (tiny random models, no hub):
logits within 2e-4 in float32 for every family and RoPE rule, packed and unpacked, and bad
input rejected before anything loads."""
import dataclasses
import json

import pytest
import torch

import kernels
from kernels import MaskSpec
from models import hf
from models.llama import Llama, LlamaConfig
from models.rope import RopeConfig, document_positions

transformers = pytest.importorskip("transformers")

MAX_POS = 64
SHAPE = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=MAX_POS, rms_norm_eps=1e-5)
ROPES = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    "yarn": {"rope_type": "yarn", "rope_theta": 5000.0, "factor": 4.0, "original_max_position_embeddings": 16},
    "llama3": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
}
FAMILIES = {  # name: (config class, extra settings)
    "llama": ("LlamaConfig", {}),
    "llama_tied": ("LlamaConfig", {"tie_word_embeddings": True}),
    "llama_bias": ("LlamaConfig", {"attention_bias": True}),
    "mistral": ("MistralConfig", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", {}),
}


def hf_model(family, rope, seed=0):
    cls, extra = FAMILIES[family]
    cfg = getattr(transformers, cls)(**SHAPE, rope_parameters=dict(ROPES[rope] if isinstance(rope, str) else rope),
                                     **extra)
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # random biases and norms, so a mix-up of them shows
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.normal_(0.5 if "norm" in name else 0.0, 0.2)
    return model


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(input_ids=tokens[None]).logits[0]


def our_logits(model, tokens, doc_lens=None):
    doc_lens = doc_lens or [tokens.numel()]
    mask = MaskSpec.from_doc_lens(doc_lens)
    pos = torch.arange(tokens.numel())

    def attn(q, k, v):
        return kernels.attention(q, k, v, mask, q_pos=pos, k_pos=pos, backend="reference")[0]

    with torch.no_grad():
        return model(tokens, document_positions(pos, mask.cu_doc_starts), attn)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("rope", ROPES)
def test_from_pretrained_matches_transformers_packed_and_unpacked(tmp_path, family, rope):
    ref = hf_model(family, rope)
    ref.save_pretrained(tmp_path)
    ours = hf.from_pretrained(tmp_path)
    assert ours.cfg.tie_embeddings == (family == "llama_tied")
    torch.manual_seed(1)
    doc_lens = [23, 41, 9]  # the second document runs past the original context of yarn / llama3
    tokens = torch.randint(0, SHAPE["vocab_size"], (sum(doc_lens),))
    torch.testing.assert_close(our_logits(ours, tokens[:41]), hf_logits(ref, tokens[:41]), rtol=0, atol=2e-4)
    packed = our_logits(ours, tokens, doc_lens)
    start = 0
    for n in doc_lens:
        torch.testing.assert_close(packed[start:start + n], hf_logits(ref, tokens[start:start + n]), rtol=0, atol=2e-4)
        start += n


def test_dynamic_ntk_matches_transformers_at_the_configured_length(tmp_path):
    """transformers grows the NTK base to the call's length; ours is fixed at model.rope.seq_len."""
    ref = hf_model("llama", {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0})
    ref.save_pretrained(tmp_path)
    length = 2 * MAX_POS
    ours = hf.from_pretrained(tmp_path)
    ours_long = hf.from_pretrained(tmp_path, rope=dataclasses.replace(ours.cfg.rope, seq_len=length))
    tokens = torch.randint(0, SHAPE["vocab_size"], (length,))
    want = hf_logits(ref, tokens)
    torch.testing.assert_close(our_logits(ours_long, tokens), want, rtol=0, atol=2e-4)
    assert not torch.equal(ours_long.layers[0].attn.rotary.inv_freq, ours.layers[0].attn.rotary.inv_freq)


def test_older_top_level_rope_theta_and_rope_scaling(tmp_path):
    ref = hf_model("llama", "llama3")
    ref.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    params = cfg.pop("rope_parameters")
    cfg["rope_theta"] = params.pop("rope_theta")
    cfg["rope_scaling"] = {"type" if k == "rope_type" else k: v for k, v in params.items()}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    ours = hf.from_pretrained(tmp_path)
    assert ours.cfg.rope.type == "llama3" and ours.cfg.rope_theta == 500000.0
    tokens = torch.randint(0, SHAPE["vocab_size"], (40,))
    torch.testing.assert_close(our_logits(ours, tokens), hf_logits(ref, tokens), rtol=0, atol=2e-4)


@pytest.mark.parametrize("tie, bias, rope", [(True, False, "default"), (False, True, "yarn"), (False, False, "llama3")])
def test_save_pretrained_loads_in_transformers_with_the_same_logits(tmp_path, tie, bias, rope):
    params = dict(ROPES[rope])
    rope_cfg = RopeConfig(type=params.pop("rope_type"), theta=params.pop("rope_theta"), max_position_embeddings=MAX_POS,
                          **params)
    torch.manual_seed(0)
    model = Llama(LlamaConfig(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, tie_embeddings=tie,
                              qkv_bias=bias, rope=rope_cfg))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.2)
    hf.save_pretrained(model, tmp_path / "one")
    hf.save_pretrained(model, tmp_path / "sharded", max_shard_bytes=20_000)
    assert (tmp_path / "one" / hf.WEIGHTS_FILE).is_file()
    index = json.loads((tmp_path / "sharded" / hf.INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 2
    tokens = torch.randint(0, 97, (50,))
    want = our_logits(model, tokens)
    for folder in ("one", "sharded"):
        theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / folder, dtype=torch.float32).eval()
        assert type(theirs).__name__ == ("Qwen2ForCausalLM" if bias else "LlamaForCausalLM")
        torch.testing.assert_close(hf_logits(theirs, tokens), want, rtol=0, atol=2e-4)
        again = hf.from_pretrained(tmp_path / folder)
        torch.testing.assert_close(our_logits(again, tokens), want, rtol=0, atol=0)


def test_from_pretrained_casts_to_the_requested_dtype(tmp_path):
    hf_model("qwen2", "default").save_pretrained(tmp_path)
    model = hf.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def edit_config(folder, **changes):
    cfg = json.loads((folder / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k)
        else:
            cfg[k] = v
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("change, message", [
    ({"hidden_size": None}, "config.json has no 'hidden_size'"),
    ({"intermediate_size": 64}, "model.layers.0.mlp.gate_proj.weight' has shape \\[48, 32\\] but config.json implies \\[64, 32\\]"),
    ({"rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, "rope_type='longrope' is not implemented"),
    ({"model_type": "gpt2"}, "model_type='gpt2' is not supported"),
    ({"model_type": "mistral", "sliding_window": 16}, "sliding_window=16"),
    ({"num_hidden_layers": 3}, "tensor 'model.layers.2.input_layernorm.weight' is missing"),
])
def test_bad_checkpoints_raise_naming_the_file_and_key(tmp_path, change, message):
    hf_model("llama", "default").save_pretrained(tmp_path)
    edit_config(tmp_path, **change)
    with pytest.raises(ValueError, match=message):
        hf.from_pretrained(tmp_path)


def test_missing_files_raise(tmp_path):
    with pytest.raises(ValueError, match="config.json does not exist"):
        hf.from_pretrained(tmp_path)
    hf_model("llama", "default").save_pretrained(tmp_path)
    (tmp_path / hf.WEIGHTS_FILE).unlink()
    with pytest.raises(ValueError, match="neither model.safetensors nor"):
        hf.from_pretrained(tmp_path)
