"""Triton path of the hybrid op: launchers, the ``autograd.Function`` and one public function.

Forward: ``mlstm_kernels``' Triton kernel materialises the mLSTM state (C, n, m) entering every
chunk (that recurrence is exactly theirs); ``kernels.triton_fwd`` computes each query chunk's
memory read-out, windowed softmax and combination in one program. Backward: ``kernels.triton_bwd``
turns the output gradient into each branch's gradient, ``mlstm_kernels`` carries the state
gradient backwards over chunks, and our kernels give dq, dk, dv of both branches. The gates'
gradients follow from dot products: every mLSTM weight is exp(F_t - F_s + i_s) times q_t.k_s, so
dL/d i_s = k_s.dk_s and dL/d F_u = q_u.dq_u - k_u.dk_u (branch gradients of the memory only), and
the forget gate's log-sigmoid gets the reverse cumulative sum of the latter.

Imported lazily by ``kernels.hybrid_attention`` (backend "triton", or "auto" on CUDA), so that
importing ``kernels`` never imports Triton: TRITON_INTERPRET must be set before Triton loads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton.language as tl
from mlstm_kernels.torch.chunkwise.triton_xl_chunk.bw_recurrent import mlstm_chunkwise__recurrent_bw_dC
from mlstm_kernels.torch.chunkwise.triton_xl_chunk.fw_recurrent import mlstm_chunkwise__recurrent_fw_C

from ._common import LOG_ZERO, check_inputs, default_scale, expand_kv, log_forget
from .chunkwise import delayed_stream
from .recurrent import HybridState
from .triton_bwd import attention_bwd_dkdv_kernel, attention_bwd_dq_kernel, combine_bwd_kernel, mlstm_bwd_kernel
from .triton_fwd import MODE_GATE, MODE_MLSTM, MODE_SHARED_NORM, MODE_SWA, hybrid_fwd_kernel

DOT_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
# logsigmoid(1e4) is exactly 0 in float32: padded positions after the last token do not decay the
# state, and their input gate log 0 writes nothing into it, so the final state is the last token's.
PAD_FORGET_GATE = 1e4


def mode_code(mode: str, combine: str) -> int:
    """The kernels' MODE constexpr for a mode and combination."""
    if mode == "mlstm":
        return MODE_MLSTM.value
    if mode == "swa":
        return MODE_SWA.value
    return (MODE_SHARED_NORM if combine == "shared_norm" else MODE_GATE).value


def _pad(x, pad, value=0.0):
    """[B, H, T, ...] or gates [B, H, T]: ``pad`` positions appended along T, contiguous."""
    if x is None:
        return None
    if pad:
        widths = (0, 0) * (x.dim() - 3) + (0, pad)
        x = F.pad(x, widths, value=value)
    return x.contiguous()


