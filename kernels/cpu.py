"""CPU backend: torch's fused flash-attention ops, called once per useful tile.

The rows are cut into tiles (`plan`): runs of consecutive positions inside one document
(ring blocks, zigzag halves and documents are long runs), split further only where the
mask is partial.  Each (query tile, key tile) pair is skipped when hidden, run without a
mask when fully visible, with the op's top-left `is_causal` when the mask is exactly the
causal triangle, and with an explicit additive mask otherwise.  Partials of one query
row over several key tiles are merged in float32 with their lse (`kernels.merge`).

Backward runs the fused backward op per computed tile with the FINAL out/lse of the
rows, which is exact because the op forms dS = P * (dP - rowsum(dO * O)) from them.
A gradient of lse enters as one extra head_dim column: zero in q, k, v, `-dlse` in out
and 1 in dout, so the op's rowsum(dO * O) becomes rowsum(dO * O) - dlse.
Both ops map query head h to kv head h // G themselves (GQA/MQA without repeating K/V).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .blocks import FULL, HIDDEN, RowInfo, classify
from .mask import MaskSpec

TILE = 512            # largest tile side that gets an explicit [TILE, TILE] mask
MIN_RUN = 64          # average run length below which rows count as scattered
CAUSAL, MASKED = 3, 4  # tile kinds beyond blocks.FULL

_fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


class Tile(NamedTuple):
    q0: int
    q1: int
    k0: int
    k1: int
    kind: int


def plan(mask: MaskSpec, q_pos: torch.Tensor, k_pos: torch.Tensor) -> list[Tile]:
    """The computed tiles; every allowed (query, key) pair lies in exactly one of them."""
    qi, ki = RowInfo.of(mask, q_pos), RowInfo.of(mask, k_pos)
    tiles: list[Tile] = []
    for qa, qb in _start_ranges(qi):
        for ka, kb in _start_ranges(ki):
            _split(mask, qi, ki, qa, qb, ka, kb, tiles)
    return tiles


def _start_ranges(info: RowInfo) -> list[tuple[int, int]]:
    """Runs when they are long on average, else the whole range (scattered positions,
    e.g. a stripe layout, are then cut into fixed tiles by `_split`)."""
    runs = info.runs()
    n = info.pos.numel()
    if n == 0:
        return []
    return runs if len(runs) * MIN_RUN <= n or len(runs) == 1 else [(0, n)]


def _split(mask, qi: RowInfo, ki: RowInfo, qa, qb, ka, kb, tiles: list[Tile]) -> None:
    qs, ks = qi.range_stats(qa, qb), ki.range_stats(ka, kb)
    kind = int(classify(mask, qs, ks))
    if kind == HIDDEN:
        return
    if kind == FULL:
        tiles.append(Tile(qa, qb, ka, kb, FULL))
        return
    window_covers = mask.window is None or int(qs[1] - ks[0]) < mask.window
    if window_covers and qi.is_run(qa, qb) and ki.is_run(ka, kb):
        # Same document, consecutive positions, only causality is partial: shift the
        # tile so that both sides start at the same position, where is_causal applies.
        shift = int(qs[0] - ks[0])
        if shift > 0:
            tiles.append(Tile(qa, qb, ka, ka + shift, FULL))
            tiles.append(Tile(qa, qb, ka + shift, kb, CAUSAL))
        else:
            tiles.append(Tile(qa - shift, qb, ka, kb, CAUSAL))
        return
    if qb - qa <= TILE and kb - ka <= TILE:
        if bool(mask.allowed(qi.pos[qa:qb], ki.pos[ka:kb]).any()):  # ranges cannot prove all hidden
            tiles.append(Tile(qa, qb, ka, kb, MASKED))
        return
    for q0, q1 in _halves(qa, qb):
        for k0, k1 in _halves(ka, kb):
            _split(mask, qi, ki, q0, q1, k0, k1, tiles)


def _halves(a: int, b: int) -> list[tuple[int, int]]:
    if b - a <= TILE:
        return [(a, b)]
    mid = a + ((b - a) // 2 + TILE - 1) // TILE * TILE
    return [(a, mid), (mid, b)]


def _bhtd(x: torch.Tensor) -> torch.Tensor:
    """[T, H, D] -> [1, H, T, D] view, the op's layout."""
    return x.permute(1, 0, 2).unsqueeze(0)


