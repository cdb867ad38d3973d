"""Where each supported teacher family keeps q/k/v/o, its q/k norms, RoPE and GQA layout.

Every supported family computes attention as
    q, k, v = proj(x) (+ bias), optional q/k RMS norms, RoPE (rotate-half), softmax(q k^T * scaling) v, o_proj
and differs only in where the q/k norms sit. The adapter records that difference and reads
the shapes from the teacher's config, checking them against the actual projection weights.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class FamilyAdapter:
    model_type: str
    qk_norm: str  # "none" | "per_head" (Qwen3: over head_dim) | "projection" (OLMo2: over the whole projection)
    modeling_module: str  # transformers module that holds the family's apply_rotary_pos_emb

    def rope(self):
        """The family's own RoPE application, so students rotate exactly as their teacher."""
        return importlib.import_module(self.modeling_module).apply_rotary_pos_emb


SUPPORTED_FAMILIES = {
    "llama": FamilyAdapter("llama", "none", "transformers.models.llama.modeling_llama"),
    "mistral": FamilyAdapter("mistral", "none", "transformers.models.mistral.modeling_mistral"),
    "qwen2": FamilyAdapter("qwen2", "none", "transformers.models.qwen2.modeling_qwen2"),
    "qwen3": FamilyAdapter("qwen3", "per_head", "transformers.models.qwen3.modeling_qwen3"),
    "olmo2": FamilyAdapter("olmo2", "projection", "transformers.models.olmo2.modeling_olmo2"),
}


def get_adapter(config) -> FamilyAdapter:
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_FAMILIES:
        raise ValueError(
            f"unsupported teacher architecture model_type={model_type!r}; supported families: "
            f"{', '.join(sorted(SUPPORTED_FAMILIES))}"
        )
    return SUPPORTED_FAMILIES[model_type]


@dataclass(frozen=True)
class AttentionShape:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    scaling: float


def attention_shape(config, attn: nn.Module, layer_idx: int) -> AttentionShape:
    """Head layout of one teacher attention module, checked against its weights."""
    H = config.num_attention_heads
    Hkv = getattr(config, "num_key_value_heads", None) or H
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // H
    if H % Hkv != 0:
        raise ValueError(
            f"num_attention_heads={H} is not a multiple of num_key_value_heads={Hkv} in the teacher config"
        )
    expected = {"q_proj": H * head_dim, "k_proj": Hkv * head_dim, "v_proj": Hkv * head_dim}
    for name, out_features in expected.items():
        proj = getattr(attn, name, None)
        if not isinstance(proj, nn.Linear):
            raise ValueError(f"layer {layer_idx}: teacher attention has no nn.Linear {name}")
        if proj.out_features != out_features:
            raise ValueError(
                f"layer {layer_idx}: mismatched head dims: {name} has {proj.out_features} outputs but the config "
                f"implies {out_features} (heads x head_dim = {out_features // head_dim} x {head_dim})"
            )
    if attn.o_proj.in_features != H * head_dim:
        raise ValueError(
            f"layer {layer_idx}: mismatched head dims: o_proj takes {attn.o_proj.in_features} inputs, "
            f"expected num_attention_heads x head_dim = {H * head_dim}"
        )
    scaling = float(getattr(attn, "scaling", head_dim**-0.5))
    return AttentionShape(H, Hkv, head_dim, config.hidden_size, scaling)


def project_qkv(adapter: FamilyAdapter, attn: nn.Module, shape: AttentionShape, x: torch.Tensor):
    """Teacher projections and q/k norms: x [B, T, hidden] -> q [B,H,T,D], k, v [B,Hkv,T,D] (before RoPE)."""
    B, T, _ = x.shape
    q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
    if adapter.qk_norm == "projection":
        q, k = attn.q_norm(q), attn.k_norm(k)
    q = q.view(B, T, shape.num_heads, shape.head_dim)
    k = k.view(B, T, shape.num_kv_heads, shape.head_dim)
    if adapter.qk_norm == "per_head":
        q, k = attn.q_norm(q), attn.k_norm(k)
    v = v.view(B, T, shape.num_kv_heads, shape.head_dim)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
