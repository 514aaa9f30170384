"""RoPE rules against transformers' own ROPE_INIT_FUNCTIONS, and document-relative positions."""
import pytest
import torch

from models.rope import RopeConfig, Rotary, document_positions, inv_freq_and_scale

transformers = pytest.importorskip("transformers")
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402

HEAD_DIM, THETA, MAX_POS = 64, 500000.0, 8192
CASES = {
    "default": {},
    "linear": {"factor": 4.0},
    "dynamic": {"factor": 4.0},
    "yarn": {"factor": 4.0, "original_max_position_embeddings": 2048},
    "yarn_mscale": {"factor": 8.0, "original_max_position_embeddings": 1024, "mscale": 0.707, "mscale_all_dim": 1.0,
                    "beta_fast": 16, "beta_slow": 2},
    "yarn_attention_factor": {"factor": 2.0, "original_max_position_embeddings": 4096, "attention_factor": 1.3,
                              "truncate": False},
    "llama3": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 2048},
}


def hf_config(rope_type, params):
    cfg = transformers.LlamaConfig(hidden_size=HEAD_DIM * 4, num_attention_heads=4, max_position_embeddings=MAX_POS,
                                   rope_parameters={"rope_type": rope_type, "rope_theta": THETA, **params})
    return cfg


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("seq_len", [None, 3 * MAX_POS])
def test_inverse_frequencies_and_attention_factor_match_transformers(case, seq_len):
    rope_type = case.split("_")[0]
    params = CASES[case]
    if rope_type == "default":
        inv = 1.0 / THETA ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float) / HEAD_DIM)
        want = (inv, 1.0)
    else:
        want = ROPE_INIT_FUNCTIONS[rope_type](hf_config(rope_type, params), torch.device("cpu"), seq_len=seq_len)
    ours = RopeConfig(type=rope_type, max_position_embeddings=MAX_POS, seq_len=seq_len, **params)
    inv, scale = inv_freq_and_scale(ours, THETA, HEAD_DIM)
    torch.testing.assert_close(inv, want[0].float(), rtol=1e-6, atol=0)
    assert scale == pytest.approx(want[1], rel=1e-6)
    if case == "dynamic" and seq_len:  # the longer context really changed the frequencies
        assert not torch.allclose(inv, inv_freq_and_scale(RopeConfig(type="dynamic", factor=4.0,
                                                                     max_position_embeddings=MAX_POS), THETA, HEAD_DIM)[0])


def test_rotary_matches_transformers_apply_rotary_pos_emb():
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    params = CASES["yarn"]
    hf = LlamaRotaryEmbedding(hf_config("yarn", params))
    ours = Rotary(RopeConfig(type="yarn", max_position_embeddings=MAX_POS, **params), THETA, HEAD_DIM)
    x = torch.randn(1, 3, 50, HEAD_DIM)  # [batch, heads, T, D]
    pos = torch.arange(1000, 1050)
    cos, sin = hf(x, pos[None])
    want, _ = apply_rotary_pos_emb(x, x, cos, sin)
    got = ours(x[0].transpose(0, 1), pos).transpose(0, 1)
    torch.testing.assert_close(got, want[0], rtol=1e-5, atol=1e-5)


def test_document_positions_restart_at_each_document():
    from kernels import MaskSpec

    mask = MaskSpec.from_doc_lens([3, 4, 2])
    pos = torch.tensor([8, 0, 4, 3, 2, 6])
    assert document_positions(pos, mask.cu_doc_starts).tolist() == [1, 0, 1, 0, 2, 3]
    assert document_positions(pos, None) is pos


@pytest.mark.parametrize("bad, key", [({"type": "longrope"}, "model.rope.type"), ({"type": "linear", "factor": 0.5},
                                      "model.rope.factor"), ({"type": "llama3", "high_freq_factor": 0.5}, "high_freq")])
def test_bad_rope_settings_name_the_key(bad, key):
    with pytest.raises(ValueError, match=key):
        RopeConfig(**bad)
