"""Recurrent (one token at a time) form of the hybrid attention op: generation.

The decode state has a constant size whatever the prompt length: per query head the mLSTM
memory (C [D, Dv], n [D], m), per key/value head a ring buffer of the last ``window`` keys and
values and the ``sink_tokens`` first ones. With ``combine="shared_norm"`` the memory holds only
keys older than the window: a key enters it when the ring buffer evicts it, with the decay it
accumulated while in the window (``win_logw``). Rows of a batch may sit at different positions
(``pos``), which is how prompts of different lengths decode together without padding.
Every update is functional (no in-place writes), so gradients flow through decoding too.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F

from ._common import LOG_ZERO, check_inputs, default_scale, expand_kv, head_rms_norm, mix_gate, mlstm_normalise


@dataclass
class HybridState:
    """Decode state of one hybrid attention layer for a batch (all tensors batch-first)."""

    pos: torch.Tensor  # [B] long: number of tokens consumed so far (the next token's position)
    window: int
    sink_tokens: int
    mode: str
    combine: str
    C: torch.Tensor | None = None  # [B, H, Dqk, Dv] mLSTM memory, stabilised by m
    n: torch.Tensor | None = None  # [B, H, Dqk] normaliser
    m: torch.Tensor | None = None  # [B, H] log-space stabiliser
    win_k: torch.Tensor | None = None  # [B, Hkv, W, Dqk] ring buffer, slot = position % W
    win_v: torch.Tensor | None = None  # [B, Hkv, W, Dv]
    win_pos: torch.Tensor | None = None  # [B, W] long, position held by each slot (-1: empty)
    win_logw: torch.Tensor | None = None  # [B, H, W] shared_norm: i_j + F_t - F_j of each slot
    sink_k: torch.Tensor | None = None  # [B, Hkv, S, Dqk]
    sink_v: torch.Tensor | None = None  # [B, Hkv, S, Dv]

    @property
    def has_memory(self) -> bool:
        return self.mode != "swa"

    @property
    def has_attention(self) -> bool:
        return self.mode != "mlstm"

    @property
    def shared_norm(self) -> bool:
        return self.mode == "hybrid" and self.combine == "shared_norm"

    def tensors(self):
        return {f.name: getattr(self, f.name) for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)}

    def nbytes(self) -> int:
        """Bytes held by the state (what decoding keeps in memory for this layer)."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def index_select(self, index: torch.Tensor) -> "HybridState":
        return replace(self, **{k: t.index_select(0, index) for k, t in self.tensors().items()})

    @staticmethod
    def cat(states: list["HybridState"]) -> "HybridState":
        first = states[0]
        return replace(first, **{k: torch.cat([getattr(s, k) for s in states], 0) for k in first.tensors()})

    @classmethod
    def empty(cls, batch, num_heads, num_kv_heads, qk_dim, v_dim, *, window, sink_tokens, mode, combine,
              dtype, device, compute_dtype=torch.float32):
        st = cls(pos=torch.zeros(batch, dtype=torch.long, device=device), window=window,
                 sink_tokens=sink_tokens, mode=mode, combine=combine)
        if st.has_memory:
            st.C = torch.zeros(batch, num_heads, qk_dim, v_dim, dtype=compute_dtype, device=device)
            st.n = torch.zeros(batch, num_heads, qk_dim, dtype=compute_dtype, device=device)
            st.m = torch.full((batch, num_heads), LOG_ZERO, dtype=compute_dtype, device=device)
        if st.has_attention:
            st.win_k = torch.zeros(batch, num_kv_heads, window, qk_dim, dtype=dtype, device=device)
            st.win_v = torch.zeros(batch, num_kv_heads, window, v_dim, dtype=dtype, device=device)
            st.win_pos = torch.full((batch, window), -1, dtype=torch.long, device=device)
            st.sink_k = torch.zeros(batch, num_kv_heads, sink_tokens, qk_dim, dtype=dtype, device=device)
            st.sink_v = torch.zeros(batch, num_kv_heads, sink_tokens, v_dim, dtype=dtype, device=device)
            if st.shared_norm:
                st.win_logw = torch.full((batch, num_heads, window), LOG_ZERO, dtype=compute_dtype, device=device)
        return st

    @classmethod
    def from_prefill(cls, k, v, i_gate, f_gate, memory, *, num_heads, window, sink_tokens, mode, combine,
                     compute_dtype):
        """State after a chunkwise pass over k, v [B, Hkv, T, D]; ``memory`` = (C, n, m) or None."""
        B, Hkv, T, D = k.shape
        st = cls.empty(B, num_heads, Hkv, D, v.shape[-1], window=window, sink_tokens=sink_tokens, mode=mode,
                       combine=combine, dtype=k.dtype, device=k.device, compute_dtype=compute_dtype)
        st.pos = torch.full((B,), T, dtype=torch.long, device=k.device)
        if st.has_memory:
            st.C, st.n, st.m = (x.to(compute_dtype) for x in memory)
        if st.has_attention:
            recent = torch.arange(max(0, T - window), T, device=k.device)
            slots = recent % window
            st.win_k = st.win_k.index_copy(2, slots, k[:, :, recent])
            st.win_v = st.win_v.index_copy(2, slots, v[:, :, recent])
            st.win_pos = st.win_pos.index_copy(1, slots, recent.expand(B, -1).contiguous())
            S = min(sink_tokens, T)
            if S > 0:
                st.sink_k = st.sink_k.index_copy(2, torch.arange(S, device=k.device), k[:, :, :S])
                st.sink_v = st.sink_v.index_copy(2, torch.arange(S, device=k.device), v[:, :, :S])
            if st.shared_norm:
                log_f = F.logsigmoid(f_gate.to(torch.float64))
                cum = log_f.cumsum(-1)
                # decay each recent key has accumulated since it arrived: F_{T-1} - F_j
                since = (cum[..., -1:] - cum[..., recent]).to(compute_dtype)
                st.win_logw = st.win_logw.index_copy(2, slots, i_gate[..., recent].to(compute_dtype) + since)
        return st


