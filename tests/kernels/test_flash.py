"""flash backend: on CPU it is unavailable with a clear error; its mask translation
(documents -> varlen sequences, causal/window -> bottom-right window_size per call) is
pure Python and is checked here against MaskSpec.allowed."""
import pytest
import torch

from kernels import MaskSpec, flash
from tests.kernels.cases import T, masks


def test_unavailable_on_cpu_names_the_reason():
    ok, why = flash.available("cpu")
    assert not ok and "CUDA" in why


def _flash_semantics(left, right, sq, sk):
    """flash-attn's mask: query i sees key j when i+sk-sq-left <= j <= i+sk-sq+right (-1: no limit)."""
    i = torch.arange(sq).view(-1, 1)
    j = torch.arange(sk).view(1, -1)
    diag = i + sk - sq
    ok = torch.ones(sq, sk, dtype=torch.bool)
    if left >= 0:
        ok &= j >= diag - left
    if right >= 0:
        ok &= j <= diag + right
    return ok


@pytest.mark.parametrize("mask_name", list(masks()))
@pytest.mark.parametrize("layout", [(0, T, 0, T), (20, 30, 5, 25), (5, 25, 20, 35), (30, 40, 0, 12)])
def test_window_translation_reproduces_the_mask(mask_name, layout):
    mask = masks()[mask_name]
    q_pos, k_pos = torch.arange(layout[0], layout[1]), torch.arange(layout[2], layout[3])
    got = torch.zeros(q_pos.numel(), k_pos.numel(), dtype=torch.bool)
    for (left, right), pairs in flash._groups(mask, q_pos, k_pos).items():
        for (qa, qb), (ka, kb) in pairs:
            got[qa:qb, ka:kb] |= _flash_semantics(left, right, qb - qa, kb - ka)
    assert torch.equal(got, mask.allowed(q_pos, k_pos))


def test_scattered_positions_are_rejected():
    with pytest.raises(ValueError, match="q_pos: the flash backend needs each document"):
        flash._groups(MaskSpec(causal=True), torch.arange(0, T, 2), torch.arange(T))


def test_supports_only_one_run_per_document():
    mask = masks()["causal+document+window"]
    assert flash.supports(mask, torch.arange(5, 30), torch.arange(T))
    assert not flash.supports(mask, torch.arange(0, T, 2), torch.arange(T))
    assert not flash.supports(None, None, None)