def state_safe_head_dim(dim: int) -> int:
    """The q/k head dim the state kernels are given: mlstm_kernels 2.0.6's state recurrence stores
    each n state with an unmasked block of min(64, next power of two) entries, which writes past
    the buffer (or into its neighbour, racing with another program) unless the head dim is a power
    of two up to 64 or a multiple of 64; so other head dims are padded with zero columns."""
    if dim <= 64:
        return 1 << (dim - 1).bit_length()
    return -(-dim // 64) * 64


def _block(n: int) -> int:
    return max(16, 1 << (n - 1).bit_length())


class HybridAttentionTriton(torch.autograd.Function):
    """Inputs per query head, [B, H, T, *]: q; the memory branch's queries q_m (None: q); the
    attention stream k_a, v_a (None for mode "mlstm"); the memory stream k_m, v_m, i_m (None for
    mode "swa"); the forget gate f and mix gate g pre-activations [B, H, T] (None where unused);
    norm_weight [H, Dv] or None; memory_norm: the gate combination RMS-normalises h^m.
    Returns (out [B, H, T, Dv], C [B, H, D, Dv], n [B, H, D], m [B, H]); the final memory state
    (None for "swa") carries no gradient."""

    @staticmethod
    def forward(ctx, q, q_m, k_a, v_a, k_m, v_m, i_m, f, g, norm_weight, mode, window, sink_tokens, chunk_size,
                scale, norm_eps, eps, memory_norm):
        B, H, T, D = q.shape
        Dv = (v_a if v_a is not None else v_m).shape[-1]
        L = chunk_size
        pad = (-T) % L
        Tp = T + pad
        NC = Tp // L
        has_attn, has_mem = mode != MODE_MLSTM, mode != MODE_SWA
        # with combine="gate" both branches read the same keys and values: pad (and save) them once
        same_k, same_v = k_m is k_a and k_a is not None, v_m is v_a and v_a is not None
        same_q = q_m is None
        q, k_a, v_a = _pad(q, pad), _pad(k_a, pad), _pad(v_a, pad)
        q_m = q if same_q else _pad(q_m, pad)
        k_m = k_a if same_k else _pad(k_m, pad)
        v_m = v_a if same_v else _pad(v_m, pad)
        i_m, f, g = _pad(i_m, pad, LOG_ZERO), _pad(f, pad, PAD_FORGET_GATE), _pad(g, pad)
        f32 = dict(device=q.device, dtype=torch.float32)
        placeholder = q.new_empty(1)
        if has_mem:
            C, n, m_states = mlstm_chunkwise__recurrent_fw_C(k_m, v_m, f, i_m, chunk_size=L)
            num_m, den_m, max_m = (torch.empty(B, H, Tp, Dv, **f32), torch.empty(B, H, Tp, **f32),
                                   torch.empty(B, H, Tp, **f32))
        else:
            C = n = m_states = num_m = den_m = max_m = None
        if has_attn:
            num_a, den_a, max_a = (torch.empty(B, H, Tp, Dv, **f32), torch.empty(B, H, Tp, **f32),
                                   torch.empty(B, H, Tp, **f32))
        else:
            num_a = den_a = max_a = None
        out = torch.empty(B, H, Tp, Dv, device=q.device, dtype=q.dtype)

        def ptr(x):
            return placeholder if x is None else x

        hybrid_fwd_kernel[(NC, B * H)](
            q, q_m, ptr(k_a), ptr(v_a), ptr(k_m), ptr(v_m), ptr(i_m), ptr(f), ptr(g), ptr(norm_weight),
            ptr(C), ptr(n), ptr(m_states),
            out, ptr(num_a), ptr(den_a), ptr(max_a), ptr(num_m), ptr(den_m), ptr(max_m),
            Tp, NC, H, scale, window, sink_tokens, norm_eps, eps,
            D=D, DV=Dv, BLOCK_D=_block(D), BLOCK_DV=_block(Dv), L=L, MODE=mode,
            HAS_NORM_WEIGHT=norm_weight is not None, MEMORY_NORM=memory_norm, DOT_DTYPE=DOT_DTYPES[q.dtype],
        )
        ctx.save_for_backward(q, None if same_q else q_m, k_a, v_a, k_m, v_m, i_m, f, g, norm_weight, C, n, m_states,
                              num_a, den_a, max_a, num_m, den_m, max_m)
        ctx.options = dict(mode=mode, window=window, sink_tokens=sink_tokens, L=L, T=T, scale=scale,
                           norm_eps=norm_eps, eps=eps, memory_norm=memory_norm)
        if has_mem:
            final = (C.view(B, H, NC + 1, D, Dv)[:, :, -1].clone(), n.view(B, H, NC + 1, D)[:, :, -1].clone(),
                     m_states[:, :, -1].clone())
            ctx.mark_non_differentiable(*final)
        else:
            final = (None, None, None)
        return (out[:, :, :T], *final)

    @staticmethod
    def backward(ctx, dout, *_state_grads):
        (q, q_m, k_a, v_a, k_m, v_m, i_m, f, g, norm_weight, C, n, m_states,
         num_a, den_a, max_a, num_m, den_m, max_m) = ctx.saved_tensors
        same_q = q_m is None
        q_m = q if same_q else q_m
        o = ctx.options
        mode, L, T = o["mode"], o["L"], o["T"]
        B, H, Tp, D = q.shape
        Dv = (v_a if v_a is not None else v_m).shape[-1]
        NC = Tp // L
        has_attn, has_mem = mode != MODE_MLSTM, mode != MODE_SWA
        dout = _pad(dout, Tp - T)
        f32 = dict(device=q.device, dtype=torch.float32)
        placeholder = q.new_empty(1)
        blocks = dict(D=D, DV=Dv, BLOCK_D=_block(D), BLOCK_DV=_block(Dv), L=L, DOT_DTYPE=DOT_DTYPES[q.dtype])

        def ptr(x):
            return placeholder if x is None else x

        def like(x):
            return None if x is None else torch.empty_like(x, dtype=torch.float32)

        dnum_a, dden_a, dnum_m, dden_m = like(num_a), like(den_a), like(num_m), like(den_m)
        dg = torch.empty(B, H, Tp, **f32) if g is not None else None
        dnorm_parts = torch.zeros(B * H, NC, Dv, **f32) if norm_weight is not None else None
        combine_bwd_kernel[(NC, B * H)](
            dout, ptr(g), ptr(norm_weight), ptr(num_a), ptr(den_a), ptr(max_a), ptr(num_m), ptr(den_m), ptr(max_m),
            ptr(dnum_a), ptr(dden_a), ptr(dnum_m), ptr(dden_m), ptr(dg), ptr(dnorm_parts),
            T, Tp, NC, H, o["norm_eps"], o["eps"],
            DV=Dv, BLOCK_DV=_block(Dv), L=L, MODE=mode, HAS_NORM_WEIGHT=norm_weight is not None,
            MEMORY_NORM=o["memory_norm"],
        )

        dq = dq_m = dk_a = dv_a = dk_m = dv_m = di = df = None
        if has_mem:
            # The state gradient is carried by mlstm_kernels over [dnum | dden]: n is the state of
            # a value column of ones, so one pass gives dC and dn.
            d_out_aug = torch.cat([dnum_m, dden_m.unsqueeze(-1)], -1)
            dC = mlstm_chunkwise__recurrent_bw_dC(
                q_m, f, m_states, max_m, d_out_aug, torch.ones_like(den_m), qk_scale=o["scale"], chunk_size=L, eps=0.0)
            dq_m, dk_m, dv_m = torch.empty(B, H, Tp, D, **f32), torch.empty(B, H, Tp, D, **f32), like(num_m)
            di, d_log_decay = torch.empty(B, H, Tp, **f32), torch.empty(B, H, Tp, **f32)
            mlstm_bwd_kernel[(NC, B * H)](
                q_m, k_m, v_m, i_m, f, C, n, m_states, dC, max_m, dnum_m, dden_m,
                dq_m, dk_m, dv_m, di, d_log_decay, Tp, NC, o["scale"], **blocks)
            d_log_f = d_log_decay.flip(-1).cumsum(-1).flip(-1)
            df = d_log_f * torch.sigmoid(-f.float())
        if has_attn:
            dq_a = torch.empty(B, H, Tp, D, **f32)
            dk_a, dv_a = torch.empty(B, H, Tp, D, **f32), like(num_a)
            common = (o["window"], o["sink_tokens"])
            attention_bwd_dq_kernel[(NC, B * H)](
                q, k_a, v_a, max_a, dnum_a, dden_a, dq_a, Tp, o["scale"], *common, **blocks)
            attention_bwd_dkdv_kernel[(NC, B * H)](
                q, k_a, v_a, max_a, dnum_a, dden_a, dk_a, dv_a, Tp, NC, o["scale"], *common, **blocks)
            dq = dq_a
        if same_q:  # one query stream read by both branches: one gradient
            dq = dq_m if dq is None else (dq if dq_m is None else dq.add_(dq_m))
            dq_m = None

        def cut(grad, like_input):
            return None if grad is None else grad[:, :, :T].to(like_input.dtype)

        dnorm = None
        if norm_weight is not None:
            dnorm = dnorm_parts.view(B, H, NC, Dv).sum((0, 2)).to(norm_weight.dtype)
        return (cut(dq, q), cut(dq_m, q_m), cut(dk_a, k_a), cut(dv_a, v_a), cut(dk_m, k_m), cut(dv_m, v_m),
                cut(di, i_m), cut(df, f), cut(dg, g), dnorm, None, None, None, None, None, None, None, None)


def hybrid_attention_triton(
    q, k, v, i_gate, f_gate, g_gate, *, window, sink_tokens, mode="hybrid", combine="gate", chunk_size=64,
    scale=None, norm_weight=None, norm_eps=1e-6, eps=1e-6, return_state=False, mq=None, mk=None, memory_norm="rms",
):
    """Hybrid mLSTM + sliding-window/sink attention on Triton kernels (forward and backward).

    Args:
        q: [B, H, T, Dqk] queries (RoPE applied); float32, float16 or bfloat16.
        k: [B, Hkv, T, Dqk] keys (RoPE applied), H % Hkv == 0.   v: [B, Hkv, T, Dv] values.
        i_gate, f_gate, g_gate: [B, H, T] pre-activations of the input gate (exp), forget gate
            (logsigmoid) and mix gate (sigmoid); g_gate is used by mode="hybrid" only.
        window, sink_tokens, mode, combine, scale, norm_weight [H, Dv], norm_eps, eps, mq, mk,
            memory_norm: as in ``kernels.reference.hybrid_attention``.
        chunk_size: queries per program and keys per block, a power of two >= 16.
        return_state: also return the ``HybridState`` after the last position (no gradient).
    Returns:
        [B, H, T, Dv] in q's dtype (and the state if ``return_state``). Every input (``mq``, ``mk``
        included), gate and ``norm_weight`` receives its gradient. The mLSTM stabiliser is treated
        as a constant in the backward (it cancels in the output except through ``eps``), as
        ``mlstm_kernels`` does.
    """
    from . import triton_unavailable_reason

    B, H, Hkv, T, Dqk, Dv = check_inputs(q, k, v, i_gate, f_gate, g_gate, window, sink_tokens, mode, combine,
                                         mq, mk, memory_norm)
    reason = triton_unavailable_reason(q.device, q.dtype, Dqk, Dv, chunk_size)
    if reason is not None:
        raise ValueError(f"backend='triton' cannot run here: {reason}")
    scale = default_scale(scale, Dqk)
    code = mode_code(mode, combine)
    k_e, v_e = expand_kv(k, H), expand_kv(v, H)  # autograd sums each GQA group's gradients
    # the memory's own queries/keys (None: the attention's); q_m None tells the kernel q serves both
    q_m = mq
    mk_e = k_e if mk is None else expand_kv(mk, H)
    padded_dim = state_safe_head_dim(Dqk)
    if padded_dim != Dqk:  # zero columns change no product; autograd drops their gradients
        same_k = mk_e is k_e
        q, k_e = F.pad(q, (0, padded_dim - Dqk)), F.pad(k_e, (0, padded_dim - Dqk))
        mk_e = k_e if same_k else F.pad(mk_e, (0, padded_dim - Dqk))
        q_m = None if q_m is None else F.pad(q_m, (0, padded_dim - Dqk))
    k_a = v_a = k_m = v_m = i_m = f = None
    if code != MODE_MLSTM:
        k_a, v_a = k_e, v_e
    if code != MODE_SWA:
        f = f_gate
        if code == MODE_SHARED_NORM:
            # keys older than the window: an ordinary mLSTM stream, key j arriving at j + window
            k_m, v_m, i_m = delayed_stream(mk_e, v_e, i_gate.float(), log_forget(f_gate, torch.float32),
                                            window, sink_tokens)
        else:
            k_m, v_m, i_m = mk_e, v_e, i_gate
    g = g_gate.float() if code in (MODE_GATE, MODE_SHARED_NORM) else None
    # gates in float32: the kernels compute them so, and padding them with log 0 must not overflow
    i_m, f = (None if x is None else x.float() for x in (i_m, f))
    if code == MODE_SWA:
        q_m = None
    use_norm = code == MODE_GATE and memory_norm == "rms"
    weight = norm_weight if use_norm else None
    out, C, n, m = HybridAttentionTriton.apply(q, q_m, k_a, v_a, k_m, v_m, i_m, f, g, weight, code, window,
                                               sink_tokens, chunk_size, scale, norm_eps, eps, use_norm)
    if not return_state:
        return out
    memory = None if C is None else (C, n, m)
    state = HybridState.from_prefill(k, v, i_gate, f_gate, memory, num_heads=H, window=window,
                                     sink_tokens=sink_tokens, mode=mode, combine=combine, compute_dtype=torch.float32,
                                     mk=mk)
    return out, state
