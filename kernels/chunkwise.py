"""Chunkwise torch form of the hybrid attention op: the CPU path for training and prefill.

Per chunk of ``chunk_size`` queries:
- mLSTM: an inter-chunk state (C, n, m) carried by a loop over chunks plus the quadratic
  intra-chunk part; the stabiliser m_t is the exact row maximum, so the result equals the
  parallel form including the max(|n.q|, exp(-m)) floor.
- Attention: the chunk's queries against the band of keys (t - window, t] (at most
  chunk_size + window - 1 keys) and the sink keys, never a T x T matrix.
- ``shared_norm``: the memory of keys older than the window is an ordinary mLSTM over a
  stream delayed by ``window`` (key j enters at position j + window with input gate
  i_j + F_{j+window} - F_j), so the same chunk loop serves it.
Gates are computed in float32 (float64 for float64 inputs).
"""

from __future__ import annotations

import torch

from ._common import (
    LOG_ZERO, check_inputs, compute_dtype, default_scale, expand_kv, head_rms_norm, log_forget, mlstm_normalise,
    mix_gate, shared_norm_combine,
)
from .recurrent import HybridState


def _pad_time(x, pad, value=0.0):
    """Append ``pad`` positions along the time dim (dim 2 of [B, H, T, ...] and of gates [B, H, T])."""
    if pad == 0:
        return x
    shape = list(x.shape)
    shape[2] = pad
    return torch.cat([x, x.new_full(shape, value)], dim=2)


def mlstm_chunkwise(q, k, v, i_gate, log_f, *, scale, chunk_size):
    """Unnormalised chunkwise mLSTM read-out.

    q, k [B,H,T,D], v [B,H,T,Dv] (same dtype), i_gate and log_f [B,H,T] in the compute dtype.
    Returns num [B,H,T,Dv], den [B,H,T], m [B,H,T] (true sums = exp(m) * (num, den), m the exact
    row max of log weights) and the final state (C [B,H,D,Dv], n [B,H,D], m [B,H]) after position T-1.
    """
    B, H, T, D = q.shape
    Dv = v.shape[-1]
    L = chunk_size
    pad = (-T) % L
    # Padded positions come after every real one: they must not decay the state (log f = 0) nor
    # write into it (i = log 0), so the final state is the state after position T - 1.
    q, k, v = _pad_time(q, pad), _pad_time(k, pad), _pad_time(v, pad)
    i_gate, log_f = _pad_time(i_gate, pad, LOG_ZERO), _pad_time(log_f, pad, 0.0)
    N = q.shape[2] // L
    q = (q * scale).view(B, H, N, L, D)
    k, v = k.view(B, H, N, L, D), v.view(B, H, N, L, Dv)
    i_gate, b = i_gate.view(B, H, N, L), log_f.view(B, H, N, L).cumsum(-1)

    tril = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
    log_intra = (b.unsqueeze(-1) - b.unsqueeze(-2) + i_gate.unsqueeze(-2)).masked_fill(~tril, float("-inf"))
    intra_max = log_intra.amax(-1)  # finite: key s = t is always present
    log_to_end = b[..., -1:] - b + i_gate  # weight of key s at the end of its chunk

    C = q.new_zeros(B, H, D, Dv)
    n = q.new_zeros(B, H, D)
    m_state = q.new_full((B, H), LOG_ZERO)
    nums, dens, ms = [], [], []
    for c in range(N):
        qc, kc, vc = q[:, :, c], k[:, :, c], v[:, :, c]
        m_inter = m_state.unsqueeze(-1) + b[:, :, c]
        m_t = torch.maximum(m_inter, intra_max[:, :, c])
        w_inter = torch.exp(m_inter - m_t)
        w_intra = torch.exp(log_intra[:, :, c] - m_t.unsqueeze(-1)) * (qc @ kc.transpose(-1, -2))
        nums.append(w_inter.unsqueeze(-1) * (qc @ C) + w_intra @ vc)
        dens.append(w_inter * (qc @ n.unsqueeze(-1)).squeeze(-1) + w_intra.sum(-1))
        ms.append(m_t)
        m_carry = m_state + b[:, :, c, -1]
        m_new = torch.maximum(m_carry, log_to_end[:, :, c].amax(-1))
        decay = torch.exp(m_carry - m_new)
        k_w = kc * torch.exp(log_to_end[:, :, c] - m_new.unsqueeze(-1)).unsqueeze(-1)
        C = decay[..., None, None] * C + k_w.transpose(-1, -2) @ vc
        n = decay.unsqueeze(-1) * n + k_w.sum(-2)
        m_state = m_new
    num = torch.stack(nums, 2).reshape(B, H, N * L, Dv)[:, :, :T]
    den = torch.stack(dens, 2).reshape(B, H, N * L)[:, :, :T]
    m = torch.stack(ms, 2).reshape(B, H, N * L)[:, :, :T]
    return num, den, m, (C, n, m_state)


