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
from torch.utils.checkpoint import checkpoint

from kernels import hybrid_attention, hybrid_attention_step, resolve_backend
from kernels._common import head_rms_norm

from .adapters import AttentionShape, FamilyAdapter, project_qkv
from .config import HybridConfig
from .rebuilt import rebuilt_in_backward
from .state import KVCacheState


# Parts of a student attention module that are the teacher's own (copied), not conversion's.
TEACHER_PARTS = ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")


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
        return (*self.rope(q, k, position_embeddings), v)

    def rope(self, q, k, position_embeddings):
        cos, sin = position_embeddings
        return self._rope(q, k, cos, sin)

    def output(self, heads):
        """heads [B, H, T, D] -> [B, T, hidden]."""
        B, H, T, D = heads.shape
        return self.o_proj(heads.transpose(1, 2).reshape(B, T, H * D))


class FeatureMaps(nn.Module):
    """The memory branch's learnable feature maps (Hedgehog-style, the paper's Sec. 3.1): per head,
    phi(x) = softmax(W_h x + b_h) over the feature dimension (d -> d), separate maps for the
    ``num_q`` query heads and the ``num_k`` key heads, both kinds in one [num_q + num_k, d, d]
    weight (query maps first, as saved students hold them)."""

    def __init__(self, num_q: int, num_k: int, dim: int, init_scale: float, device=None, dtype=None):
        super().__init__()
        self.num_q = num_q
        self.weight = nn.Parameter(torch.empty(num_q + num_k, dim, dim, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(num_q + num_k, dim, device=device, dtype=dtype))
        self.reset_parameters(init_scale)

    def reset_parameters(self, init_scale: float) -> None:
        with torch.no_grad():
            self.weight.copy_(init_scale * torch.eye(self.weight.shape[-1]).expand_as(self.weight))
            self.bias.zero_()

    def forward(self, q, k):
        """q [B, Hq, T, d], k [B, Hk, T, d] -> (phi_q(q), phi_k(k)), same shapes and dtype."""
        weight, bias, n = self.weight.to(q.dtype), self.bias.to(q.dtype), self.num_q
        return self._map(q, weight[:n], bias[:n]), self._map(k, weight[n:], bias[n:])

    @staticmethod
    def _map(x, weight, bias):
        # Each kind on its own, x as it lies: concatenating q and k and letting einsum move the heads
        # to the front copied every input and output once more. matmul broadcasts the [h, d, d]
        # weights over the batch; the bias goes into its output in place (the product's backward
        # does not read its output).
        z = torch.matmul(x, weight).add_(bias[:, None])
        # softmax in float32 for 16-bit inputs: its sum must be 1 to the precision the memory needs
        return torch.softmax(z, -1) if z.dtype == torch.float32 else torch.softmax(z, -1, dtype=torch.float32).to(z.dtype)


class HybridAttention(_TeacherProjections):
    """mLSTM memory + sliding-window/sink softmax attention on the teacher's q/k/v/o (DESIGN §3).

    New parameters (conversion's, the ones stage 1 trains): ``hybrid_gates`` (input and forget
    gate pre-activations from the layer input, and the mix gate with ``gate_input: hidden``),
    ``feature_maps`` (``feature_map: softmax``), ``mix_gate_weight``/``mix_gate_bias``
    (``gate_input: qkv``) and ``mlstm_norm_weight`` (``memory_norm: rms``)."""

    def __init__(self, teacher_attn, adapter, shape, cfg: HybridConfig, layer_idx: int):
        super().__init__(teacher_attn, adapter, shape, layer_idx)
        self.cfg = cfg
        H, Hkv, D = shape.num_heads, shape.num_kv_heads, shape.head_dim
        ref = self.q_proj.weight
        factory = dict(device=ref.device, dtype=ref.dtype)
        self.gate_from_qkv = cfg.gate_input == "qkv"
        # One projection of x for the per-head gates [i | f] (and g with gate_input "hidden"). Zero
        # weights: every head starts at its bias, and the gradient w.r.t. the weights is not zero.
        self.hybrid_gates = nn.Linear(shape.hidden_size, (2 if self.gate_from_qkv else 3) * H, bias=True, **factory)
        if self.gate_from_qkv and cfg.mode == "hybrid":
            # o_h = sigmoid(w_h . [q_h; k_h; v_h] + b_h), one scalar per head (the paper's Eq. 11)
            self.mix_gate_weight = nn.Parameter(torch.zeros(H, 3 * D, **factory))  # q, k, v share the head dim
            self.mix_gate_bias = nn.Parameter(torch.zeros(H, **factory))
        if cfg.feature_map == "softmax" and cfg.mode != "swa":
            self.feature_maps = FeatureMaps(H, Hkv, D, cfg.feature_map_init_scale, **factory)
        if cfg.memory_norm == "rms":
            self.mlstm_norm_weight = nn.Parameter(torch.ones(H, D, **factory))
        self.mean_mix_gate: torch.Tensor | None = None  # mean o of the last training forward, for logs
        # Training: keep only the op's inputs (q, k, v, the layer input for the gates) for the backward
        # and recompute gates, RoPE, feature maps and the chunkwise op there. Their intermediates
        # (per-chunk scores, states, window scores) are most of a step's activations; the Triton
        # kernels recompute inside their own backward, so they are left alone.
        self.recompute_in_backward = False
        self._folded: tuple | None = None  # (key, weight, bias) of folded_gate_projection's cache
        self.reset_gate_parameters()

    def new_named_parameters(self):
        """(name, parameter) pairs that conversion added: everything but the teacher's own parts."""
        for name, p in self.named_parameters():
            if name.split(".")[0] not in TEACHER_PARTS:
                yield name, p

    def reset_gate_parameters(self):
        H, cfg = self.shape.num_heads, self.cfg
        with torch.no_grad():
            self.hybrid_gates.weight.zero_()
            lo, hi = cfg.forget_gate_bias_init
            self.hybrid_gates.bias[:H].fill_(cfg.input_gate_bias_init)
            self.hybrid_gates.bias[H:2 * H].copy_(torch.linspace(lo, hi, H))
            if self.gate_from_qkv:
                if hasattr(self, "mix_gate_weight"):
                    self.mix_gate_weight.zero_()
                    self.mix_gate_bias.fill_(cfg.mix_gate_bias_init)
            else:
                self.hybrid_gates.bias[2 * H:].fill_(cfg.mix_gate_bias_init)
            if hasattr(self, "mlstm_norm_weight"):
                self.mlstm_norm_weight.fill_(1.0)
            if hasattr(self, "feature_maps"):
                self.feature_maps.reset_parameters(cfg.feature_map_init_scale)

    def gate_folding(self):
        """``folded_gate_projection()`` where the gates may use it (inference with the qkv gate), else
        None. Kept out of ``gates`` because its cache check reads tensor addresses, which a compiled
        decoding step cannot trace: the step receives the folded projection as an input instead."""
        if self.gate_from_qkv and not (self.training or torch.is_grad_enabled()):
            return self.folded_gate_projection()
        return None

    def gates(self, hidden_states, q=None, k=None, v=None, folded=None):
        """Gate pre-activations [B, H, T] in float32: i and f (soft-capped) from the layer input;
        g from it too (``gate_input: hidden``) or from the heads' q, k, v before RoPE (``qkv``;
        None in modes without the mix). ``folded``: ``gate_folding()``'s [i | f | o] projection."""
        if folded is not None:
            pre = F.linear(hidden_states, *folded).float().transpose(1, 2)
        else:
            pre = self.hybrid_gates(hidden_states).float().transpose(1, 2)
        H, cap = self.shape.num_heads, self.cfg.gate_soft_cap
        i_f = torch.tanh(pre[:, :2 * H] / cap) * cap if cap > 0 else pre[:, :2 * H]  # one op for both
        if not self.gate_from_qkv or folded is not None:
            return i_f[:, :H], i_f[:, H:], pre[:, 2 * H:]
        return i_f[:, :H], i_f[:, H:], (self.mix_gate_from_qkv(q, k, v) if hasattr(self, "mix_gate_weight") else None)

    def folded_gate_projection(self):
        """[i | f | o] pre-activations as one projection of x (weight [3H, hidden], bias [3H]), or None
        where o cannot fold: o = sigmoid(w_h . [q_h; k_h; v_h] + b_h) is linear in x when q, k (before
        RoPE) and v are, i.e. without q/k norms (Llama, Mistral, Qwen2), as the paper notes. Used at
        inference (no gradient), where it makes the qkv gate cost what a gate on x costs: one
        product per layer and token instead of three. Cached until a parameter it reads changes."""
        if self.adapter.qk_norm != "none" or not hasattr(self, "mix_gate_weight"):
            return None
        # Read through the modules' parameter dicts: decoding checks this cache once per layer and
        # token, and nn.Module attribute lookups made that check cost more than the gate itself.
        params = [self._parameters["mix_gate_weight"], self._parameters["mix_gate_bias"]]
        for name in ("hybrid_gates", "q_proj", "k_proj", "v_proj"):
            module = self._modules[name]
            if not isinstance(module, nn.Linear):  # wrapped (LoRA adapters): its output is not x @ weight.T
                return None
            owned = module._parameters
            params += [owned["weight"]] if owned.get("bias") is None else [owned["weight"], owned["bias"]]
        if any(type(t).__name__ == "DTensor" for t in params):  # sharded (FSDP2): no whole weight to fold
            return None
        key = tuple([(t.data_ptr(), t._version, t.dtype, t.device) for t in params])
        if self._folded is None or self._folded[0] != key:
            H, Hkv, D = self.shape.num_heads, self.shape.num_kv_heads, self.shape.head_dim
            w_q, w_k, w_v = self.mix_gate_weight.double().split([D, D, D], -1)  # [H, D] each
            weight = torch.zeros(H, self.shape.hidden_size, dtype=torch.float64, device=w_q.device)
            bias = self.mix_gate_bias.double().clone()
            for proj, w, heads in ((self.q_proj, w_q, H), (self.k_proj, w_k, Hkv), (self.v_proj, w_v, Hkv)):
                per_head = proj.weight.double().view(heads, D, -1).repeat_interleave(H // heads, 0)  # [H, D, x]
                weight += torch.einsum("hd,hdx->hx", w, per_head)
                if proj.bias is not None:
                    bias += (w * proj.bias.double().view(heads, D).repeat_interleave(H // heads, 0)).sum(-1)
            dtype = self.hybrid_gates.weight.dtype
            self._folded = (key, torch.cat([self.hybrid_gates.weight.double(), weight]).to(dtype),
                            torch.cat([self.hybrid_gates.bias.double(), bias]).to(dtype))
        return self._folded[1], self._folded[2]

    def mix_gate_from_qkv(self, q, k, v):
        """o's pre-activation per head from [q_h; k_h; v_h]: q [B, H, T, D], k, v [B, Hkv, T, D]
        (GQA: query head h reads key/value head h // (H / Hkv), without copying k, v)."""
        B, H, T, D = q.shape
        Hkv = k.shape[1]
        w_q, w_k, w_v = self.mix_gate_weight.to(q.dtype).split([D, D, v.shape[-1]], -1)
        g = torch.einsum("bhtd,hd->bht", q, w_q)
        kv = torch.einsum("bgtd,gjd->bgjt", k, w_k.view(Hkv, H // Hkv, D))
        kv = kv + torch.einsum("bgtd,gjd->bgjt", v, w_v.view(Hkv, H // Hkv, -1))
        return (g + kv.reshape(B, H, T)).float() + self.mix_gate_bias.float()[:, None]

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, decode_state=None,
                layer_step=None, **kwargs):
        if layer_step is not None:  # the decoder layer's step (models.compiled_step): state in, state out
            out, layer_step.state = self.decode_step(hidden_states, position_embeddings, layer_step.state,
                                                     layer_step.folded)
            return out, None
        state = None if decode_state is None else decode_state.layers[self.layer_idx]
        if state is not None and hidden_states.shape[1] == 1:  # the decoding step
            out, decode_state.layers[self.layer_idx] = self.decode_step(hidden_states, position_embeddings, state,
                                                                        self.gate_folding())
            return out, None
        if decode_state is None and self.recompute_in_backward and torch.is_grad_enabled():
            # The lean plan: the products of the layer input (a lean norm's output) keep its recipe,
            # not the input itself; the op (and the output projection, whose input is then not kept
            # either, for one more [T, hidden] x [hidden, hidden] product) is recomputed in the backward.
            with rebuilt_in_backward(hidden_states):
                q, k, v = project_qkv(self.adapter, self, self.shape, hidden_states)
                if self._torch_backend(q, v):
                    gates = self.gates(hidden_states, q, k, v, folded=self.gate_folding())
                    return checkpoint(self._attend_and_output, q, k, v, position_embeddings, gates,
                                      use_reentrant=False), None
        else:
            q, k, v = project_qkv(self.adapter, self, self.shape, hidden_states)
        out = self._attend(hidden_states, q, k, v, position_embeddings, decode_state)
        return self._output(out, q.dtype), None

    def _attend_and_output(self, q, k, v, position_embeddings, gates):
        return self._output(self._attend(None, q, k, v, position_embeddings, gates=gates), q.dtype)

    def decode_step(self, hidden_states, position_embeddings, state, folded=None):
        """One token [B, 1, hidden] from the layer's ``HybridState``: (output [B, 1, hidden], new state).
        ``folded``: ``gate_folding()``. Free of Python-side caches and of data-dependent branches, so
        that ``torch.compile`` traces the whole layer step, projections to output, as one graph."""
        q, k, v = project_qkv(self.adapter, self, self.shape, hidden_states)
        i, f, g = self.gates(hidden_states, q, k, v, folded=folded)
        q, k = self.rope(q, k, position_embeddings)
        mq, mk = self.feature_maps(q, k) if hasattr(self, "feature_maps") else (None, None)
        out, state = hybrid_attention_step(q, k, v, i, f, g, state, **self._op_options(mq, mk))
        return self._output(out, q.dtype), state

    def _output(self, heads, dtype):
        if self.cfg.mode == "mlstm" and self.cfg.memory_norm == "rms":
            # The op returns the raw memory read-out; the layer owns the norm (DESIGN §3).
            heads = head_rms_norm(heads.float(), self.mlstm_norm_weight, self.cfg.norm_eps).to(dtype)
        return self.output(heads)

    def _op_options(self, mq, mk):
        cfg = self.cfg
        return dict(scale=self.shape.scaling, norm_weight=getattr(self, "mlstm_norm_weight", None),
                    norm_eps=cfg.norm_eps, mq=mq, mk=mk, memory_norm=cfg.memory_norm)

    def _torch_backend(self, q, v) -> bool:
        cfg = self.cfg
        return resolve_backend(cfg.backend, q.device, q.dtype, q.shape[-1], v.shape[-1], cfg.chunk_size) != "triton"

    def _attend(self, hidden_states, q, k, v, position_embeddings, decode_state=None, gates=None):
        """Gates, RoPE, feature maps and the hybrid op over T tokens: q, k, v (before RoPE) -> heads
        [B, H, T, Dv]; with ``decode_state`` a prefill (empty state) or a continuation token by token.
        ``gates``: (i, f, g) already computed from ``hidden_states`` (which may then be None)."""
        cfg = self.cfg
        i, f, g = gates if gates is not None else self.gates(hidden_states, q, k, v, folded=self.gate_folding())
        q, k = self.rope(q, k, position_embeddings)
        mq = mk = None
        if hasattr(self, "feature_maps"):
            mq, mk = self.feature_maps(q, k)
        if self.training and cfg.mode == "hybrid":  # the mix gate exists only where both branches do
            self.mean_mix_gate = torch.sigmoid(g.detach()).mean()
        opts = self._op_options(mq, mk)
        if decode_state is None:
            return hybrid_attention(q, k, v, i, f, g, window=cfg.window, sink_tokens=cfg.sink_tokens, mode=cfg.mode,
                                    combine=cfg.combine, backend=cfg.backend, chunk_size=cfg.chunk_size, **opts)
        state = decode_state.layers[self.layer_idx]
        if state is None:
            out, state = hybrid_attention(
                q, k, v, i, f, g, window=cfg.window, sink_tokens=cfg.sink_tokens, mode=cfg.mode,
                combine=cfg.combine, backend=cfg.backend, chunk_size=cfg.chunk_size, return_state=True, **opts,
            )
        else:
            steps = []
            for t in range(q.shape[2]):
                sl = slice(t, t + 1)
                step_opts = {**opts, "mq": None if mq is None else mq[:, :, sl],
                             "mk": None if mk is None else mk[:, :, sl]}
                o_t, state = hybrid_attention_step(q[:, :, sl], k[:, :, sl], v[:, :, sl], i[:, :, sl],
                                                   f[:, :, sl], None if g is None else g[:, :, sl], state,
                                                   **step_opts)
                steps.append(o_t)
            out = torch.cat(steps, 2)
        decode_state.layers[self.layer_idx] = state
        return out


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
