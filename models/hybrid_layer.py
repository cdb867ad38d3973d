"""The student's attention modules: the hybrid layer, and full attention for kept layers.

Both reuse the teacher's q/k/v/o projections, q/k norms and RoPE (through the family adapter)
and are drop-in replacements for a Hugging Face ``self_attn``: they take the decoder layer's
``hidden_states`` and ``position_embeddings`` and return ``(output, None)``. A ``decode_state``
keyword (``models.state.DecodeState``) switches them to prefill-with-state / recurrent steps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels import hybrid_attention, hybrid_attention_step
from kernels._common import head_rms_norm

from .adapters import AttentionShape, FamilyAdapter, project_qkv
from .config import HybridConfig
from .state import KVCacheState


class _TeacherProjections(nn.Module):
    """q/k/v/o (and q/k norms) taken over from one teacher attention module."""

    def __init__(self, teacher_attn: nn.Module, adapter: FamilyAdapter, shape: AttentionShape, layer_idx: int):
        super().__init__()
        self.adapter, self.shape, self.layer_idx = adapter, shape, layer_idx
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (
            teacher_attn.q_proj, teacher_attn.k_proj, teacher_attn.v_proj, teacher_attn.o_proj,
        )
        if adapter.qk_norm != "none":
            self.q_norm, self.k_norm = teacher_attn.q_norm, teacher_attn.k_norm
        self._rope = adapter.rope()

    def qkv(self, hidden_states, position_embeddings):
        q, k, v = project_qkv(self.adapter, self, self.shape, hidden_states)
        cos, sin = position_embeddings
        q, k = self._rope(q, k, cos, sin)
        return q, k, v

    def output(self, heads):
        """heads [B, H, T, D] -> [B, T, hidden]."""
        B, H, T, D = heads.shape
        return self.o_proj(heads.transpose(1, 2).reshape(B, T, H * D))


class HybridAttention(_TeacherProjections):
    """mLSTM memory + sliding-window/sink softmax attention on the teacher's q/k/v/o (DESIGN §3)."""

    def __init__(self, teacher_attn, adapter, shape, cfg: HybridConfig, layer_idx: int):
        super().__init__(teacher_attn, adapter, shape, layer_idx)
        self.cfg = cfg
        H = shape.num_heads
        ref = self.q_proj.weight
        # One projection for the three per-head gates [i | f | g]. Zero weights: every head starts
        # at its bias, and the gradient w.r.t. the weights is not zero, so they learn.
        self.hybrid_gates = nn.Linear(shape.hidden_size, 3 * H, bias=True, device=ref.device, dtype=ref.dtype)
        self.mlstm_norm_weight = nn.Parameter(torch.ones(H, shape.head_dim, device=ref.device, dtype=ref.dtype))
        self.reset_gate_parameters()

    def reset_gate_parameters(self):
        H, cfg = self.shape.num_heads, self.cfg
        with torch.no_grad():
            self.hybrid_gates.weight.zero_()
            lo, hi = cfg.forget_gate_bias_init
            self.hybrid_gates.bias[:H].fill_(cfg.input_gate_bias_init)
            self.hybrid_gates.bias[H:2 * H].copy_(torch.linspace(lo, hi, H))
            self.hybrid_gates.bias[2 * H:].fill_(cfg.mix_gate_bias_init)
            self.mlstm_norm_weight.fill_(1.0)

    def gates(self, hidden_states):
        """[B, T, hidden] -> i, f, g pre-activations [B, H, T] in float32 (i and f soft-capped)."""
        pre = self.hybrid_gates(hidden_states).float().transpose(1, 2)
        H, cap = self.shape.num_heads, self.cfg.gate_soft_cap
        if cap > 0:  # i and f capped together: decoding pays per op, not per number
            i_f = torch.tanh(pre[:, :2 * H] / cap) * cap
            return i_f[:, :H], i_f[:, H:], pre[:, 2 * H:]
        return pre.chunk(3, dim=1)

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, decode_state=None, **kwargs):
        cfg = self.cfg
        q, k, v = self.qkv(hidden_states, position_embeddings)
        i, f, g = self.gates(hidden_states)
        opts = dict(scale=self.shape.scaling, norm_weight=self.mlstm_norm_weight, norm_eps=cfg.norm_eps)
        if decode_state is None:
            out = hybrid_attention(q, k, v, i, f, g, window=cfg.window, sink_tokens=cfg.sink_tokens, mode=cfg.mode,
                                   combine=cfg.combine, backend=cfg.backend, chunk_size=cfg.chunk_size, **opts)
        else:
            state = decode_state.layers[self.layer_idx]
            if state is None:
                out, state = hybrid_attention(
                    q, k, v, i, f, g, window=cfg.window, sink_tokens=cfg.sink_tokens, mode=cfg.mode,
                    combine=cfg.combine, backend=cfg.backend, chunk_size=cfg.chunk_size, return_state=True, **opts,
                )
            elif q.shape[2] == 1:  # the decoding step: no slicing, no concatenation
                out, state = hybrid_attention_step(q, k, v, i, f, g, state, **opts)
            else:
                steps = []
                for t in range(q.shape[2]):
                    sl = slice(t, t + 1)
                    o_t, state = hybrid_attention_step(q[:, :, sl], k[:, :, sl], v[:, :, sl], i[:, :, sl],
                                                       f[:, :, sl], g[:, :, sl], state, **opts)
                    steps.append(o_t)
                out = torch.cat(steps, 2)
            decode_state.layers[self.layer_idx] = state
        if cfg.mode == "mlstm":
            # The op returns the raw memory read-out; the layer owns the norm (DESIGN §3).
            out = head_rms_norm(out.float(), self.mlstm_norm_weight, cfg.norm_eps).to(q.dtype)
        return self.output(out), None


class FullAttention(_TeacherProjections):
    """A decoder layer kept as the teacher's causal softmax attention (``full_attention_layers``)."""

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, decode_state=None, **kwargs):
        q, k, v = self.qkv(hidden_states, position_embeddings)
        scale = self.shape.scaling
        if decode_state is None or decode_state.layers[self.layer_idx] is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
            if decode_state is not None:
                B, T = q.shape[0], q.shape[2]
                decode_state.layers[self.layer_idx] = KVCacheState(
                    k=k, v=v, valid=torch.ones(B, T, dtype=torch.bool, device=q.device),
                    pos=torch.full((B,), T, dtype=torch.long, device=q.device),
                )
            return self.output(out), None
        state = decode_state.layers[self.layer_idx]
        steps = []
        for t in range(q.shape[2]):
            B = q.shape[0]
            keys, values = torch.cat([state.k, k[:, :, t:t + 1]], 2), torch.cat([state.v, v[:, :, t:t + 1]], 2)
            valid = torch.cat([state.valid, torch.ones(B, 1, dtype=torch.bool, device=q.device)], 1)
            state = KVCacheState(k=keys, v=values, valid=valid, pos=state.pos + 1)
            steps.append(F.scaled_dot_product_attention(
                q[:, :, t:t + 1], keys, values, attn_mask=valid[:, None, None, :], scale=scale, enable_gqa=True,
            ))
        decode_state.layers[self.layer_idx] = state
        return self.output(torch.cat(steps, 2)), None
