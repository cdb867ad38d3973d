"""Quadratic reference of the hybrid attention op (DESIGN §3, §6).

Readable rather than fast: every (query, key) pair gets an explicit weight, masks are built
from positions, and the whole computation runs in float64 when the inputs are float64. The
chunkwise and recurrent forms, and later the Triton kernels, are tested against this file.
"""

from __future__ import annotations

import torch

from ._common import (
    check_inputs, compute_dtype, default_scale, expand_kv, gate_combine, log_forget, memory_inputs, mlstm_normalise,
    shared_norm_combine,
)


def _masked_mlstm(qk, log_decay, mask, v):
    """Unnormalised mLSTM read-out over the keys selected by ``mask``.

    qk [B,H,T,T] (scaled q.k), log_decay [B,H,T,T] (F_t - F_j + i_j), mask [T,T] bool.
    Returns num [B,H,T,Dv], den [B,H,T], m [B,H,T] with the true sums equal to exp(m) * (num, den).
    m is the exact row maximum of the log weights; rows with no selected key get m = 0 and zero sums
    (``empty`` tells which).
    """
    logw = log_decay.masked_fill(~mask, float("-inf"))
    m = logw.amax(-1)
    empty = torch.isinf(m)
    m = torch.where(empty, torch.zeros_like(m), m)
    w = torch.exp(logw - m.unsqueeze(-1)) * qk
    return w @ v, w.sum(-1), m, empty


def hybrid_attention(
    q, k, v, i_gate, f_gate, g_gate, *, window, sink_tokens, mode="hybrid", combine="gate",
    backend="reference", scale=None, norm_weight=None, norm_eps=1e-6, eps=1e-6, mq=None, mk=None, memory_norm="rms",
):
    """Hybrid mLSTM + sliding-window/sink attention, quadratic form.

    Args:
        q: [B, H, T, Dqk] queries (RoPE applied).   k: [B, Hkv, T, Dqk] keys (RoPE applied), H % Hkv == 0.
        v: [B, Hkv, T, Dv] values.
        i_gate, f_gate, g_gate: [B, H, T] pre-activations of the input gate (exp), forget gate
            (logsigmoid) and mix gate (sigmoid); g_gate is unused unless mode="hybrid".
        window: the attention branch sees keys j with t - window < j <= t.
        sink_tokens: ... and keys j < sink_tokens (the same key is never counted twice).
        mode: "hybrid" | "mlstm" (raw h^m, no norm) | "swa" (softmax branch only).
        combine: "gate": o = g * h^m + (1 - g) * h^a (h^m RMS-normed per head if memory_norm="rms");
            "shared_norm": window and sink keys weighted by exp(score), older keys by
            g * exp(F_t - F_j + i_j) * mq.mk, one normaliser.
        backend: accepted for signature compatibility with ``kernels.hybrid_attention``.
        scale: score scale, default Dqk ** -0.5 (used by both branches, as the teacher and xLSTM do).
        norm_weight: [H, Dv] weight of the per-head RMS norm on h^m in combine="gate" (None: 1).
        eps: added to the mLSTM normaliser max(|n.q|, exp(-m)) exactly as mlstm_kernels does.
        mq, mk: the memory branch's own queries [B, H, T, Dqk] and keys [B, Hkv, T, Dqk] (e.g.
            feature-mapped q, k); None: q, k. The attention branch always reads q, k.
        memory_norm: "rms" (the per-head RMS norm above) or "none" (h^m mixed as it is).
    Returns:
        [B, H, T, Dv] in q's dtype.
    """
    B, H, Hkv, T, Dqk, Dv = check_inputs(q, k, v, i_gate, f_gate, g_gate, window, sink_tokens, mode, combine,
                                         mq, mk, memory_norm)
    out_dtype, dt = q.dtype, compute_dtype(q)
    scale = default_scale(scale, Dqk)
    mq, mk = memory_inputs(q, k, mq, mk)
    q, k, v = q.to(dt), expand_kv(k, H).to(dt), expand_kv(v, H).to(dt)
    mq, mk = mq.to(dt), expand_kv(mk, H).to(dt)

    pos = torch.arange(T, device=q.device)
    t_idx, j_idx = pos[:, None], pos[None, :]
    causal = j_idx <= t_idx
    attn_set = causal & ((t_idx - j_idx < window) | (j_idx < sink_tokens))
    qk = (q @ k.transpose(-1, -2)) * scale

    h_attn = h_mem = None
    if mode != "mlstm":
        scores = qk.masked_fill(~attn_set, float("-inf"))
        a_max = scores.amax(-1)  # finite: key j = t is always in the set
        a_w = torch.exp(scores - a_max.unsqueeze(-1))
        h_attn = (a_w @ v) / a_w.sum(-1, keepdim=True)
    if mode != "swa":
        mem_qk = (mq @ mk.transpose(-1, -2)) * scale
        log_f = log_forget(f_gate, dt)
        cum = log_f.cumsum(-1)
        log_decay = cum.unsqueeze(-1) - cum.unsqueeze(-2) + i_gate.to(dt).unsqueeze(-2)
        if mode == "hybrid" and combine == "shared_norm":
            num_o, den_o, m_o, _ = _masked_mlstm(mem_qk, log_decay, causal & ~attn_set, v)
            out = shared_norm_combine(a_w @ v, a_w.sum(-1), a_max, num_o, den_o, m_o, g_gate.to(dt))
            return out.to(out_dtype)
        num, den, m, _ = _masked_mlstm(mem_qk, log_decay, causal, v)
        h_mem = mlstm_normalise(num, den, m, eps)
    if mode == "mlstm":
        return h_mem.to(out_dtype)
    if mode == "swa":
        return h_attn.to(out_dtype)
    return gate_combine(h_mem, h_attn, g_gate.to(dt), memory_norm, norm_weight, norm_eps).to(out_dtype)
