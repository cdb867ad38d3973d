"""Chunkwise torch form of the hybrid attention op: the CPU path for training and prefill.

Per chunk of ``chunk_size`` queries:
- mLSTM: an inter-chunk state (C, n, m) carried by a loop over chunks plus the quadratic
  intra-chunk part; the stabiliser m_t is the exact row maximum, so the result equals the
  parallel form including the max(|n.q|, exp(-m)) floor.
- Attention: the chunk's queries against the band of keys (t - window, t] (at most
  chunk_size + window - 1 keys) and the sink keys, never a T x T matrix; for the gate mix and
  ``swa`` mode all chunks go through one masked SDPA call (``swa_blocked``), ``shared_norm``
  writes the band's sums out (``swa_chunkwise``).
- ``shared_norm``: the memory of keys older than the window is an ordinary mLSTM over a
  stream delayed by ``window`` (key j enters at position j + window with input gate
  i_j + F_{j+window} - F_j), so the same chunk loop serves it.
Gates are computed in float32 (float64 for float64 inputs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._common import (
    LOG_ZERO, check_inputs, compute_dtype, default_scale, expand_kv, gate_combine, log_forget, memory_inputs,
    mlstm_normalise, shared_norm_combine,
)
from .chunkwise_memory import MemorySums, memory_stabilisers, memory_sums
from .recurrent import HybridState


def pad_time(x, pad, value=0.0):
    """Append ``pad`` positions along the time dim (dim 2 of [B, H, T, ...] and of gates [B, H, T])."""
    if pad == 0:
        return x
    shape = list(x.shape)
    shape[2] = pad
    return torch.cat([x, x.new_full(shape, value)], dim=2)


def mlstm_chunkwise(q, k, v, i_gate, log_f, *, scale, chunk_size, initial=None):
    """Unnormalised chunkwise mLSTM read-out.

    q, k [B,H,T,D], v [B,H,T,Dv] (same dtype), i_gate and log_f [B,H,T] in the compute dtype.
    Returns num [B,H,T,Dv], den [B,H,T], m [B,H,T] (true sums = exp(m) * (num, den), m the exact
    row max of log weights) and the final state (C [B,H,D,Dv], n [B,H,D], m [B,H]) after position T-1.
    ``initial``: the state (C, n, m) before position 0 (a previous segment's final state), or None.

    Every chunk's own products (its L x L block, its contribution to the state) are computed for
    all chunks at once; only the state entering each chunk is carried by a loop, a scaled sum of
    two [D, Dv] matrices per chunk. On a CPU each op costs microseconds of dispatch whatever its
    size, so this count of ops, not the FLOPs, is what a per-chunk loop of products pays. With a
    gradient the sums go through ``chunkwise_memory.MemorySums``, whose backward is written out
    (the stabilisers stay ordinary differentiable ops).
    """
    B, H, T, D = q.shape
    Dv = v.shape[-1]
    L = chunk_size
    pad = (-T) % L
    # Padded positions come after every real one: they must not decay the state (log f = 0) nor
    # write into it (i = log 0), so the final state is the state after position T - 1.
    q, k, v = pad_time(q, pad), pad_time(k, pad), pad_time(v, pad)
    i_gate, log_f = pad_time(i_gate, pad, LOG_ZERO), pad_time(log_f, pad, 0.0)
    N = q.shape[2] // L
    q = (q * scale).view(B, H, N, L, D)
    k, v = k.view(B, H, N, L, D), v.view(B, H, N, L, Dv)
    i_gate, b = i_gate.view(B, H, N, L), log_f.view(B, H, N, L).cumsum(-1)
    C0, n0, m0 = initial if initial is not None else (q.new_zeros(B, H, D, Dv), q.new_zeros(B, H, D),
                                                      q.new_full((B, H), LOG_ZERO))
    m_t, m_in = memory_stabilisers(i_gate, b, m0)
    args = (q, k, v, i_gate, b, m_t, m_in, C0, n0)
    if torch.is_grad_enabled() and any(x.requires_grad for x in args):
        num, den, C_end, n_end = MemorySums.apply(*args)
    else:
        num, den, _, _, C_end, n_end, _, _ = memory_sums(*args)
    num = num.reshape(B, H, N * L, Dv)[:, :, :T]
    den = den.reshape(B, H, N * L)[:, :, :T]
    m = m_t.reshape(B, H, N * L)[:, :, :T]
    return num, den, m, (C_end, n_end, m_in[..., -1])


def _band_layout(Tq, L, window, start, key_start, Tk):
    """Blocks of L queries at positions start .. start + Tq - 1 (padded to N * L) and the band of keys
    they read: the keys from ``first`` = start - P on, where P never needs to reach before position 0.
    Returns (pad, N, P, first, lo, hi): keys lo .. hi - 1 come from the input (from ``key_start``),
    those before ``lo`` are zeros standing in for positions before 0 (masked)."""
    pad = (-Tq) % L
    N = (Tq + pad) // L
    P = min(window - 1, start + Tq + pad - L)
    first = start - P
    lo, hi = max(first, key_start), start + Tq
    if key_start > max(first, 0) or key_start + Tk < hi:
        raise ValueError(f"keys cover positions {key_start}..{key_start + Tk - 1}; queries "
                         f"{start}..{start + Tq - 1} need {max(first, 0)}..{hi - 1}")
    return pad, N, P, first, lo, hi


def _band_source(x, first, lo, hi, key_start, pad):
    """Keys first .. hi - 1 + pad of x [B, H, Tk, D] (positions from key_start), zeros outside x."""
    B, H, _, D = x.shape
    parts = [x.new_zeros(B, H, lo - first, D)] if lo > first else []
    parts.append(x[:, :, lo - key_start:hi - key_start])
    if pad:
        parts.append(x.new_zeros(B, H, pad, D))
    return torch.cat(parts, 2) if len(parts) > 1 else parts[0]


def _window_masks(N, L, P, first, start, window, sink_tokens, S, device):
    """Which keys each query of each block reads: band [N, L, L + P] (the last ``window`` positions,
    sinks excluded: they come from the sink keys) and sinks [N, L, S] (positions 0 .. S - 1, causal)."""
    t_pos = (start + torch.arange(N * L, device=device)).view(N, L, 1)
    j_pos = (first + torch.arange(N, device=device) * L).view(N, 1, 1) + torch.arange(L + P, device=device)
    band_ok = (j_pos >= sink_tokens) & (j_pos <= t_pos) & (t_pos - j_pos < window)
    sink_ok = torch.arange(S, device=device).view(1, 1, S) <= t_pos
    return band_ok, sink_ok


def swa_chunkwise(q, k, v, sink_k, sink_v, *, window, sink_tokens, scale, chunk_size, start=0, key_start=0):
    """Unnormalised softmax over sinks + the last ``window`` keys, chunk by chunk.

    q [B,H,Tq,D]: the queries at positions start .. start + Tq - 1. k [B,H,Tk,D], v [B,H,Tk,Dv]:
    the keys at positions key_start .. key_start + Tk - 1, covering every window key of these
    queries (key_start <= start - window + 1, or 0) up to start + Tq - 1. sink_k, sink_v
    [B,H,S,D]: the keys at positions 0 .. S - 1 with S = min(sink_tokens, start + Tq).
    Returns num [B,H,Tq,Dv], den [B,H,Tq], a_max [B,H,Tq] (exact row max): what ``shared_norm``
    needs to add the memory's sums; ``swa_blocked`` is the faster form when only the
    normalised output is needed.
    """
    B, H, Tq, D = q.shape
    Dv = v.shape[-1]
    L = chunk_size
    pad, N, P, first, lo, hi = _band_layout(Tq, L, window, start, key_start, k.shape[2])
    Tp = N * L
    qc = (pad_time(q, pad) * scale).view(B, H, N, L, D)
    k_band = _band_source(k, first, lo, hi, key_start, pad).unfold(2, L + P, L).transpose(-1, -2)  # [B,H,N,L+P,D]
    v_band = _band_source(v, first, lo, hi, key_start, pad).unfold(2, L + P, L).transpose(-1, -2)
    S = sink_k.shape[2]
    band_ok, sink_ok = _window_masks(N, L, P, first, start, window, sink_tokens, S, q.device)
    scores = (qc @ k_band.transpose(-1, -2)).masked_fill(~band_ok, float("-inf"))
    if S > 0:
        sink_scores = torch.einsum("bhnld,bhsd->bhnls", qc, sink_k).masked_fill(~sink_ok, float("-inf"))
        scores = torch.cat([sink_scores, scores], -1)
    a_max = scores.amax(-1)
    a_max = torch.where(torch.isinf(a_max), torch.zeros_like(a_max), a_max)  # padded rows only
    w = torch.exp(scores - a_max.unsqueeze(-1))
    if S > 0:
        num = w[..., :S] @ sink_v.unsqueeze(2) + w[..., S:] @ v_band
    else:
        num = w @ v_band
    return (
        num.reshape(B, H, Tp, Dv)[:, :, :Tq],
        w.sum(-1).reshape(B, H, Tp)[:, :, :Tq],
        a_max.reshape(B, H, Tp)[:, :, :Tq],
    )


def swa_blocked(q, k, v, sink_k, sink_v, *, window, sink_tokens, scale, block, start=0, key_start=0):
    """Normalised softmax over sinks + the last ``window`` keys: ``swa_chunkwise``'s positions and
    arguments, but k, v, sink_k, sink_v keep their Hkv key/value heads ([B, Hkv, ., D]), and the
    result is the attention output [B, H, Tq, Dv] itself, not its sums.

    Each block of ``block`` queries reads its own keys (the sinks and the block + window - 1 keys
    before its end); the blocks are stacked along the batch and go through one masked
    ``scaled_dot_product_attention`` call, whose fused CPU kernel never writes the band's scores to
    memory and reads GQA heads in place: on a CPU the whole op took 0.60-0.80x the written-out band's
    time forward from 256 to 4k tokens (docs/performance.md, "Kernels"). The gate mix and ``swa`` mode
    need only this; ``shared_norm`` needs the sums.
    """
    B, H, Tq, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    L = block
    pad, N, P, first, lo, hi = _band_layout(Tq, L, window, start, key_start, k.shape[2])
    S = sink_k.shape[2]
    band_ok, sink_ok = _window_masks(N, L, P, first, start, window, sink_tokens, S, q.device)
    mask = torch.cat([sink_ok.expand(N, L, S), band_ok], -1) if S else band_ok  # [N, L, S + L + P]
    mask = mask.expand(B, N, L, S + L + P).reshape(B * N, 1, L, S + L + P)

    def blocks(x, sinks):  # [B, Hkv, Tk, d] -> each block's keys [B * N, Hkv, S + L + P, d]
        d = x.shape[-1]
        band = _band_source(x, first, lo, hi, key_start, pad).unfold(2, L + P, L).permute(0, 2, 1, 4, 3)
        if S:
            band = torch.cat([sinks.unsqueeze(1).expand(B, N, Hkv, S, d), band], 3)
        return band.reshape(B * N, Hkv, S + L + P, d)

    qb = pad_time(q, pad).view(B, H, N, L, D).transpose(1, 2).reshape(B * N, H, L, D)
    out = F.scaled_dot_product_attention(qb, blocks(k, sink_k), blocks(v, sink_v), attn_mask=mask, scale=scale,
                                         enable_gqa=Hkv != H)
    return out.view(B, N, H, L, Dv).transpose(1, 2).reshape(B, H, N * L, Dv)[:, :, :Tq]


def delayed_stream(k, v, i_gate, log_f, window, sink_tokens):
    """Keys older than the window as an ordinary mLSTM stream: key j arrives at j + window."""
    T = k.shape[2]
    cum = log_f.to(torch.float64).cumsum(-1)
    shifted = torch.cat([cum.new_zeros(*cum.shape[:-1], window), cum], -1)[..., :T]
    decay_in_window = (cum - shifted).to(log_f.dtype)  # F_t - F_{t-window}
    i_prev = torch.cat([i_gate.new_full((*i_gate.shape[:-1], window), LOG_ZERO), i_gate], -1)[..., :T]
    src = torch.arange(T, device=k.device) - window
    i_old = torch.where(src >= sink_tokens, i_prev + decay_in_window, torch.full_like(i_prev, LOG_ZERO))
    zeros_k = k.new_zeros(*k.shape[:2], window, k.shape[-1])
    zeros_v = v.new_zeros(*v.shape[:2], window, v.shape[-1])
    k_old = torch.cat([zeros_k, k], 2)[:, :, :T]
    v_old = torch.cat([zeros_v, v], 2)[:, :, :T]
    return k_old, v_old, i_old


# Largest temporary a segment may create, in elements (4 MiB in float32). Whole-sequence
# temporaries grow with T (the window scores are T x (chunk + window)); past glibc's 32 MiB mmap
# threshold each one is fresh pages from the kernel, zeroed and faulted in on every call, which
# on a CPU costs as much as the arithmetic. Bounded segments stay in the allocator and the caches:
# on 2 EPYC cores one SmolLM2 layer at batch 8 x 2k took 280 ms in 256-token segments against
# 714 ms whole. Segments of fewer than 4 chunks pay more in per-op dispatch than they save.
SEGMENT_ELEMENTS = 1 << 20
MIN_SEGMENT_CHUNKS = 4


def segment_tokens_for(B, H, window, sink_tokens, chunk_size, qk_dim, v_dim) -> int:
    """Tokens per segment: a multiple of the chunk size whose largest temporary stays under
    ``SEGMENT_ELEMENTS`` (window scores: chunk + window + sinks per query; mLSTM: chunk x chunk
    and one [Dqk, Dv] state per chunk)."""
    per_token = B * H * max(chunk_size + window - 1 + sink_tokens, qk_dim * v_dim // chunk_size, chunk_size, qk_dim)
    return max(MIN_SEGMENT_CHUNKS, SEGMENT_ELEMENTS // per_token // chunk_size) * chunk_size


def hybrid_attention_chunkwise(
    q, k, v, i_gate, f_gate, g_gate, *, window, sink_tokens, mode="hybrid", combine="gate",
    chunk_size=64, scale=None, norm_weight=None, norm_eps=1e-6, eps=1e-6, return_state=False,
    segment_tokens=None, mq=None, mk=None, memory_norm="rms", window_form="auto", outputs=None,
):
    """Chunkwise hybrid attention; same arguments and result as ``kernels.reference.hybrid_attention``.

    ``outputs``: the function computing (output, final memory state) from these arguments:
    ``chunkwise_outputs`` (None) or a compiled form of it (``kernels.compiled``); the decode state,
    when asked for, is built from its result outside it.

    ``window_form``: "auto" runs the window branch as one masked SDPA call (``swa_blocked``) where
    the combination needs only its output (gate mix, ``swa``) and writes the band's sums out
    (``swa_chunkwise``) for ``shared_norm``; "band" writes them out in every mode (the same
    result, slower: kept to measure the difference).

    With ``return_state=True`` also returns the ``HybridState`` after the last position, from
    which ``kernels.recurrent.hybrid_attention_step`` continues.

    The sequence is processed in segments of ``segment_tokens`` queries (a multiple of
    ``chunk_size``; None picks the longest whose temporaries stay bounded, see
    ``SEGMENT_ELEMENTS``), the mLSTM state carried from one to the next and each segment's window
    reading the keys before it: memory beyond the inputs and outputs does not grow with T.
    """
    out, state_mem = (outputs or chunkwise_outputs)(
        q, k, v, i_gate, f_gate, g_gate, window=window, sink_tokens=sink_tokens, mode=mode, combine=combine,
        chunk_size=chunk_size, scale=scale, norm_weight=norm_weight, norm_eps=norm_eps, eps=eps,
        segment_tokens=segment_tokens, mq=mq, mk=mk, memory_norm=memory_norm, window_form=window_form)
    if not return_state:
        return out
    state = HybridState.from_prefill(
        k, v, i_gate, f_gate, state_mem, num_heads=q.shape[1], window=window, sink_tokens=sink_tokens,
        mode=mode, combine=combine, compute_dtype=compute_dtype(q), mk=k if mk is None else mk,
    )
    return out, state


def chunkwise_outputs(q, k, v, i_gate, f_gate, g_gate, *, window, sink_tokens, mode, combine, chunk_size, scale,
                      norm_weight, norm_eps, eps, segment_tokens, mq, mk, memory_norm, window_form, length=None):
    """``hybrid_attention_chunkwise``'s output [B, H, T, Dv] and the memory branch's state after the
    last position ((C, n, m), None in ``swa`` mode): tensors in, tensors out, one function that
    ``torch.compile`` can trace whole.

    ``length`` (a 0-d tensor, or None for T): the positions from ``length`` on are padding appended
    by the caller. They write nothing into the memory and do not decay it, so the state returned is
    the state after position ``length - 1``; the outputs of real positions never read them (causal).
    Under ``shared_norm`` a padded position would otherwise admit the real key ``window`` positions
    before it into the memory."""
    B, H, Hkv, T, Dqk, Dv = check_inputs(q, k, v, i_gate, f_gate, g_gate, window, sink_tokens, mode, combine,
                                         mq, mk, memory_norm)
    out_dtype, dt = q.dtype, compute_dtype(q)
    scale = default_scale(scale, Dqk)
    mq, mk = memory_inputs(q, k, mq, mk)
    L = chunk_size
    if segment_tokens is None:
        segment_tokens = segment_tokens_for(B, H, window, sink_tokens, L, Dqk, Dv)
    elif segment_tokens < L or segment_tokens % L:
        raise ValueError(f"segment_tokens={segment_tokens} is invalid; allowed values: a multiple of "
                         f"chunk_size={L}, or None")
    if window_form not in ("auto", "band"):
        raise ValueError(f"window_form={window_form!r} is not supported; allowed values: 'auto', 'band'")
    shared_norm = mode == "hybrid" and combine == "shared_norm"
    band_sums = shared_norm or window_form == "band"
    if mode != "swa":
        i_f = i_gate.to(dt)
        log_f = log_forget(f_gate, dt)
        if shared_norm:
            # keys older than the window form a delayed mLSTM stream (built for the whole
            # sequence: a shift, [B, Hkv, T, D])
            k_mem, v_mem, i_mem = delayed_stream(mk, v, i_f, log_f, window, sink_tokens)
        else:
            k_mem, v_mem, i_mem = mk, v, i_f
        if length is not None:
            real = torch.arange(T, device=q.device) < length
            i_mem = torch.where(real, i_mem, LOG_ZERO)
            log_f = torch.where(real, log_f, 0.0)

    def heads(x):  # GQA key/value heads as the query heads that read them, in the compute dtype
        return expand_kv(x, H).to(dt)

    state_mem, outs = None, []
    for s0 in range(0, T, segment_tokens):
        s1 = min(T, s0 + segment_tokens)
        qf = q[:, :, s0:s1].to(dt)
        k0, S = max(0, s0 - window + 1), min(sink_tokens, s1)
        if mode != "mlstm" and band_sums:  # shared_norm adds the memory's sums to the window's
            num_a, den_a, a_max = swa_chunkwise(
                qf, heads(k[:, :, k0:s1]), heads(v[:, :, k0:s1]), heads(k[:, :, :S]), heads(v[:, :, :S]),
                window=window, sink_tokens=sink_tokens, scale=scale, chunk_size=L, start=s0, key_start=k0)
            h_attn = num_a / den_a.unsqueeze(-1)
        elif mode != "mlstm":
            h_attn = swa_blocked(qf, k[:, :, k0:s1].to(dt), v[:, :, k0:s1].to(dt), k[:, :, :S].to(dt),
                                 v[:, :, :S].to(dt), window=window, sink_tokens=sink_tokens, scale=scale, block=L,
                                 start=s0, key_start=k0)
        if mode != "swa":
            num, den, m, state_mem = mlstm_chunkwise(
                qf if mq is q else mq[:, :, s0:s1].to(dt), heads(k_mem[:, :, s0:s1]), heads(v_mem[:, :, s0:s1]),
                i_mem[:, :, s0:s1], log_f[:, :, s0:s1], scale=scale, chunk_size=L, initial=state_mem)
        g_seg = g_gate[:, :, s0:s1].to(dt) if g_gate is not None else None
        if mode == "mlstm":
            out = mlstm_normalise(num, den, m, eps)
        elif mode == "swa":
            out = h_attn
        elif shared_norm:
            out = shared_norm_combine(num_a, den_a, a_max, num, den, m, g_seg)
        else:
            out = gate_combine(mlstm_normalise(num, den, m, eps), h_attn, g_seg, memory_norm, norm_weight, norm_eps)
        outs.append(out.to(out_dtype))
    return (outs[0] if len(outs) == 1 else torch.cat(outs, 2)), state_mem
