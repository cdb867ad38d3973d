"""Recurrent (one token at a time) form of the hybrid attention op: generation.

The decode state has a constant size whatever the prompt length: per query head the mLSTM
memory (C [D, Dv], n [D], m), per key/value head the ``sink_tokens`` first keys/values and a ring
buffer of the last ``window`` ones. With ``combine="shared_norm"`` the memory holds only keys
older than the window: a key enters it when the ring buffer evicts it, with the decay it
accumulated while in the window (``attn_logw``). Rows of a batch may sit at different positions
(``pos``), which is how prompts of different lengths decode together without padding.
Every update is functional (no in-place writes), so gradients flow through decoding too.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F

from ._common import (
    LOG_ZERO, check_inputs, compute_dtype, default_scale, gate_combine, memory_inputs, mlstm_normalise,
    shared_norm_combine,
)


@dataclass
class HybridState:
    """Decode state of one hybrid attention layer for a batch (all tensors batch-first).

    The attention buffer has ``sink_tokens + window`` slots: slot p holds sink position p < S, and
    slot S + p % W holds the recent position p >= S, so one masked softmax covers sinks and window.
    """

    pos: torch.Tensor  # [B] long: number of tokens consumed so far (the next token's position)
    window: int
    sink_tokens: int
    mode: str
    combine: str
    C: torch.Tensor | None = None  # [B, H, Dqk, Dv] mLSTM memory, stabilised by m
    n: torch.Tensor | None = None  # [B, H, Dqk] normaliser
    m: torch.Tensor | None = None  # [B, H] log-space stabiliser
    attn_k: torch.Tensor | None = None  # [B, Hkv, S + W, Dqk] sink slots, then the ring buffer
    attn_v: torch.Tensor | None = None  # [B, Hkv, S + W, Dv]
    attn_pos: torch.Tensor | None = None  # [B, S + W] long, position held by each slot (-1: empty)
    attn_logw: torch.Tensor | None = None  # [B, H, S + W] shared_norm: i_j + F_t - F_j per ring slot
    # shared_norm with memory keys of their own (feature maps): the memory key of each slot, which
    # enters the memory when the ring evicts it; None when the memory reads the attention keys.
    attn_mk: torch.Tensor | None = None  # [B, Hkv, S + W, Dqk]

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

    def slot_of(self, positions: torch.Tensor) -> torch.Tensor:
        """Buffer slot of each position: sinks first, then the ring."""
        S, W = self.sink_tokens, self.window
        return torch.where(positions < S, positions, S + positions % W)

    @classmethod
    def empty(cls, batch, num_heads, num_kv_heads, qk_dim, v_dim, *, window, sink_tokens, mode, combine,
              dtype, device, compute_dtype=torch.float32, memory_keys=False):
        """A state before the first token. ``memory_keys``: the memory branch has keys of its own
        (``mk``), kept per ring slot under ``shared_norm``."""
        st = cls(pos=torch.zeros(batch, dtype=torch.long, device=device), window=window,
                 sink_tokens=sink_tokens, mode=mode, combine=combine)
        slots = sink_tokens + window
        if st.has_memory:
            st.C = torch.zeros(batch, num_heads, qk_dim, v_dim, dtype=compute_dtype, device=device)
            st.n = torch.zeros(batch, num_heads, qk_dim, dtype=compute_dtype, device=device)
            st.m = torch.full((batch, num_heads), LOG_ZERO, dtype=compute_dtype, device=device)
        if st.has_attention:
            st.attn_k = torch.zeros(batch, num_kv_heads, slots, qk_dim, dtype=dtype, device=device)
            st.attn_v = torch.zeros(batch, num_kv_heads, slots, v_dim, dtype=dtype, device=device)
            st.attn_pos = torch.full((batch, slots), -1, dtype=torch.long, device=device)
            if st.shared_norm:
                st.attn_logw = torch.full((batch, num_heads, slots), LOG_ZERO, dtype=compute_dtype, device=device)
                if memory_keys:
                    st.attn_mk = torch.zeros(batch, num_kv_heads, slots, qk_dim, dtype=dtype, device=device)
        return st

    @classmethod
    def from_prefill(cls, k, v, i_gate, f_gate, memory, *, num_heads, window, sink_tokens, mode, combine,
                     compute_dtype, mk=None):
        """State after a chunkwise pass over k, v [B, Hkv, T, D]; ``memory`` = (C, n, m) or None;
        ``mk`` the memory branch's own keys (None or ``k``: the same keys)."""
        B, Hkv, T, D = k.shape
        memory_keys = mk is not None and mk is not k
        st = cls.empty(B, num_heads, Hkv, D, v.shape[-1], window=window, sink_tokens=sink_tokens, mode=mode,
                       combine=combine, dtype=k.dtype, device=k.device, compute_dtype=compute_dtype,
                       memory_keys=memory_keys)
        st.pos = torch.full((B,), T, dtype=torch.long, device=k.device)
        if st.has_memory:
            # contiguous, as every step's state is: one layout, so that a compiled step sees the same
            # strides after the prefill as after itself (a new layout would compile the step again)
            st.C, st.n, st.m = (x.to(compute_dtype).contiguous() for x in memory)
        if st.has_attention:
            # sinks, then the last `window` non-sink positions
            recent_start = max(sink_tokens, T - window)
            kept = torch.cat([torch.arange(min(sink_tokens, T)), torch.arange(recent_start, max(recent_start, T))])
            kept = kept.to(k.device)
            slots = st.slot_of(kept)
            st.attn_k = st.attn_k.index_copy(2, slots, k[:, :, kept])
            st.attn_v = st.attn_v.index_copy(2, slots, v[:, :, kept])
            st.attn_pos = st.attn_pos.index_copy(1, slots, kept.expand(B, -1).contiguous())
            if st.shared_norm:
                log_f = F.logsigmoid(f_gate.to(torch.float64))
                cum = log_f.cumsum(-1)
                # decay each kept key has accumulated since it arrived: F_{T-1} - F_j
                since = (cum[..., -1:] - cum[..., kept]).to(compute_dtype)
                st.attn_logw = st.attn_logw.index_copy(2, slots, i_gate[..., kept].to(compute_dtype) + since)
                if memory_keys:
                    st.attn_mk = st.attn_mk.index_copy(2, slots, mk[:, :, kept].to(st.attn_mk.dtype))
        return st


