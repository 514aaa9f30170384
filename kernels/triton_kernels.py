"""Triton flash-attention kernels (forward, dK/dV, dQ) with masks from global positions.

Imported lazily by `triton_attn` at the first call, so that `TRITON_INTERPRET=1` set by
a test before that call takes effect (the mode is fixed when `triton.jit` decorates).

Layout: q/out/dout [Tq, Hq, D], k/v [Tk, Hkv, D] addressed through strides; query head
h reads kv head h // G, whose global index (S2 masks) is kv_heads[h // G].  Row columns
q_cols [6, Tq] and k_cols [6, Tk] (blocks.COLUMNS: position, document, position in the
document, in-prefix flag, sink flag; the sixth is unused) feed the mask, evaluated per pair
inside a tile: allowed = same and (pre or snk or (local and sparse_h)).  Block lists (CSR,
one table per KV head when the mask depends on it, else one for all: `PER_HEAD`) name the
tiles that are not hidden: row lists (ptr [H*nQB + 1], idx) give the key blocks of each
query block for the forward and dQ, column lists give the query blocks of each key block
for dK/dV, so hidden tiles are never visited.
Forward invariant (online softmax): after key block n, m = running row max (or -inf),
l = sum exp(s - m), acc = sum exp(s - m) v over keys seen so far; lse = m + log l.
Backward recomputes P = exp(s - lse) with the FINAL lse (rows seeing no key carry
lse = +inf, so P = 0) and dS = P * (dP - delta), delta = rowsum(dO * O) - dlse.
"""
import triton
import triton.language as tl


@triton.jit
def _allowed(offs_m, offs_n, head, q_cols, k_cols, Tq, Tk,
             CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_DOCS: tl.constexpr, PREFIX: tl.constexpr,
             SINK: tl.constexpr, HEADS: tl.constexpr, S2_BLOCK: tl.constexpr, S2_LOCAL: tl.constexpr,
             S2_STRIDE: tl.constexpr, S2_DENSE: tl.constexpr):
    in_m = offs_m < Tq
    in_n = offs_n < Tk
    inside = in_m[:, None] & in_n[None, :]
    qp = tl.load(q_cols + offs_m, mask=in_m, other=0)
    kp = tl.load(k_cols + offs_n, mask=in_n, other=0)
    ok = inside
    if CAUSAL:
        ok = ok & (kp[None, :] <= qp[:, None])
    if WINDOW > 0:
        ok = ok & ((qp[:, None] - kp[None, :]) < WINDOW)
    if HEADS:
        qb = tl.load(q_cols + 2 * Tq + offs_m, mask=in_m, other=0) // S2_BLOCK
        kb = tl.load(k_cols + 2 * Tk + offs_n, mask=in_n, other=0) // S2_BLOCK
        seen = (head < S2_DENSE) | ((kb + head) % S2_STRIDE == 0)
        ok = ok & (((qb[:, None] - kb[None, :]) < S2_LOCAL) | seen[None, :])
    if PREFIX:
        qpre = tl.load(q_cols + 3 * Tq + offs_m, mask=in_m, other=0)
        kpre = tl.load(k_cols + 3 * Tk + offs_n, mask=in_n, other=0)
        ok = ok | (inside & (qpre[:, None] != 0) & (kpre[None, :] != 0))
    if SINK:
        ksnk = tl.load(k_cols + 4 * Tk + offs_n, mask=in_n, other=0)
        ok = ok | (inside & (ksnk[None, :] != 0) & (kp[None, :] <= qp[:, None]))
    if HAS_DOCS:
        qd = tl.load(q_cols + Tq + offs_m, mask=in_m, other=-1)
        kd = tl.load(k_cols + Tk + offs_n, mask=in_n, other=-2)
        ok = ok & (qd[:, None] == kd[None, :])
    return ok


@triton.jit
def _kv_block(K, V, kb, kvh, skt, skh, Tk, offs_d, in_d, BLOCK_N: tl.constexpr):
    """Key block kb of K/V head kvh: its key rows and K, V [BLOCK_N, BLOCK_D] (0 past Tk / D)."""
    offs_n = kb * BLOCK_N + tl.arange(0, BLOCK_N)
    kv_mask = (offs_n < Tk)[:, None] & in_d[None, :]
    k = tl.load(K + offs_n[:, None] * skt + kvh * skh + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + offs_n[:, None] * skt + kvh * skh + offs_d[None, :], mask=kv_mask, other=0.0)
    return offs_n, k, v


