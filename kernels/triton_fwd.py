"""Triton forward kernel of the hybrid op: one program per (query chunk, batch x head).

Each program computes, for its ``L`` queries:
- the mLSTM read-out: the intra-chunk part (an L x L block of gated q.k weights) plus the state
  entering the chunk (C, n, m), which ``mlstm_kernels``' own Triton kernel materialises per chunk;
- the windowed softmax over the keys j with t - window < j <= t and the sink keys j < sink_tokens,
  flash-attention style (online maximum, one key block of L at a time, only the blocks that
  hold a window or sink key of this chunk);
- the combination (``gate``: the sigmoid mix, after a per-head RMS norm of h^m if MEMORY_NORM; ``shared_norm``: one
  normaliser over both branches' masses), with the branch sums and stabilisers stored for the
  backward kernels.

Every sum is kept in units of exp(its own row stabiliser), as ``kernels.reference`` documents.
Tensors are [B * H, T_padded, D] contiguous, T_padded a multiple of L.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._common import MAX_NEG_LOG_FLOOR as MAX_NEG_LOG_FLOOR_VALUE

# What the op computes, a constexpr of every kernel. Compiled kernels may read module globals only
# when they are tl.constexpr (Triton's interpreter reads any global, so only compiling shows it).
MODE_MLSTM, MODE_SWA, MODE_GATE, MODE_SHARED_NORM = (tl.constexpr(code) for code in range(4))
# exp(-m) is capped at e^60 (kernels._common.MAX_NEG_LOG_FLOOR).
MAX_NEG_LOG_FLOOR = tl.constexpr(MAX_NEG_LOG_FLOOR_VALUE)


@triton.jit
def head_columns(D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """Column offsets and masks of the q/k head dim and the v head dim (blocks are powers of two)."""
    offs_d = tl.arange(0, BLOCK_D)
    offs_v = tl.arange(0, BLOCK_DV)
    return offs_d, offs_d < D, offs_v, offs_v < DV


@triton.jit
def load_tile(P, rows, offs, mask, WIDTH: tl.constexpr):
    """[len(rows), len(offs)] float32 tile of a row-major [*, WIDTH] tensor; masked columns read 0."""
    return tl.load(P + rows[:, None] * WIDTH + offs[None, :], mask=mask[None, :], other=0.0).to(tl.float32)


@triton.jit
def store_tile(P, rows, offs, mask, WIDTH: tl.constexpr, value):
    tl.store(P + rows[:, None] * WIDTH + offs[None, :], value.to(P.dtype.element_ty), mask=mask[None, :])


@triton.jit
def state_rows(bh, chunk, NC, offs_d, D: tl.constexpr):
    """Rows of the state entering chunk ``chunk`` in mlstm_kernels' layout, [BH, (NC + 1) * D, ...]."""
    return bh * (NC + 1) * D + chunk * D + offs_d


@triton.jit
def load_state(C_STATES, N_STATES, bh, chunk, NC, offs_d, mask_d, offs_v, mask_v, D: tl.constexpr,
               DV: tl.constexpr):
    """The mLSTM state entering chunk ``chunk``: C [BLOCK_D, BLOCK_DV] and n [BLOCK_D], float32."""
    rows = state_rows(bh, chunk, NC, offs_d, D)
    C = tl.load(C_STATES + rows[:, None] * DV + offs_v[None, :], mask=mask_d[:, None] & mask_v[None, :], other=0.0)
    return C, tl.load(N_STATES + rows, mask=mask_d, other=0.0)


@triton.jit
def tile_dot(a, b, DOT_DTYPE: tl.constexpr):
    """a @ b with fp32 accumulation; operands rounded to the inputs' dtype (tensor cores for
    16-bit inputs), full fp32 products for fp32 inputs."""
    if DOT_DTYPE == tl.float32:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE))


@triton.jit
def tl_logsigmoid(x):
    """log(sigmoid(x)) without overflow for large |x| (the forget gate in log space)."""
    return tl.minimum(x, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def _attention_block(num, den, row_max, q_scaled, offs_t, block, window, sink_tokens, K, V, row_base,
                     offs_d, mask_d, offs_v, mask_v, D: tl.constexpr, DV: tl.constexpr, L: tl.constexpr,
                     DOT_DTYPE: tl.constexpr):
    """One key block of the online softmax: returns the updated (num, den, row max)."""
    offs_j = block * L + tl.arange(0, L)
    k = load_tile(K, row_base + offs_j, offs_d, mask_d, D)
    v = load_tile(V, row_base + offs_j, offs_v, mask_v, DV)
    scores = tile_dot(q_scaled, tl.trans(k), DOT_DTYPE)
    scores = tl.where(attention_mask(offs_t, offs_j, window, sink_tokens), scores, float("-inf"))
    new_max = tl.maximum(row_max, tl.max(scores, 1))
    safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)  # rows with no key yet
    weights = tl.exp(scores - safe_max[:, None])
    carry = tl.exp(row_max - safe_max)
    den = den * carry + tl.sum(weights, 1)
    num = num * carry[:, None] + tile_dot(weights, v, DOT_DTYPE)
    return num, den, new_max