def swa_chunkwise(q, k, v, *, window, sink_tokens, scale, chunk_size):
    """Unnormalised softmax over sinks + the last ``window`` keys, chunk by chunk.

    q, k [B,H,T,D], v [B,H,T,Dv]. Returns num [B,H,T,Dv], den [B,H,T], a_max [B,H,T] (exact row max).
    """
    B, H, T, D = q.shape
    Dv = v.shape[-1]
    L = chunk_size
    pad = (-T) % L
    Tp = T + pad
    N = Tp // L
    # Keys visible to chunk c lie in [c*L - P, c*L + L); P never needs to exceed the sequence.
    P = min(window - 1, Tp - L)
    qc = (_pad_time(q, pad) * scale).view(B, H, N, L, D)
    kp = torch.cat([k.new_zeros(B, H, P, D), _pad_time(k, pad)], 2)
    vp = torch.cat([v.new_zeros(B, H, P, Dv), _pad_time(v, pad)], 2)
    k_band = kp.unfold(2, L + P, L).transpose(-1, -2)  # [B,H,N,L+P,D]
    v_band = vp.unfold(2, L + P, L).transpose(-1, -2)
    t_pos = torch.arange(Tp, device=q.device).view(N, L, 1)
    j_pos = (torch.arange(N, device=q.device) * L - P).view(N, 1, 1) + torch.arange(L + P, device=q.device)
    band_ok = (j_pos >= sink_tokens) & (j_pos <= t_pos) & (t_pos - j_pos < window)  # [N,L,L+P]
    scores = (qc @ k_band.transpose(-1, -2)).masked_fill(~band_ok, float("-inf"))
    values = v_band
    if sink_tokens > 0:
        S = min(sink_tokens, T)
        sink_ok = torch.arange(S, device=q.device).view(1, 1, S) <= t_pos  # [N,L,S]
        sink_scores = torch.einsum("bhnld,bhsd->bhnls", qc, k[:, :, :S]).masked_fill(~sink_ok, float("-inf"))
        scores = torch.cat([sink_scores, scores], -1)
    a_max = scores.amax(-1)
    a_max = torch.where(torch.isinf(a_max), torch.zeros_like(a_max), a_max)  # padded rows only
    w = torch.exp(scores - a_max.unsqueeze(-1))
    if sink_tokens > 0:
        num = w[..., :S] @ v[:, :, :S].unsqueeze(2) + w[..., S:] @ values
    else:
        num = w @ values
    return (
        num.reshape(B, H, Tp, Dv)[:, :, :T],
        w.sum(-1).reshape(B, H, Tp)[:, :, :T],
        a_max.reshape(B, H, Tp)[:, :, :T],
    )


def _delayed_stream(k, v, i_gate, log_f, window, sink_tokens):
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


def hybrid_attention_chunkwise(
    q, k, v, i_gate, f_gate, g_gate, *, window, sink_tokens, mode="hybrid", combine="gate",
    chunk_size=64, scale=None, norm_weight=None, norm_eps=1e-6, eps=1e-6, return_state=False,
):
    """Chunkwise hybrid attention; same arguments and result as ``kernels.reference.hybrid_attention``.

    With ``return_state=True`` also returns the ``HybridState`` after the last position, from
    which ``kernels.recurrent.hybrid_attention_step`` continues.
    """
    B, H, Hkv, T, Dqk, Dv = check_inputs(q, k, v, i_gate, f_gate, g_gate, window, sink_tokens, mode, combine)
    out_dtype, dt = q.dtype, compute_dtype(q)
    scale = default_scale(scale, Dqk)
    k_kv, v_kv = k, v
    qf, kf, vf = q.to(dt), expand_kv(k, H).to(dt), expand_kv(v, H).to(dt)
    L = chunk_size

    state_mem = None
    out = None
    if mode != "mlstm":
        num_a, den_a, a_max = swa_chunkwise(qf, kf, vf, window=window, sink_tokens=sink_tokens, scale=scale, chunk_size=L)
    if mode != "swa":
        i_f = i_gate.to(dt)
        log_f = log_forget(f_gate, dt)
        if mode == "hybrid" and combine == "shared_norm":
            k_old, v_old, i_old = _delayed_stream(kf, vf, i_f, log_f, window, sink_tokens)
            num_o, den_o, m_o, state_mem = mlstm_chunkwise(qf, k_old, v_old, i_old, log_f, scale=scale, chunk_size=L)
            out = shared_norm_combine(num_a, den_a, a_max, num_o, den_o, m_o, g_gate.to(dt))
        else:
            num, den, m, state_mem = mlstm_chunkwise(qf, kf, vf, i_f, log_f, scale=scale, chunk_size=L)
            h_mem = mlstm_normalise(num, den, m, eps)
    if out is None:
        if mode == "mlstm":
            out = h_mem
        elif mode == "swa":
            out = num_a / den_a.unsqueeze(-1)
        else:
            out = mix_gate(head_rms_norm(h_mem, norm_weight, norm_eps), num_a / den_a.unsqueeze(-1), g_gate.to(dt))
    out = out.to(out_dtype)
    if not return_state:
        return out
    state = HybridState.from_prefill(
        k_kv, v_kv, i_gate, f_gate, state_mem, num_heads=H, window=window, sink_tokens=sink_tokens,
        mode=mode, combine=combine, compute_dtype=dt,
    )
    return out, state
