"""Bad input raises ValueError naming the argument, before any kernel runs."""
import pytest
import torch

import kernels
from kernels import MaskSpec


def _qkv(hq=4, hkv=2, t=8, d=8):
    return torch.randn(t, hq, d), torch.randn(t, hkv, d), torch.randn(t, hkv, d)


def test_k_and_v_head_counts_must_match():
    q, k, _ = _qkv()
    with pytest.raises(ValueError, match="k .* and v .* must agree"):
        kernels.attention(q, k, torch.randn(8, 1, 8), MaskSpec(causal=True))


def test_query_heads_must_be_a_multiple_of_kv_heads():
    q, k, v = _qkv(hq=3, hkv=2)
    with pytest.raises(ValueError, match="Hq=3 .* Hkv=2"):
        kernels.attention(q, k, v, MaskSpec(causal=True))


@pytest.mark.parametrize("window", [0, -2])
def test_window_must_be_at_least_one(window):
    with pytest.raises(ValueError, match="window"):
        MaskSpec(causal=True, window=window)


@pytest.mark.parametrize("arg", ["q_pos", "k_pos"])
def test_positions_of_the_wrong_length(arg):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=arg):
        kernels.attention(q, k, v, MaskSpec(causal=True), **{arg: torch.arange(7)})


def test_unknown_backend_name():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="backend='fast'"):
        kernels.attention(q, k, v, MaskSpec(), backend="fast")


def test_flash_is_not_available_on_cpu():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="backend='flash' is not available on cpu"):
        kernels.attention(q, k, v, MaskSpec(), backend="flash")


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="backend='triton' is not available on cpu.*TRITON_INTERPRET"):
        kernels.attention(q, k, v, MaskSpec(), backend="triton")


def test_triton_rejects_float64():
    q, k, v = (x.double() for x in _qkv())
    with pytest.raises(ValueError, match="triton backend takes"):
        kernels.attention(q, k, v, MaskSpec(), backend="triton")


def test_auto_picks_the_fused_cpu_backend_and_reference_for_float64():
    assert kernels.resolve_backend("auto", torch.device("cpu"), torch.float32) == "cpu"
    assert kernels.resolve_backend("auto", torch.device("cpu"), torch.float64) == "reference"
