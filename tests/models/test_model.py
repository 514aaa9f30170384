"""The Llama model against a straightforward re-implementation written here."""
import math

import pytest
import torch

import kernels
from kernels import MaskSpec
from models.llama import Llama, LlamaConfig


def naive_forward(sd, cfg, tokens, doc_lens):
    """Dense per-head attention with a block-diagonal causal mask, RoPE via complex numbers."""
    dh = cfg.dim // cfg.n_heads
    t = tokens.numel()
    pos = torch.arange(t, dtype=torch.float64)
    freqs = 1.0 / cfg.rope_theta ** (torch.arange(0, dh, 2, dtype=torch.float64) / dh)
    rot = torch.polar(torch.ones(t, dh // 2, dtype=torch.float64), pos[:, None] * freqs[None, :])

    def rope(x):  # x [t, h, dh]; pairs are (x[i], x[i + dh/2])
        z = torch.complex(x[..., : dh // 2].double(), x[..., dh // 2:].double()) * rot[:, None, :]
        return torch.cat([z.real, z.imag], -1).float()

    def norm(x, w):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + cfg.norm_eps) * w

    doc = torch.repeat_interleave(torch.arange(len(doc_lens)), torch.tensor(doc_lens))
    allowed = (doc[:, None] == doc[None, :]) & torch.ones(t, t, dtype=torch.bool).tril()
    x = sd["embed.weight"][tokens]
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        h = norm(x, sd[p + "attn_norm.weight"])
        q = rope((h @ sd[p + "attn.wq.weight"].T).view(t, cfg.n_heads, dh))
        k = rope((h @ sd[p + "attn.wk.weight"].T).view(t, cfg.n_kv_heads, dh))
        v = (h @ sd[p + "attn.wv.weight"].T).view(t, cfg.n_kv_heads, dh)
        rep = cfg.n_heads // cfg.n_kv_heads
        heads = []
        for hq in range(cfg.n_heads):
            s = q[:, hq] @ k[:, hq // rep].T / math.sqrt(dh)
            s = s.masked_fill(~allowed, float("-inf"))
            heads.append(torch.softmax(s, -1) @ v[:, hq // rep])
        x = x + torch.cat(heads, -1) @ sd[p + "attn.wo.weight"].T
        h = norm(x, sd[p + "mlp_norm.weight"])
        g = h @ sd[p + "mlp.w1.weight"].T
        x = x + ((g * torch.sigmoid(g)) * (h @ sd[p + "mlp.w3.weight"].T)) @ sd[p + "mlp.w2.weight"].T
    x = norm(x, sd["norm.weight"])
    return x @ sd["output.weight"].T


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("n_kv_heads", [1, 2, 4])
def test_forward_matches_naive_reimplementation(tie, n_kv_heads):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=n_kv_heads, tie_embeddings=tie)
    model = Llama(cfg)
    tokens = torch.randint(0, 50, (24,))
    doc_lens = [7, 12, 5]
    mask = MaskSpec.from_doc_lens(doc_lens)
    pos = torch.arange(24)

    def attn(q, k, v):
        return kernels.attention(q, k, v, mask, q_pos=pos, k_pos=pos, backend="reference")[0]

    got = model(tokens, pos, attn)
    want = naive_forward({k: v.detach() for k, v in model.state_dict().items()}, cfg, tokens, doc_lens)
    assert got.shape == (24, 50)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert (model.output.weight is model.embed.weight) == tie


def test_rope_is_relative():
    """Shifting every position by a constant leaves the output unchanged (RoPE encodes offsets only)."""
    torch.manual_seed(0)
    model = Llama(LlamaConfig(vocab_size=30, dim=32, n_heads=4, n_kv_heads=2))
    tokens = torch.randint(0, 30, (16,))
    mask = MaskSpec(causal=True)

    def run(pos):
        return model(tokens, pos, lambda q, k, v: kernels.attention(q, k, v, mask, q_pos=pos, k_pos=pos)[0])

    torch.testing.assert_close(run(torch.arange(16)), run(torch.arange(16) + 1000), rtol=1e-4, atol=1e-4)


def test_param_count_and_flops():
    cfg = LlamaConfig(vocab_size=100, dim=64, n_layers=3, n_heads=8, n_kv_heads=2, ffn_dim=96, tie_embeddings=False)
    model = Llama(cfg)
    per_layer = 64 * 64 + 2 * 64 * 16 + 64 * 64 + 3 * 64 * 96 + 2 * 64
    assert model.num_params() == 2 * 100 * 64 + 3 * per_layer + 64
    dense = model.num_params() - 100 * 64  # the embedding lookup costs no FLOPs when untied
    assert model.flops_per_token(10.0) == 6 * dense + 3.5 * 4 * 10.0 * 8 * 8 * 3
    attn = model.layers[0].attn
    assert (attn.n_heads, attn.n_kv_heads) == (8, 2)  # what a TP transform divides by tp


def test_bad_shapes_name_the_setting():
    with pytest.raises(ValueError, match="n_kv_heads"):
        LlamaConfig(dim=64, n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="vocab_size"):
        Llama(LlamaConfig())
