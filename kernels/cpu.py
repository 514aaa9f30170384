"""CPU backend: torch's fused flash-attention ops, called once per useful tile.

The rows are cut into tiles (`plan`): runs of consecutive positions inside one document
(ring blocks, zigzag halves and documents are long runs; a prefix or the sink tokens end
a run), split further only where the mask is partial.  Each (query tile, key tile) pair is
skipped when hidden, run without a mask when fully visible, with the op's top-left
`is_causal` when the mask is exactly the causal triangle, and with an explicit additive
mask otherwise.  Partials of one query row over several key tiles are merged in float32
with their lse (`kernels.merge`).

Masks that depend on the KV head (S2 `heads`) run per KV head (with its G query heads),
over two compacted key sets: the keys the head sees at any distance (dense heads: all;
sparse heads: the blocks on its stride), where the head term is True and the mask is the
head-free one, and the other keys, which only the local band reaches.  Each set is
gathered into its own K/V rows, so the op never touches the blocks a head skips.  Such
compacted keys are not runs, so a partial tile is cut where the causal diagonal, the
window or the band's edge crosses its keys, and at the S2 block edges of its queries
(one block of queries sees whole key blocks): the tiles come out full or causal.

Backward runs the fused backward op per computed tile with the FINAL out/lse of the
rows, which is exact because the op forms dS = P * (dP - rowsum(dO * O)) from them.
A gradient of lse enters as one extra head_dim column: zero in q, k, v, `-dlse` in out
and 1 in dout, so the op's rowsum(dO * O) becomes rowsum(dO * O) - dlse.
Both ops map query head h to kv head h // G themselves (GQA/MQA without repeating K/V).
"""
from __future__ import annotations

import bisect
from typing import NamedTuple

import torch

from .blocks import FULL, HIDDEN, RowInfo, classify, only_local
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


class Plan(list):
    """The computed tiles, plus the allowed pairs of every MASKED tile (found while planning,
    kept so the explicit mask is built once)."""

    def __init__(self):
        super().__init__()
        self.allowed: dict[Tile, torch.Tensor] = {}


class Unit(NamedTuple):
    """One call of the tile loop: the KV heads `kv` (a slice) with their query heads, over
    the keys `keys` (row indices; None: all), for global KV head `head` (None: the mask
    does not depend on it)."""

    kv: slice
    keys: torch.Tensor | None
    head: int | None


def units(mask: MaskSpec, k_pos: torch.Tensor, num_kv_heads: int, kv_heads) -> list[Unit]:
    """All heads at once without `heads`; else per KV head its seen keys and the others."""
    if mask.heads is None:
        return [Unit(slice(None), None, None)]
    rel = mask.relative(k_pos.cpu())
    out = []
    for h in range(num_kv_heads):
        head = int(kv_heads[h])
        seen = mask.heads.sees_block(torch.tensor(head), rel)
        if bool(seen.all()):
            out.append(Unit(slice(h, h + 1), None, head))
            continue
        for part in (seen, ~seen):
            if bool(part.any()):
                out.append(Unit(slice(h, h + 1), part.nonzero().flatten(), head))
    return out


class _Recent(NamedTuple):
    mask: MaskSpec
    head: int | None
    q_pos: torch.Tensor
    k_pos: torch.Tensor
    tiles: Plan


_RECENT: list[_Recent] = []  # the last plans made, newest last: backward reuses forward's
_KEEP = 64                   # (16 units of an 8-head S2 call; a few ring steps of them)


def plan(mask: MaskSpec, q_pos: torch.Tensor, k_pos: torch.Tensor, head: int | None = None) -> Plan:
    """The computed tiles; every allowed (query, key) pair lies in exactly one of them.
    `head`: the global KV head whose tiles these are (masks with `heads`).  A pure function
    of its arguments, so the last `_KEEP` plans are kept (compared by the mask object and
    equal positions) and the backward of a call does not plan again."""
    q_pos, k_pos = q_pos.to("cpu", torch.long), k_pos.to("cpu", torch.long)
    for n, e in enumerate(_RECENT):
        if e.mask is mask and e.head == head and e.q_pos.shape == q_pos.shape and e.k_pos.shape == k_pos.shape \
                and torch.equal(e.q_pos, q_pos) and torch.equal(e.k_pos, k_pos):
            _RECENT.append(_RECENT.pop(n))
            return e.tiles
    tiles = _make_plan(mask, q_pos, k_pos, head)
    _RECENT.append(_Recent(mask, head, q_pos.clone(), k_pos.clone(), tiles))
    del _RECENT[:-_KEEP]
    return tiles