def hybrid_attention_step(q, k, v, i_gate, f_gate, g_gate, state: HybridState, *, scale=None,
                          norm_weight=None, norm_eps=1e-6, eps=1e-6, mq=None, mk=None, memory_norm="rms"):
    """One decoding step.

    q [B, H, 1, Dqk], k [B, Hkv, 1, Dqk], v [B, Hkv, 1, Dv], gates [B, H, 1] (pre-activations),
    ``state`` from ``HybridState.empty`` / ``from_prefill`` / a previous step; ``mq``, ``mk``
    and ``memory_norm`` as in ``kernels.reference.hybrid_attention``.
    Returns (out [B, H, 1, Dv] in q's dtype, new state).

    Decoding runs this once per layer and token, where each tensor op costs microseconds of
    dispatch on a handful of numbers: the step is written in as few ops as the maths allows
    (fused addcmul and lerp, GQA by views, SDPA for the window), because that count, not
    the FLOPs, is the student's cost per token beyond the matrix products it shares with its teacher.
    """
    check_inputs(q, k, v, i_gate, f_gate, g_gate, state.window, state.sink_tokens, state.mode, state.combine, mq, mk,
                 memory_norm)
    if state.shared_norm and (mk is not None and mk is not k) != (state.attn_mk is not None):
        raise ValueError("shared_norm: give mk at every step when the state was built with memory keys of their "
                         "own (and never otherwise)")
    if q.shape[2] != 1:
        raise ValueError(f"hybrid_attention_step takes one token; got T={q.shape[2]} (loop over tokens)")
    B, H, _, Dqk = q.shape
    Hkv, Dv = k.shape[1], v.shape[-1]
    G = H // Hkv
    dt = state.C.dtype if state.has_memory else compute_dtype(q)
    scale = default_scale(scale, Dqk)
    t = state.pos
    new = replace(state, pos=t + 1)
    if state.has_attention:
        slot = state.slot_of(t)
        slot_k = slot.view(B, 1, 1, 1).expand(B, Hkv, 1, Dqk)
        slot_v = slot_k if Dv == Dqk else slot.view(B, 1, 1, 1).expand(B, Hkv, 1, Dv)

    if state.has_memory:
        # Query heads grouped by the key/value head they read: [B, Hkv, G, D], no key/value copies.
        mq, mk = memory_inputs(q, k, mq, mk)
        q_g = mq.view(B, Hkv, G, Dqk).to(dt) * scale
        i1 = i_gate.view(B, H).to(dt)
        log_f = F.logsigmoid(f_gate.view(B, H).to(dt))
        if state.shared_norm:
            # the key leaving the window (if any) enters the memory of older keys
            logw = state.attn_logw + log_f.unsqueeze(-1)
            evicted = state.attn_pos.gather(1, slot[:, None]) >= 0  # [B, 1]
            gate_in = logw.gather(2, slot.view(B, 1, 1).expand(B, H, 1)).view(B, H)
            gate_in = gate_in.masked_fill(~evicted, LOG_ZERO)
            ring_mk = state.attn_k if state.attn_mk is None else state.attn_mk
            k_in, v_in = ring_mk.gather(2, slot_k), state.attn_v.gather(2, slot_v)
        else:
            gate_in, k_in, v_in = i1, mk, v
        m_carry = log_f + state.m
        m_new = torch.maximum(m_carry, gate_in)
        decay = torch.exp(m_carry - m_new).view(B, Hkv, G, 1)
        k_w = torch.exp(gate_in - m_new).view(B, Hkv, G, 1) * k_in.to(dt)  # [B, Hkv, G, Dqk]
        C = torch.addcmul(k_w.unsqueeze(-1) * v_in.to(dt).unsqueeze(-2), state.C.view(B, Hkv, G, Dqk, Dv),
                          decay.unsqueeze(-1))
        n = torch.addcmul(k_w, state.n.view(B, Hkv, G, Dqk), decay)
        new.C, new.n, new.m = C.view(B, H, Dqk, Dv), n.view(B, H, Dqk), m_new
        num_m = (q_g.unsqueeze(-2) @ C).view(B, H, Dv)
        den_m = (q_g.unsqueeze(-2) @ n.unsqueeze(-1)).view(B, H)

    if state.has_attention:
        new.attn_k = state.attn_k.scatter(2, slot_k, k)
        new.attn_v = state.attn_v.scatter(2, slot_v, v)
        new.attn_pos = state.attn_pos.scatter(1, slot[:, None], t[:, None])
        # every filled slot is visible: sinks are < S <= t, the ring holds exactly (t - W, t]
        filled = (new.attn_pos >= 0).view(B, 1, 1, -1)
        if state.shared_norm:
            new.attn_logw = logw.scatter(2, slot.view(B, 1, 1).expand(B, H, 1), i1.unsqueeze(-1))
            if state.attn_mk is not None:
                new.attn_mk = state.attn_mk.scatter(2, slot_k, mk)
            q_a = q_g if mq is q else q.view(B, Hkv, G, Dqk).to(dt) * scale
            scores = (q_a @ new.attn_k.to(dt).transpose(-1, -2)).masked_fill(~filled, float("-inf"))
            # softmax sums in units of their log-sum-exp: the denominator is 1
            a_lse = torch.logsumexp(scores, -1, keepdim=True)
            num_a = (torch.exp(scores - a_lse) @ new.attn_v.to(dt)).view(B, H, Dv)
        else:
            if torch.compiler.is_compiling():
                # written out, it fuses with the rest of a compiled step (ATen's SDPA on a CPU costs
                # more for one query over S + W slots than the whole fused memory update)
                q_a = q.view(B, Hkv, G, Dqk).to(dt) * scale
                scores = (q_a @ new.attn_k.to(dt).transpose(-1, -2)).masked_fill(~filled, float("-inf"))
                h_attn = (torch.softmax(scores, -1) @ new.attn_v.to(dt)).view(B, H, Dv)
            else:  # eager: one op instead of five
                h_attn = F.scaled_dot_product_attention(
                    q.to(dt), new.attn_k.to(dt), new.attn_v.to(dt), attn_mask=filled, scale=scale, enable_gqa=True,
                ).view(B, H, Dv)

    if state.mode == "mlstm":
        out = mlstm_normalise(num_m, den_m, m_new, eps)
    elif state.mode == "swa":
        out = h_attn
    elif state.shared_norm:
        out = shared_norm_combine(num_a, a_lse.new_ones(()), a_lse.view(B, H), num_m, den_m, m_new,
                                  g_gate.view(B, H).to(dt))
    else:
        out = gate_combine(mlstm_normalise(num_m, den_m, m_new, eps), h_attn, g_gate.view(B, H).to(dt), memory_norm,
                           norm_weight, norm_eps)
    return out.unsqueeze(2).to(q.dtype), new
