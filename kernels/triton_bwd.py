"""Triton backward kernels of the hybrid op.

1. ``combine_bwd_kernel``: from dL/d(out) to each branch's gradient in its own stabilised units:
   (d num_a, d den_a) of the softmax sums, (d num_m, d den_m) of the mLSTM sums, dL/d g, and per
   chunk the norm weight's gradient. The stabilisers (row maxima) carry no gradient: each cancels
   in the output (the mLSTM's only through eps, as in ``mlstm_kernels``).
2. ``mlstm_bwd_kernel``: per query chunk, dq, dk, dv of the mLSTM branch: the intra-chunk block
   recomputed, the state entering the chunk (C, n) for dq, and for dk, dv the gradient of the
   state after the chunk, which ``mlstm_kernels``' Triton kernel carries backwards over chunks.
   It also writes q.dq - k.dk per position, from which the gates' gradients follow (see
   ``kernels.triton_hybrid``).
3. ``attention_bwd_dq_kernel`` / ``attention_bwd_dkdv_kernel``: the windowed softmax's gradients,
   weights recomputed from the stored row maxima (flash-attention style): per query chunk over its
   key blocks for dq; per key block over the query chunks that read it for dk, dv (every chunk for
   a block holding sinks, the band of window / L + 1 chunks otherwise).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .triton_fwd import (
    MODE_MLSTM, MODE_SHARED_NORM, MODE_SWA, tile_dot, tl_logsigmoid, attention_mask, head_columns, head_norm, key_blocks,
    load_state, load_tile, mlstm_read_out, shared_norm_output, state_rows, store_tile,
)


@triton.jit
def combine_bwd_kernel(
    DOUT, GG, NORM_W, NUM_A, DEN_A, MAX_A, NUM_M, DEN_M, MAX_M,
    DNUM_A, DDEN_A, DNUM_M, DDEN_M, DG, DNORM_W_PARTS,
    T, T_padded, NC, H, norm_eps, eps,
    DV: tl.constexpr, BLOCK_DV: tl.constexpr, L: tl.constexpr, MODE: tl.constexpr, HAS_NORM_WEIGHT: tl.constexpr,
    MEMORY_NORM: tl.constexpr,
):
    chunk = tl.program_id(0)
    bh = tl.program_id(1)
    offs_t = chunk * L + tl.arange(0, L)
    offs_v = tl.arange(0, BLOCK_DV)
    mask_v = offs_v < DV
    real = offs_t < T  # padded rows get zero gradients
    rows = bh * T_padded + offs_t
    dout = tl.load(DOUT + rows[:, None] * DV + offs_v[None, :], mask=mask_v[None, :] & real[:, None],
                   other=0.0).to(tl.float32)

    if MODE != MODE_MLSTM:
        num_a = load_tile(NUM_A, rows, offs_v, mask_v, DV)
        den_a = tl.load(DEN_A + rows)
    if MODE != MODE_SWA:
        num_m = load_tile(NUM_M, rows, offs_v, mask_v, DV)
        den_m = tl.load(DEN_M + rows)
        max_m = tl.load(MAX_M + rows)

    if MODE == MODE_SHARED_NORM:
        g = tl.load(GG + rows).to(tl.float32)
        out, scale_a, scale_o, mass_o, total = shared_norm_output(
            num_a, den_a, tl.load(MAX_A + rows), num_m, den_m, max_m, tl_logsigmoid(g))
        dout_out = tl.sum(dout * out, 1)
        dnum_a = dout * (scale_a / total)[:, None]
        dden_a = -scale_a * dout_out / total
        dnum_m = dout * (scale_o / total)[:, None]
        sign_m = tl.where(den_m < 0, -1.0, 1.0)
        dden_m = -scale_o * dout_out / total * sign_m
        d_log_g = scale_o * (tl.sum(dout * num_m, 1) - dout_out * mass_o) / total
        tl.store(DG + rows, d_log_g * (1.0 - tl.sigmoid(g)))
    else:
        if MODE != MODE_SWA:
            h_m, norm_m, floor = mlstm_read_out(num_m, den_m, max_m, eps)
        if MODE == MODE_SWA:
            dh_a = dout
        elif MODE == MODE_MLSTM:
            dh_m = dout
        else:  # gate: out = h_a + mix * (y - h_a), y = norm(h_m) (MEMORY_NORM) or h_m
            g = tl.load(GG + rows).to(tl.float32)
            mix = tl.sigmoid(g)
            h_a = num_a / den_a[:, None]
            if MEMORY_NORM:
                y_unit, rms, w = head_norm(h_m, NORM_W, bh, H, offs_v, mask_v, norm_eps, DV, HAS_NORM_WEIGHT)
                y = y_unit * w[None, :]
            else:
                y = h_m
            dy = dout * mix[:, None]
            dh_a = dout - dy
            tl.store(DG + rows, mix * (1.0 - mix) * tl.sum(dout * (y - h_a), 1))
            if MEMORY_NORM:
                if HAS_NORM_WEIGHT:
                    tl.store(DNORM_W_PARTS + (bh * NC + chunk) * DV + offs_v, tl.sum(dy * y_unit, 0), mask=mask_v)
                u = dy * w[None, :]
                dh_m = rms[:, None] * u - (rms * rms * rms * tl.sum(h_m * u, 1) / DV)[:, None] * h_m
            else:
                dh_m = dy
        if MODE != MODE_MLSTM:
            dnum_a = dh_a / den_a[:, None]
            dden_a = -tl.sum(dh_a * num_a, 1) / (den_a * den_a)
        if MODE != MODE_SWA:
            dnum_m = dh_m / norm_m[:, None]
            through_den = tl.abs(den_m) >= floor  # below the floor the output does not depend on den
            sign_m = tl.where(den_m < 0, -1.0, 1.0)
            dden_m = tl.where(through_den, -tl.sum(dh_m * h_m, 1) / norm_m * sign_m, 0.0)
    if MODE != MODE_MLSTM:
        store_tile(DNUM_A, rows, offs_v, mask_v, DV, dnum_a)
        tl.store(DDEN_A + rows, dden_a)
    if MODE != MODE_SWA:
        store_tile(DNUM_M, rows, offs_v, mask_v, DV, dnum_m)
        tl.store(DDEN_M + rows, dden_m)


@triton.jit
def mlstm_bwd_kernel(
    Q, KM, VM, IG, FG, C_STATES, N_STATES, M_STATES, DC_STATES, MAX_M, DNUM_M, DDEN_M,
    DQ, DK, DV_OUT, DI, D_LOG_DECAY,
    T_padded, NC, scale,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, L: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    """DC_STATES: [BH, (NC + 1) * D, DV + 1], the gradient of each chunk's entering state
    (C in columns :DV, n in column DV)."""
    chunk = tl.program_id(0)
    bh = tl.program_id(1)
    offs = chunk * L + tl.arange(0, L)
    offs_d, mask_d, offs_v, mask_v = head_columns(D, DV, BLOCK_D, BLOCK_DV)
    rows = bh * T_padded + offs
    q = load_tile(Q, rows, offs_d, mask_d, D)
    k = load_tile(KM, rows, offs_d, mask_d, D)
    v = load_tile(VM, rows, offs_v, mask_v, DV)
    q_scaled = q * scale
    log_f = tl_logsigmoid(tl.load(FG + rows).to(tl.float32))
    cum_f = tl.cumsum(log_f, 0)
    i_gate = tl.load(IG + rows).to(tl.float32)
    max_m = tl.load(MAX_M + rows)
    dnum = load_tile(DNUM_M, rows, offs_v, mask_v, DV)
    dden = tl.load(DDEN_M + rows)

    # intra-chunk: weights w[t, s] = exp(F_t - F_s + i_s - m_t) for s <= t
    causal = tl.arange(0, L)[:, None] >= tl.arange(0, L)[None, :]
    log_w = tl.where(causal, cum_f[:, None] - cum_f[None, :] + i_gate[None, :], float("-inf"))
    w = tl.exp(log_w - max_m[:, None])
    scores = w * tile_dot(q_scaled, tl.trans(k), DOT_DTYPE)
    d_scores = (tile_dot(dnum, tl.trans(v), DOT_DTYPE) + dden[:, None]) * w  # dL / d(q_scaled . k)
    dq = tile_dot(d_scores, k, DOT_DTYPE) * scale
    dk = tile_dot(tl.trans(d_scores), q_scaled, DOT_DTYPE)
    dv = tile_dot(tl.trans(scores), dnum, DOT_DTYPE)

    # the state entering this chunk, read by every query of it with weight exp(m_c + F_t - m_t)
    state_max = tl.load(M_STATES + bh * (NC + 1) + chunk)
    w_inter = tl.exp(state_max + cum_f - max_m)
    C, n = load_state(C_STATES, N_STATES, bh, chunk, NC, offs_d, mask_d, offs_v, mask_v, D, DV)
    dq += (tile_dot(dnum, tl.trans(C), DOT_DTYPE) + dden[:, None] * n[None, :]) * (w_inter * scale)[:, None]

    # this chunk's keys enter the state after it with weight exp(F_end - F_s + i_s - m_{c+1})
    next_max = tl.load(M_STATES + bh * (NC + 1) + chunk + 1)
    cum_end = tl.sum(log_f, 0)
    w_state = tl.exp(cum_end - cum_f + i_gate - next_max)
    # the gradient of that state: C's in columns :DV of DC_STATES, n's in column DV
    rows_next = state_rows(bh, chunk + 1, NC, offs_d, D)
    dC = tl.load(DC_STATES + rows_next[:, None] * (DV + 1) + offs_v[None, :], mask=mask_d[:, None] & mask_v[None, :],
                 other=0.0)
    dn = tl.load(DC_STATES + rows_next * (DV + 1) + DV, mask=mask_d, other=0.0)
    dk += (tile_dot(v, tl.trans(dC), DOT_DTYPE) + dn[None, :]) * w_state[:, None]
    dv += tile_dot(k, dC, DOT_DTYPE) * w_state[:, None]

    store_tile(DQ, rows, offs_d, mask_d, D, dq)
    store_tile(DK, rows, offs_d, mask_d, D, dk)
    store_tile(DV_OUT, rows, offs_v, mask_v, DV, dv)
    # every weight is exp(F_t - F_s + i_s): position u's log-decay gradient is the sum over the
    # weights it reads as a query (q.dq) minus those it is read with as a key (k.dk = dL/d i_u)
    d_input_gate = tl.sum(k * dk, 1)
    tl.store(DI + rows, d_input_gate)
    tl.store(D_LOG_DECAY + rows, tl.sum(q * dq, 1) - d_input_gate)


@triton.jit
def _attention_grad_block(q_scaled, k, v, offs_t, offs_j, max_a, dnum, dden, window, sink_tokens,
                          DOT_DTYPE: tl.constexpr):
    """Softmax weights p[t, j] (units of exp(max_a[t])) and dL/d(q_scaled . k)[t, j] of one block."""
    scores = tile_dot(q_scaled, tl.trans(k), DOT_DTYPE)
    p = tl.where(attention_mask(offs_t, offs_j, window, sink_tokens), tl.exp(scores - max_a[:, None]), 0.0)
    d_scores = p * (tile_dot(dnum, tl.trans(v), DOT_DTYPE) + dden[:, None])
    return p, d_scores


@triton.jit
def _attention_query_rows(Q, MAX_A, DNUM_A, DDEN_A, rows, offs_d, mask_d, offs_v, mask_v, scale,
                          D: tl.constexpr, DV: tl.constexpr):
    """What the attention backward reads of a query chunk: scaled q, row max, d num_a, d den_a."""
    q_scaled = load_tile(Q, rows, offs_d, mask_d, D) * scale
    return q_scaled, tl.load(MAX_A + rows), load_tile(DNUM_A, rows, offs_v, mask_v, DV), tl.load(DDEN_A + rows)


@triton.jit
def _attention_dq_block(dq, q_scaled, offs_t, block, max_a, dnum, dden, window, sink_tokens, K, V, row_base,
                        offs_d, mask_d, offs_v, mask_v, D: tl.constexpr, DV: tl.constexpr, L: tl.constexpr,
                        DOT_DTYPE: tl.constexpr):
    offs_j = block * L + tl.arange(0, L)
    k = load_tile(K, row_base + offs_j, offs_d, mask_d, D)
    v = load_tile(V, row_base + offs_j, offs_v, mask_v, DV)
    _, d_scores = _attention_grad_block(q_scaled, k, v, offs_t, offs_j, max_a, dnum, dden,
                                        window, sink_tokens, DOT_DTYPE)
    return dq + tile_dot(d_scores, k, DOT_DTYPE)


@triton.jit
def attention_bwd_dq_kernel(
    Q, KA, VA, MAX_A, DNUM_A, DDEN_A, DQ,
    T_padded, scale, window, sink_tokens,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, L: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    chunk = tl.program_id(0)
    bh = tl.program_id(1)
    offs_t = chunk * L + tl.arange(0, L)
    offs_d, mask_d, offs_v, mask_v = head_columns(D, DV, BLOCK_D, BLOCK_DV)
    row_base = bh * T_padded
    rows = row_base + offs_t
    q_scaled, max_a, dnum, dden = _attention_query_rows(Q, MAX_A, DNUM_A, DDEN_A, rows, offs_d, mask_d, offs_v,
                                                        mask_v, scale, D, DV)
    dq = tl.zeros([L, BLOCK_D], dtype=tl.float32)
    sink_blocks, band_first = key_blocks(chunk, window, sink_tokens, L)
    for block in range(0, sink_blocks):
        dq = _attention_dq_block(dq, q_scaled, offs_t, block, max_a, dnum, dden, window, sink_tokens, KA, VA,
                                 row_base, offs_d, mask_d, offs_v, mask_v, D, DV, L, DOT_DTYPE)
    for block in range(band_first, chunk + 1):
        dq = _attention_dq_block(dq, q_scaled, offs_t, block, max_a, dnum, dden, window, sink_tokens, KA, VA,
                                 row_base, offs_d, mask_d, offs_v, mask_v, D, DV, L, DOT_DTYPE)
    store_tile(DQ, rows, offs_d, mask_d, D, dq * scale)


@triton.jit
def attention_bwd_dkdv_kernel(
    Q, KA, VA, MAX_A, DNUM_A, DDEN_A, DK, DV_OUT,
    T_padded, NC, scale, window, sink_tokens,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, L: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    block = tl.program_id(0)
    bh = tl.program_id(1)
    offs_j = block * L + tl.arange(0, L)
    offs_d, mask_d, offs_v, mask_v = head_columns(D, DV, BLOCK_D, BLOCK_DV)
    row_base = bh * T_padded
    k = load_tile(KA, row_base + offs_j, offs_d, mask_d, D)
    v = load_tile(VA, row_base + offs_j, offs_v, mask_v, DV)
    dk = tl.zeros([L, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([L, BLOCK_DV], dtype=tl.float32)
    # the last chunk with a query inside this block's window reach; a block holding sinks is read by all
    band_last = tl.minimum((block * L + L - 1 + window - 1) // L, NC - 1)
    last = tl.where(block * L < sink_tokens, NC - 1, band_last)
    for chunk in range(block, last + 1):
        offs_t = chunk * L + tl.arange(0, L)
        rows = row_base + offs_t
        q_scaled, max_a, dnum, dden = _attention_query_rows(Q, MAX_A, DNUM_A, DDEN_A, rows, offs_d, mask_d,
                                                            offs_v, mask_v, scale, D, DV)
        p, d_scores = _attention_grad_block(q_scaled, k, v, offs_t, offs_j, max_a, dnum, dden,
                                            window, sink_tokens, DOT_DTYPE)
        dk += tile_dot(tl.trans(d_scores), q_scaled, DOT_DTYPE)
        dv += tile_dot(tl.trans(p), dnum, DOT_DTYPE)
    store_tile(DK, row_base + offs_j, offs_d, mask_d, D, dk)
    store_tile(DV_OUT, row_base + offs_j, offs_v, mask_v, DV, dv)