def _tile_mask(mask, q_pos, k_pos, t: Tile, dtype):
    """Additive mask for a MASKED tile and the rows of the tile that see no key."""
    if t.kind != MASKED:
        return None, None
    allowed = mask.allowed(q_pos[t.q0:t.q1], k_pos[t.k0:t.k1])
    bias = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, float("-inf"))
    return bias.view(1, 1, *allowed.shape), ~allowed.any(1)


def forward(q, k, v, mask, q_pos, k_pos, scale):
    tq, hq, d = q.shape
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    tiles = plan(mask, q_pos, k_pos)
    partials = []
    for t in tiles:
        bias, dead = _tile_mask(mask, q_pos, k_pos, t, q.dtype)
        o, lse = _fwd(_bhtd(q[t.q0:t.q1]), _bhtd(k[t.k0:t.k1]), _bhtd(v[t.k0:t.k1]), 0.0,
                      t.kind == CAUSAL, attn_mask=bias, scale=scale)
        o, lse = o[0].permute(1, 0, 2), lse[0]
        if dead is not None and bool(dead.any()):
            lse = lse.masked_fill(dead, float("-inf"))  # the op reports 0 for empty rows
        partials.append((t, o, lse))
    if len(tiles) == 1 and (tiles[0].q0, tiles[0].q1) == (0, tq):
        _, o, lse = partials[0]
        return o, lse.to(lse_dtype)
    from .api import merge
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = torch.zeros(tq, hq, d, dtype=acc)
    lse_all = torch.full((hq, tq), float("-inf"), dtype=acc)
    for t, o, lse in partials:
        out[t.q0:t.q1], lse_all[:, t.q0:t.q1] = merge(out[t.q0:t.q1], lse_all[:, t.q0:t.q1], o, lse)
    return out.to(q.dtype), lse_all.to(lse_dtype)


def backward(dout, q, k, v, out, lse, mask, q_pos, k_pos, scale, dlse=None):
    tq, hq, d = q.shape
    tiles = plan(mask, q_pos, k_pos)
    lse = lse.to(torch.float64 if q.dtype == torch.float64 else torch.float32)
    lse = lse.masked_fill(torch.isneginf(lse), float("inf"))  # rows seeing no key: P = 0
    dout = dout.to(q.dtype)
    out = out.to(q.dtype)
    if dlse is not None:
        q, k, v = (torch.nn.functional.pad(x, (0, 1)) for x in (q, k, v))
        out = torch.cat([out, -dlse.t().unsqueeze(-1).to(q.dtype)], dim=-1)
        dout = torch.nn.functional.pad(dout, (0, 1), value=1.0)
    if len(tiles) == 1 and (tiles[0].q0, tiles[0].q1, tiles[0].k0, tiles[0].k1) == (0, tq, 0, k.shape[0]):
        return tuple(g[..., :d] for g in _tile_backward(tiles[0], dout, q, k, v, out, lse, mask, q_pos, k_pos, scale))
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    dq = torch.zeros(tq, hq, d, dtype=acc)
    dk = torch.zeros(k.shape[0], k.shape[1], d, dtype=acc)
    dv = torch.zeros_like(dk)
    for t in tiles:
        gq, gk, gv = _tile_backward(t, dout, q, k, v, out, lse, mask, q_pos, k_pos, scale)
        dq[t.q0:t.q1] += gq[..., :d]
        dk[t.k0:t.k1] += gk[..., :d]
        dv[t.k0:t.k1] += gv[..., :d]
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _tile_backward(t: Tile, dout, q, k, v, out, lse, mask, q_pos, k_pos, scale):
    """(dq, dk, dv) of one tile as [T, H, D] views (the op sums dk/dv over each group)."""
    bias, _ = _tile_mask(mask, q_pos, k_pos, t, q.dtype)
    rows, keys = slice(t.q0, t.q1), slice(t.k0, t.k1)
    grads = _bwd(_bhtd(dout[rows]), _bhtd(q[rows]), _bhtd(k[keys]), _bhtd(v[keys]), _bhtd(out[rows]),
                 lse[:, rows].unsqueeze(0).contiguous(), 0.0, t.kind == CAUSAL, attn_mask=bias, scale=scale)
    return tuple(g[0].permute(1, 0, 2) for g in grads)


def available(device) -> tuple[bool, str]:
    if torch.device(device).type != "cpu":
        return False, "the cpu backend runs on CPU tensors only"
    return True, ""