@triton.jit
def fwd_kernel(Q, K, V, O, LSE, q_cols, k_cols, kv_heads, row_ptr, row_idx,
               Tq, Tk, G, nqb, scale,
               sqt, sqh, skt, skh, sot, soh,
               D: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_DOCS: tl.constexpr,
               PREFIX: tl.constexpr, SINK: tl.constexpr, HEADS: tl.constexpr, PER_HEAD: tl.constexpr,
               S2_BLOCK: tl.constexpr, S2_LOCAL: tl.constexpr, S2_STRIDE: tl.constexpr, S2_DENSE: tl.constexpr,
               PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    qb = tl.program_id(0)
    h = tl.program_id(1)
    kvh = h // G
    head = tl.load(kv_heads + kvh)
    table = kvh * PER_HEAD
    offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    in_d = offs_d < D
    q = tl.load(Q + offs_m[:, None] * sqt + h * sqh + offs_d[None, :],
                mask=(offs_m < Tq)[:, None] & in_d[None, :], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    first = tl.load(row_ptr + table * nqb + qb)
    last = tl.load(row_ptr + table * nqb + qb + 1)
    for i in range(first, last):
        kb = tl.load(row_idx + i)
        offs_n, k, v = _kv_block(K, V, kb, kvh, skt, skh, Tk, offs_d, in_d, BLOCK_N)
        s = tl.dot(q, tl.trans(k), input_precision=PREC).to(tl.float32) * scale
        ok = _allowed(offs_m, offs_n, head, q_cols, k_cols, Tq, Tk, CAUSAL, WINDOW, HAS_DOCS, PREFIX, SINK,
                      HEADS, S2_BLOCK, S2_LOCAL, S2_STRIDE, S2_DENSE)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_use[:, None])
        alpha = tl.exp(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC).to(tl.float32)
        m_i = m_new
    seen = l_i > 0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, m_i + tl.log(tl.where(seen, l_i, 1.0)), float("-inf"))
    in_m = offs_m < Tq
    tl.store(O + offs_m[:, None] * sot + h * soh + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=in_m[:, None] & in_d[None, :])
    tl.store(LSE + h * Tq + offs_m, lse, mask=in_m)


@triton.jit
def _probs_grad(q, k, v, do, lse, delta, offs_m, offs_n, head, q_cols, k_cols, Tq, Tk, scale,
                CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_DOCS: tl.constexpr, PREFIX: tl.constexpr,
                SINK: tl.constexpr, HEADS: tl.constexpr, S2_BLOCK: tl.constexpr, S2_LOCAL: tl.constexpr,
                S2_STRIDE: tl.constexpr, S2_DENSE: tl.constexpr, PREC: tl.constexpr):
    """P [M, N] and dS [M, N] of one tile (dS without the softmax scale)."""
    s = tl.dot(q, tl.trans(k), input_precision=PREC).to(tl.float32) * scale
    ok = _allowed(offs_m, offs_n, head, q_cols, k_cols, Tq, Tk, CAUSAL, WINDOW, HAS_DOCS, PREFIX, SINK,
                  HEADS, S2_BLOCK, S2_LOCAL, S2_STRIDE, S2_DENSE)
    p = tl.where(ok, tl.exp(s - lse[:, None]), 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PREC).to(tl.float32)
    ds = p * (dp - delta[:, None])
    return p, ds


@triton.jit
def _q_block(Q, DO, LSE, DELTA, qb, h, sqt, sqh, Tq, offs_d, in_d, BLOCK_M: tl.constexpr):
    """Query block qb of head h for the backward: its rows, Q, dO, lse and delta (rowsum dO*O)."""
    offs_m = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    in_m = offs_m < Tq
    q_mask = in_m[:, None] & in_d[None, :]
    q = tl.load(Q + offs_m[:, None] * sqt + h * sqh + offs_d[None, :], mask=q_mask, other=0.0)
    do = tl.load(DO + offs_m[:, None] * sqt + h * sqh + offs_d[None, :], mask=q_mask, other=0.0)
    lse = tl.load(LSE + h * Tq + offs_m, mask=in_m, other=float("inf"))
    delta = tl.load(DELTA + h * Tq + offs_m, mask=in_m, other=0.0)
    return offs_m, q, do, lse, delta