def hybrid_attention_step(q, k, v, i_gate, f_gate, g_gate, state: HybridState, *, scale=None,
                          norm_weight=None, norm_eps=1e-6, eps=1e-6):
    """One decoding step.

    q [B, H, 1, Dqk], k [B, Hkv, 1, Dqk], v [B, Hkv, 1, Dv], gates [B, H, 1] (pre-activations),
    ``state`` from ``HybridState.empty`` / ``from_prefill`` / a previous step.
    Returns (out [B, H, 1, Dv] in q's dtype, new state).
    """
    check_inputs(q, k, v, i_gate, f_gate, g_gate, state.window, state.sink_tokens, state.mode, state.combine)
    if q.shape[2] != 1:
        raise ValueError(f"hybrid_attention_step takes one token; got T={q.shape[2]} (loop over tokens)")
    B, H, _, Dqk = q.shape
    dt = state.C.dtype if state.has_memory else (torch.float64 if q.dtype == torch.float64 else torch.float32)
    scale = default_scale(scale, Dqk)
    W, S = state.window, state.sink_tokens
    t = state.pos
    q1 = q[:, :, 0].to(dt) * scale
    k1, v1 = k[:, :, 0], v[:, :, 0]
    new = replace(state, pos=t + 1)
    slot = t % W
    onehot = slot[:, None] == torch.arange(W, device=q.device)  # [B, W]

    if state.has_memory:
        i1 = i_gate[:, :, 0].to(dt)
        log_f = F.logsigmoid(f_gate[:, :, 0].to(dt))
        if state.shared_norm:
            logw = state.win_logw + log_f.unsqueeze(-1)
            evicted_pos = state.win_pos.gather(1, slot[:, None]).squeeze(1)
            gate_in = logw.gather(2, slot[:, None, None].expand(B, H, 1)).squeeze(-1)
            gate_in = torch.where((evicted_pos >= S)[:, None], gate_in, torch.full_like(gate_in, LOG_ZERO))
            idx = slot[:, None, None, None]
            k_in = expand_kv(state.win_k.gather(2, idx.expand(-1, k.shape[1], 1, Dqk)).squeeze(2), H).to(dt)
            v_in = expand_kv(state.win_v.gather(2, idx.expand(-1, v.shape[1], 1, v.shape[-1])).squeeze(2), H).to(dt)
        else:
            gate_in, k_in, v_in = i1, expand_kv(k1, H).to(dt), expand_kv(v1, H).to(dt)
        m_carry = log_f + state.m
        m_new = torch.maximum(m_carry, gate_in)
        decay, w_in = torch.exp(m_carry - m_new), torch.exp(gate_in - m_new)
        new.C = decay[..., None, None] * state.C + w_in[..., None, None] * (k_in.unsqueeze(-1) * v_in.unsqueeze(-2))
        new.n = decay.unsqueeze(-1) * state.n + w_in.unsqueeze(-1) * k_in
        new.m = m_new
        num_m = (q1.unsqueeze(-2) @ new.C).squeeze(-2)
        den_m = (q1 * new.n).sum(-1)

    if state.has_attention:
        new.win_k = torch.where(onehot[:, None, :, None], k1.unsqueeze(2), state.win_k)
        new.win_v = torch.where(onehot[:, None, :, None], v1.unsqueeze(2), state.win_v)
        new.win_pos = torch.where(onehot, t[:, None], state.win_pos)
        if state.shared_norm:
            new.win_logw = torch.where(onehot[:, None, :], i1.unsqueeze(-1), logw)
        sink_idx = torch.arange(S, device=q.device)
        if S > 0:
            sink_hot = (sink_idx[None, :] == t[:, None])[:, None, :, None]
            new.sink_k = torch.where(sink_hot, k1.unsqueeze(2), state.sink_k)
            new.sink_v = torch.where(sink_hot, v1.unsqueeze(2), state.sink_v)
        keys = expand_kv(torch.cat([new.sink_k, new.win_k], 2), H).to(dt)
        vals = expand_kv(torch.cat([new.sink_v, new.win_v], 2), H).to(dt)
        win_ok = (new.win_pos >= S) & (new.win_pos > (t - W)[:, None])
        ok = torch.cat([sink_idx[None, :] <= t[:, None], win_ok], 1)  # [B, S + W]
        scores = (q1.unsqueeze(-2) @ keys.transpose(-1, -2)).squeeze(-2)
        scores = scores.masked_fill(~ok[:, None, :], float("-inf"))
        a_max = scores.amax(-1)
        w = torch.exp(scores - a_max.unsqueeze(-1))
        num_a, den_a = (w.unsqueeze(-2) @ vals).squeeze(-2), w.sum(-1)

    if state.mode == "mlstm":
        out = mlstm_normalise(num_m, den_m, new.m, eps)
    elif state.mode == "swa":
        out = num_a / den_a.unsqueeze(-1)
    elif state.shared_norm:
        g = torch.sigmoid(g_gate[:, :, 0].to(dt))
        mu = torch.maximum(a_max, new.m)
        a_scale, o_scale = torch.exp(a_max - mu), g * torch.exp(new.m - mu)
        out = (a_scale.unsqueeze(-1) * num_a + o_scale.unsqueeze(-1) * num_m) / (
            a_scale * den_a + o_scale * den_m.abs()
        ).unsqueeze(-1)
    else:
        h_mem = mlstm_normalise(num_m, den_m, new.m, eps)
        normed = head_rms_norm(h_mem.unsqueeze(2), norm_weight, norm_eps).squeeze(2)
        out = mix_gate(normed, num_a / den_a.unsqueeze(-1), g_gate[:, :, 0].to(dt))
    return out.unsqueeze(2).to(q.dtype), new