def _make_plan(mask: MaskSpec, q_pos: torch.Tensor, k_pos: torch.Tensor, head: int | None) -> Plan:
    qi, ki = RowInfo.of(mask, q_pos), RowInfo.of(mask, k_pos, head)
    tiles = Plan()
    min_run = MIN_RUN if mask.heads is None else TILE  # compacted keys: runs of one S2 block
    cut = mask.heads is not None and bool((ki.pos[1:] >= ki.pos[:-1]).all())
    for qa, qb in _start_ranges(qi, MIN_RUN):
        for ka, kb in _start_ranges(ki, min_run):
            _split(mask, qi, ki, qa, qb, ka, kb, head, tiles, cut)
    return tiles


def _start_ranges(info: RowInfo, min_run: int) -> list[tuple[int, int]]:
    """Runs when they are long on average, else the whole range (scattered positions,
    e.g. a stripe layout, are then cut into fixed tiles by `_split`)."""
    runs = info.runs()
    n = info.pos.numel()
    if n == 0:
        return []
    return runs if len(runs) * min_run <= n or len(runs) == 1 else [(0, n)]


def _split(mask, qi: RowInfo, ki: RowInfo, qa, qb, ka, kb, head, tiles: Plan, cut: bool = False) -> None:
    """Plan tiles of rows [qa, qb) x [ka, kb); `cut`: keys are in position order, so a
    partial tile may be cut where the causal diagonal, the window or the S2 band edge
    crosses it (masks with `heads`, whose compacted keys would else give masked tiles)."""
    qs, ks = qi.range_stats(qa, qb), ki.range_stats(ka, kb)
    kind = classify(mask, qs, ks)
    if kind == HIDDEN:
        return
    if kind == FULL:
        tiles.append(Tile(qa, qb, ka, kb, FULL))
        return
    window_covers = mask.window is None or qs[6] - ks[0] < mask.window  # max q pos - min k pos
    if window_covers and qi.is_run(qa, qb) and ki.is_run(ka, kb) and only_local(mask, qs, ks):
        # Same document, consecutive positions, only causality is partial: shift the
        # tile so that both sides start at the same position, where is_causal applies.
        shift = qs[0] - ks[0]
        if shift > 0:
            tiles.append(Tile(qa, qb, ka, ka + shift, FULL))
            tiles.append(Tile(qa, qb, ka + shift, kb, CAUSAL))
        else:
            tiles.append(Tile(qa - shift, qb, ka, kb, CAUSAL))
        return
    cuts = _cuts(mask, qs, ki, ka, kb) if cut else []
    if cuts:
        for k0, k1 in zip([ka, *cuts], [*cuts, kb]):
            _split(mask, qi, ki, qa, qb, k0, k1, head, tiles, cut)
        return
    mid = _block_edge(mask, qs, qa, qb) if cut and qb - qa <= TILE and qi.is_run(qa, qb) else None
    if mid is not None:  # queries of one S2 block see whole key blocks: cut instead of masking
        _split(mask, qi, ki, qa, mid, ka, kb, head, tiles, cut)
        _split(mask, qi, ki, mid, qb, ka, kb, head, tiles, cut)
        return
    if qb - qa <= TILE and kb - ka <= TILE:
        allowed = _allowed(mask, qi.pos[qa:qb], ki.pos[ka:kb], head)
        if bool(allowed.any()):  # ranges cannot prove all hidden
            tiles.append(Tile(qa, qb, ka, kb, MASKED))
            tiles.allowed[tiles[-1]] = allowed
        return
    for q0, q1 in _halves(qa, qb):
        for k0, k1 in _halves(ka, kb):
            _split(mask, qi, ki, q0, q1, k0, k1, head, tiles, cut)