@triton.jit
def dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, q_cols, k_cols, kv_heads, col_ptr, col_idx,
                Tq, Tk, G, nkb, scale,
                sqt, sqh, skt, skh, sdkt, sdkh,
                D: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_DOCS: tl.constexpr,
                PREFIX: tl.constexpr, SINK: tl.constexpr, HEADS: tl.constexpr, PER_HEAD: tl.constexpr,
                S2_BLOCK: tl.constexpr, S2_LOCAL: tl.constexpr, S2_STRIDE: tl.constexpr, S2_DENSE: tl.constexpr,
                PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """One key block of one kv head; loops over its G query heads and the query blocks
    of its column list."""
    kb = tl.program_id(0)
    kvh = tl.program_id(1)
    head = tl.load(kv_heads + kvh)
    table = kvh * PER_HEAD
    offs_d = tl.arange(0, BLOCK_D)
    in_d = offs_d < D
    offs_n, k, v = _kv_block(K, V, kb, kvh, skt, skh, Tk, offs_d, in_d, BLOCK_N)
    kv_mask = (offs_n < Tk)[:, None] & in_d[None, :]
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    first = tl.load(col_ptr + table * nkb + kb)
    last = tl.load(col_ptr + table * nkb + kb + 1)
    for g in range(0, G):
        h = kvh * G + g
        for i in range(first, last):
            qb = tl.load(col_idx + i)
            offs_m, q, do, lse, delta = _q_block(Q, DO, LSE, DELTA, qb, h, sqt, sqh, Tq, offs_d, in_d, BLOCK_M)
            p, ds = _probs_grad(q, k, v, do, lse, delta, offs_m, offs_n, head, q_cols, k_cols, Tq, Tk, scale,
                                CAUSAL, WINDOW, HAS_DOCS, PREFIX, SINK, HEADS, S2_BLOCK, S2_LOCAL, S2_STRIDE,
                                S2_DENSE, PREC)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC).to(tl.float32)
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC).to(tl.float32)
    tl.store(DK + offs_n[:, None] * sdkt + kvh * sdkh + offs_d[None, :], (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + offs_n[:, None] * sdkt + kvh * sdkh + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, q_cols, k_cols, kv_heads, row_ptr, row_idx,
              Tq, Tk, G, nqb, scale,
              sqt, sqh, skt, skh,
              D: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, HAS_DOCS: tl.constexpr,
              PREFIX: tl.constexpr, SINK: tl.constexpr, HEADS: tl.constexpr, PER_HEAD: tl.constexpr,
              S2_BLOCK: tl.constexpr, S2_LOCAL: tl.constexpr, S2_STRIDE: tl.constexpr, S2_DENSE: tl.constexpr,
              PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """One query block of one query head; loops over the key blocks of its row list."""
    qb = tl.program_id(0)
    h = tl.program_id(1)
    kvh = h // G
    head = tl.load(kv_heads + kvh)
    table = kvh * PER_HEAD
    offs_d = tl.arange(0, BLOCK_D)
    in_d = offs_d < D
    offs_m, q, do, lse, delta = _q_block(Q, DO, LSE, DELTA, qb, h, sqt, sqh, Tq, offs_d, in_d, BLOCK_M)
    q_mask = (offs_m < Tq)[:, None] & in_d[None, :]
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    first = tl.load(row_ptr + table * nqb + qb)
    last = tl.load(row_ptr + table * nqb + qb + 1)
    for i in range(first, last):
        kb = tl.load(row_idx + i)
        offs_n, k, v = _kv_block(K, V, kb, kvh, skt, skh, Tk, offs_d, in_d, BLOCK_N)
        _, ds = _probs_grad(q, k, v, do, lse, delta, offs_m, offs_n, head, q_cols, k_cols, Tq, Tk, scale,
                            CAUSAL, WINDOW, HAS_DOCS, PREFIX, SINK, HEADS, S2_BLOCK, S2_LOCAL, S2_STRIDE,
                            S2_DENSE, PREC)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC).to(tl.float32)
    tl.store(DQ + offs_m[:, None] * sqt + h * sqh + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty), mask=q_mask)