@triton.jit
def attention_mask(offs_t, offs_j, window, sink_tokens):
    """[queries, keys] bool: query t reads key j if j <= t and (t - j < window or j < sink_tokens)."""
    dist = offs_t[:, None] - offs_j[None, :]
    return (dist >= 0) & ((dist < window) | (offs_j[None, :] < sink_tokens))


@triton.jit
def key_blocks(chunk, window, sink_tokens, L: tl.constexpr):
    """The key blocks chunk ``chunk``'s queries read: [0, sink_blocks) for the sinks, then
    [band_first, chunk] for the window. Blocks before band_first hold no window key of any query
    of the chunk, so only sinks are read there."""
    band_first = tl.maximum(chunk * L - window + 1, 0) // L
    sink_blocks = tl.minimum((sink_tokens + L - 1) // L, band_first)
    return sink_blocks, band_first


@triton.jit
def _attention_blocks(q_scaled, offs_t, chunk, window, sink_tokens, K, V, row_base,
                      offs_d, mask_d, offs_v, mask_v,
                      D: tl.constexpr, DV: tl.constexpr, L: tl.constexpr,
                      BLOCK_DV: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """Online softmax of L queries over their window and sink keys.
    Returns (num [L, BLOCK_DV], den [L], row max [L]): num / den is the attention output."""
    row_max = tl.full([L], float("-inf"), dtype=tl.float32)
    den = tl.zeros([L], dtype=tl.float32)
    num = tl.zeros([L, BLOCK_DV], dtype=tl.float32)
    sink_blocks, band_first = key_blocks(chunk, window, sink_tokens, L)
    for block in range(0, sink_blocks):
        num, den, row_max = _attention_block(num, den, row_max, q_scaled, offs_t, block, window, sink_tokens,
                                             K, V, row_base, offs_d, mask_d, offs_v, mask_v, D, DV, L, DOT_DTYPE)
    for block in range(band_first, chunk + 1):
        num, den, row_max = _attention_block(num, den, row_max, q_scaled, offs_t, block, window, sink_tokens,
                                             K, V, row_base, offs_d, mask_d, offs_v, mask_v, D, DV, L, DOT_DTYPE)
    return num, den, row_max


@triton.jit
def shared_norm_scales(max_a, den_a, max_m, den_m, log_g):
    """Weights of the two branches' sums under one normaliser (kernels._common.shared_norm_combine):
    the unit is the larger of the actual log masses, so the shared denominator lies in [1, 2].
    Returns (scale_a, scale_o, |den_m|). Rows with no key older than the window have mass 0."""
    mass_o = tl.abs(den_m)
    log_mass_o = tl.where(mass_o > 0, max_m + log_g + tl.log(tl.maximum(mass_o, 1e-38)), float("-inf"))
    unit = tl.maximum(max_a + tl.log(den_a), log_mass_o)
    return tl.exp(max_a - unit), tl.exp(max_m + log_g - unit), mass_o


@triton.jit
def shared_norm_output(num_a, den_a, max_a, num_m, den_m, max_m, log_g):
    """``shared_norm``: out = (scale_a * num_a + scale_o * num_m) / total. Returns (out, scale_a,
    scale_o, |den_m|, total), what the backward needs as well."""
    scale_a, scale_o, mass_o = shared_norm_scales(max_a, den_a, max_m, den_m, log_g)
    total = scale_a * den_a + scale_o * mass_o
    return (scale_a[:, None] * num_a + scale_o[:, None] * num_m) / total[:, None], scale_a, scale_o, mass_o, total


@triton.jit
def mlstm_read_out(num_m, den_m, max_m, eps):
    """h^m = num / (max(|den|, exp(-m)) + eps) (exp(-m) capped at e^60). Returns (h_m, the
    denominator, the floor exp(-m))."""
    floor = tl.exp(tl.minimum(-max_m, MAX_NEG_LOG_FLOOR))
    norm_m = tl.maximum(tl.abs(den_m), floor) + eps
    return num_m / norm_m[:, None], norm_m, floor


@triton.jit
def head_norm(h_m, NORM_W, bh, H, offs_v, mask_v, norm_eps, DV: tl.constexpr, HAS_NORM_WEIGHT: tl.constexpr):
    """The ``gate`` combination's per-head RMS norm: returns (h_m * rms, rms, weight); the weight is
    1 on the head's columns when there is none."""
    rms = 1.0 / tl.sqrt(tl.sum(h_m * h_m, 1) / DV + norm_eps)
    if HAS_NORM_WEIGHT:
        weight = tl.load(NORM_W + (bh % H) * DV + offs_v, mask=mask_v, other=0.0).to(tl.float32)
    else:
        weight = tl.where(mask_v, 1.0, 0.0)
    return h_m * rms[:, None], rms, weight


@triton.jit
def hybrid_fwd_kernel(
    Q, QM, KA, VA, KM, VM, IG, FG, GG, NORM_W,
    C_STATES, N_STATES, M_STATES,
    OUT, NUM_A, DEN_A, MAX_A, NUM_M, DEN_M, MAX_M,
    T_padded, NC, H, scale, window, sink_tokens, norm_eps, eps,
    D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, L: tl.constexpr,
    MODE: tl.constexpr, HAS_NORM_WEIGHT: tl.constexpr, MEMORY_NORM: tl.constexpr, DOT_DTYPE: tl.constexpr,
):
    """QM: the memory branch's queries (Q itself when it has none of its own); MEMORY_NORM: the
    ``gate`` combination RMS-normalises h^m per head before mixing."""
    chunk = tl.program_id(0)
    bh = tl.program_id(1)
    offs_t = chunk * L + tl.arange(0, L)
    offs_d, mask_d, offs_v, mask_v = head_columns(D, DV, BLOCK_D, BLOCK_DV)
    row_base = bh * T_padded
    q_scaled = load_tile(Q, row_base + offs_t, offs_d, mask_d, D) * scale

    if MODE != MODE_MLSTM:
        num_a, den_a, max_a = _attention_blocks(
            q_scaled, offs_t, chunk, window, sink_tokens, KA, VA, row_base, offs_d, mask_d, offs_v, mask_v,
            D, DV, L, BLOCK_DV, DOT_DTYPE)
        store_tile(NUM_A, row_base + offs_t, offs_v, mask_v, DV, num_a)
        tl.store(DEN_A + row_base + offs_t, den_a)
        tl.store(MAX_A + row_base + offs_t, max_a)

    if MODE != MODE_SWA:
        log_f = tl_logsigmoid(tl.load(FG + row_base + offs_t).to(tl.float32))
        cum_f = tl.cumsum(log_f, 0)
        i_gate = tl.load(IG + row_base + offs_t).to(tl.float32)
        qm_scaled = load_tile(QM, row_base + offs_t, offs_d, mask_d, D) * scale
        k = load_tile(KM, row_base + offs_t, offs_d, mask_d, D)  # the chunk's own keys
        v = load_tile(VM, row_base + offs_t, offs_v, mask_v, DV)
        causal = tl.arange(0, L)[:, None] >= tl.arange(0, L)[None, :]
        log_w = tl.where(causal, cum_f[:, None] - cum_f[None, :] + i_gate[None, :], float("-inf"))
        state_max = tl.load(M_STATES + bh * (NC + 1) + chunk)
        inter_log = state_max + cum_f
        max_m = tl.maximum(inter_log, tl.max(log_w, 1))
        w_inter = tl.exp(inter_log - max_m)
        weights = tl.exp(log_w - max_m[:, None]) * tile_dot(qm_scaled, tl.trans(k), DOT_DTYPE)
        C, n = load_state(C_STATES, N_STATES, bh, chunk, NC, offs_d, mask_d, offs_v, mask_v, D, DV)
        num_m = w_inter[:, None] * tile_dot(qm_scaled, C, DOT_DTYPE) + tile_dot(weights, v, DOT_DTYPE)
        den_m = w_inter * tl.sum(qm_scaled * n[None, :], 1) + tl.sum(weights, 1)
        store_tile(NUM_M, row_base + offs_t, offs_v, mask_v, DV, num_m)
        tl.store(DEN_M + row_base + offs_t, den_m)
        tl.store(MAX_M + row_base + offs_t, max_m)

    if MODE == MODE_SWA:
        out = num_a / den_a[:, None]
    elif MODE == MODE_SHARED_NORM:
        log_g = tl_logsigmoid(tl.load(GG + row_base + offs_t).to(tl.float32))
        out, _, _, _, _ = shared_norm_output(num_a, den_a, max_a, num_m, den_m, max_m, log_g)
    else:
        h_m, _, _ = mlstm_read_out(num_m, den_m, max_m, eps)
        if MODE == MODE_MLSTM:
            out = h_m
        else:
            if MEMORY_NORM:
                y_unit, _, weight = head_norm(h_m, NORM_W, bh, H, offs_v, mask_v, norm_eps, DV, HAS_NORM_WEIGHT)
                y = y_unit * weight[None, :]
            else:
                y = h_m
            mix = tl.sigmoid(tl.load(GG + row_base + offs_t).to(tl.float32))
            h_a = num_a / den_a[:, None]
            out = h_a + mix[:, None] * (y - h_a)
    store_tile(OUT, row_base + offs_t, offs_v, mask_v, DV, out)