def _block_edge(mask, qs: list[int], qa: int, qb: int) -> int | None:
    """For query rows [qa, qb) that are one run: the row nearest the middle where a new S2
    block starts (None: the rows lie in one block)."""
    b, n = mask.heads.block, qb - qa
    first = (-qs[2]) % b or b  # rows from qa to the first block start after it (qs[2]: its r)
    if first >= n:
        return None
    j = max(0, (n // 2 - first) // b)
    starts = [first + i * b for i in (j, j + 1) if first + i * b < n]
    return qa + min(starts, key=lambda r: abs(r - n // 2))


def _cuts(mask, qs: list[int], ki: RowInfo, ka: int, kb: int) -> list[int]:
    """Key rows strictly inside (ka, kb) where the keys (in position order) cross an edge
    of the queries summarised by qs: the causal diagonal, the window's start, and, for
    queries of one document, the S2 band's first block (all queries / some query)."""
    qmin, qmax, qrmin, qrmax = qs[0], qs[6], qs[2], qs[8]
    edges = [qmin, qmax + 1]
    if mask.window is not None:
        edges += [qmin - mask.window + 1, qmax - mask.window + 2]
    if qs[1] == qs[7]:
        b, lb = mask.heads.block, mask.heads.local_blocks
        start = qmin - qrmin
        edges += [start + (qrmin // b - lb + 1) * b, start + (qrmax // b - lb + 1) * b]
    rows = {bisect.bisect_left(ki.pos_list, e, ka, kb) for e in edges}
    return sorted(r for r in rows if ka < r < kb)


def _halves(a: int, b: int) -> list[tuple[int, int]]:
    if b - a <= TILE:
        return [(a, b)]
    mid = a + ((b - a) // 2 + TILE - 1) // TILE * TILE
    return [(a, mid), (mid, b)]


def _allowed(mask: MaskSpec, q_pos, k_pos, head: int | None) -> torch.Tensor:
    """[Tq, Tk] allowed pairs for one KV head (or all, without `heads`)."""
    if mask.heads is None:
        return mask.allowed(q_pos, k_pos)
    return mask.allowed(q_pos, k_pos, kv_heads=[head])[0]


def _bhtd(x: torch.Tensor) -> torch.Tensor:
    """[T, H, D] -> [1, H, T, D] view, the op's layout."""
    return x.permute(1, 0, 2).unsqueeze(0)


def _tile_mask(tiles: Plan, t: Tile, dtype):
    """Additive mask for a MASKED tile and the rows of the tile that see no key."""
    if t.kind != MASKED:
        return None, None
    allowed = tiles.allowed[t]
    bias = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, float("-inf"))
    return bias.view(1, 1, *allowed.shape), ~allowed.any(1)


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _unit_rows(u: Unit, g: int, q, k, v, k_pos):
    """q of the unit's query heads, its (compacted) k, v and their positions."""
    qh = slice(None) if u.kv == slice(None) else slice(u.kv.start * g, u.kv.stop * g)
    k, v = k[:, u.kv], v[:, u.kv]
    if u.keys is not None:
        k, v, k_pos = k.index_select(0, u.keys), v.index_select(0, u.keys), k_pos[u.keys.to(k_pos.device)]
    return qh, q[:, qh], k, v, k_pos


def forward(q, k, v, mask, q_pos, k_pos, scale, kv_heads=None):
    tq, hq, d = q.shape
    g = hq // k.shape[1]
    parts = []
    for u in units(mask, k_pos, k.shape[1], kv_heads):
        qh, qu, ku, vu, kp = _unit_rows(u, g, q, k, v, k_pos)
        tiles = plan(mask, q_pos, kp, u.head)
        for t in tiles:
            bias, dead = _tile_mask(tiles, t, q.dtype)
            o, lse = _fwd(_bhtd(qu[t.q0:t.q1]), _bhtd(ku[t.k0:t.k1]), _bhtd(vu[t.k0:t.k1]), 0.0,
                          t.kind == CAUSAL, attn_mask=bias, scale=scale)
            o, lse = o[0].permute(1, 0, 2), lse[0]
            if dead is not None and bool(dead.any()):
                lse = lse.masked_fill(dead, float("-inf"))  # the op reports 0 for empty rows
            parts.append((qh, t, o, lse))
    if len(parts) == 1 and parts[0][0] == slice(None) and (parts[0][1].q0, parts[0][1].q1) == (0, tq):
        _, _, o, lse = parts[0]
        return o, lse.to(_acc(q.dtype))
    from .api import merge
    out = torch.zeros(tq, hq, d, dtype=_acc(q.dtype))
    lse_all = torch.full((hq, tq), float("-inf"), dtype=_acc(q.dtype))
    for qh, t, o, lse in parts:
        rows = slice(t.q0, t.q1)
        out[rows, qh], lse_all[qh, rows] = merge(out[rows, qh], lse_all[qh, rows], o, lse)
    return out.to(q.dtype), lse_all


def backward(dout, q, k, v, out, lse, mask, q_pos, k_pos, scale, dlse=None, kv_heads=None):
    tq, hq, d = q.shape
    g = hq // k.shape[1]
    lse = lse.to(_acc(q.dtype))
    lse = lse.masked_fill(torch.isneginf(lse), float("inf"))  # rows seeing no key: P = 0
    dout = dout.to(q.dtype)
    out = out.to(q.dtype)
    if dlse is not None:
        q, k, v = (torch.nn.functional.pad(x, (0, 1)) for x in (q, k, v))
        out = torch.cat([out, -dlse.t().unsqueeze(-1).to(q.dtype)], dim=-1)
        dout = torch.nn.functional.pad(dout, (0, 1), value=1.0)
    dq = dk = dv = None
    for u in units(mask, k_pos, k.shape[1], kv_heads):
        qh, qu, ku, vu, kp = _unit_rows(u, g, q, k, v, k_pos)
        tiles = plan(mask, q_pos, kp, u.head)
        if u.head is None and len(tiles) == 1 and tiles[0][:4] == (0, tq, 0, k.shape[0]):
            return tuple(x[..., :d] for x in _tile_backward(tiles, tiles[0], dout, q, k, v, out, lse, scale))
        if dq is None:
            dq = torch.zeros(tq, hq, d, dtype=_acc(q.dtype))
            dk = torch.zeros(k.shape[0], k.shape[1], d, dtype=_acc(q.dtype))
            dv = torch.zeros_like(dk)
        gk_u = torch.zeros(ku.shape[0], ku.shape[1], d, dtype=dk.dtype)
        gv_u = torch.zeros_like(gk_u)
        for t in tiles:
            gq, gk, gv = _tile_backward(tiles, t, dout[:, qh], qu, ku, vu, out[:, qh], lse[qh], scale)
            dq[t.q0:t.q1, qh] += gq[..., :d]
            gk_u[t.k0:t.k1] += gk[..., :d]
            gv_u[t.k0:t.k1] += gv[..., :d]
        keys = slice(None) if u.keys is None else u.keys
        dk[keys, u.kv] += gk_u
        dv[keys, u.kv] += gv_u
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _tile_backward(tiles: Plan, t: Tile, dout, q, k, v, out, lse, scale):
    """(dq, dk, dv) of one tile as [T, H, D] views (the op sums dk/dv over each group)."""
    bias, _ = _tile_mask(tiles, t, q.dtype)
    rows, keys = slice(t.q0, t.q1), slice(t.k0, t.k1)
    grads = _bwd(_bhtd(dout[rows]), _bhtd(q[rows]), _bhtd(k[keys]), _bhtd(v[keys]), _bhtd(out[rows]),
                 lse[:, rows].unsqueeze(0).contiguous(), 0.0, t.kind == CAUSAL, attn_mask=bias, scale=scale)
    return tuple(x[0].permute(1, 0, 2) for x in grads)


def available(device) -> tuple[bool, str]:
    if torch.device(device).type != "cpu":
        return False, "the cpu backend runs on CPU tensors only"
    return True, ""
