"""The lean plan of a training step: modules whose backward keeps fewer tensors (DESIGN §4).
``lean_backward`` applies all of it: the hybrid layers recompute their attention op in the
backward (``HybridAttention.recompute_in_backward``), and the two modules below replace the
teacher's gated MLPs and RMS norms.

The gated MLP (Llama, Qwen, Mistral, OLMo: ``down(silu(gate(x)) * up(x))``) with a lean backward.

Autograd keeps four intermediate-size tensors per layer for the plain MLP (the gate projection,
its SiLU, the up projection and their product, which the down projection saves). They are the
largest activations of a training step (4 x 512 tokens x 1,536 x 4 bytes x 4 per layer for
SmolLM2). ``LeanGatedMLP`` keeps the two projections only and recomputes SiLU and the product
in the backward: elementwise work, no matrix product is repeated. Its forward computes exactly
what the teacher's MLP does, in the same order, and it holds the teacher's own three
projections under their own names, so state dicts and checkpoints do not change.

The RMS norm likewise: Hugging Face's keeps its input and the normalised input (two tensors of the
hidden size per norm, two norms per layer); ``LeanRMSNorm`` keeps the input and one number per
position (1 / rms) and recomputes the normalised input in the backward. Its output remembers what
rebuilds it, so a ``LeanGatedMLP`` fed by it (the post-attention norm of every decoder layer) keeps
neither: its gate and up projections' weight gradients use the output rebuilt in the backward, one
elementwise pass, instead of a tensor of the hidden size kept per layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .hybrid_layer import HybridAttention
from .rebuilt import lean_norm_recipe, normed_again

SILU_NAMES = ("silu", "swish")


class _SiluGatedDown(torch.autograd.Function):
    """down(silu(gate) * up) keeping gate and up (and the down weight) for the backward."""

    @staticmethod
    def forward(ctx, gate, up, weight, bias):
        ctx.save_for_backward(gate, up, weight)
        ctx.has_bias = bias is not None
        return F.linear(F.silu(gate) * up, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        gate, up, weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        return _silu_gated_down_grads(grad_out, gate, up, weight, need[0], need[1], need[2], ctx.has_bias and need[3])


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def _silu_gated_down_grads(grad_out, gate, up, down_weight, want_gate, want_up, want_weight, want_bias):
    """Gradients of down(silu(gate) * up) w.r.t. gate, up, the down weight and its bias (None where
    not wanted), from gate and up alone (SiLU and the product recomputed)."""
    silu = F.silu(gate)
    grad_product = grad_out @ down_weight
    grad_weight = _rows(grad_out).t() @ _rows(silu * up) if want_weight else None
    grad_bias = _rows(grad_out).sum(0) if want_bias else None
    grad_up = grad_product * silu if want_up else None
    grad_gate = torch.ops.aten.silu_backward(grad_product.mul_(up), gate) if want_gate else None
    return grad_gate, grad_up, grad_weight, grad_bias


class _NormedSiluGatedMLP(torch.autograd.Function):
    """down(silu(gate(y)) * up(y)) for y a lean RMS norm's output, keeping gate and up but not y:
    the backward rebuilds y from the norm's input and 1 / rms, which the norm keeps anyway."""

    @staticmethod
    def forward(ctx, y, x, rstd, norm_weight, gate_w, gate_b, up_w, up_b, down_w, down_b):
        gate, up = F.linear(y, gate_w, gate_b), F.linear(y, up_w, up_b)
        ctx.save_for_backward(x, rstd, norm_weight, gate, up, gate_w, up_w, down_w)
        ctx.biases = (gate_b is not None, up_b is not None, down_b is not None)
        return F.linear(F.silu(gate) * up, down_w, down_b)

    @staticmethod
    def backward(ctx, grad_out):
        x, rstd, norm_weight, gate, up, gate_w, up_w, down_w = ctx.saved_tensors
        need = ctx.needs_input_grad
        grad_gate, grad_up, grad_down_w, grad_down_b = _silu_gated_down_grads(
            grad_out, gate, up, down_w, True, True, need[8], ctx.biases[2] and need[9])
        grad_gate_w = grad_up_w = None
        if need[4] or need[6]:
            y = _rows(normed_again(x, rstd, norm_weight))
            grad_gate_w = _rows(grad_gate).t() @ y if need[4] else None
            grad_up_w = _rows(grad_up).t() @ y if need[6] else None
        grad_gate_b = _rows(grad_gate).sum(0) if ctx.biases[0] and need[5] else None
        grad_up_b = _rows(grad_up).sum(0) if ctx.biases[1] and need[7] else None
        grad_y = torch.addmm(_rows(grad_gate) @ gate_w, _rows(grad_up), up_w).view(x.shape) if need[0] else None
        return (grad_y, None, None, None, grad_gate_w, grad_gate_b, grad_up_w, grad_up_b, grad_down_w, grad_down_b)


class LeanGatedMLP(nn.Module):
    """A teacher's gated MLP (its ``gate_proj``, ``up_proj``, ``down_proj`` modules, shared) whose
    backward keeps two tensors instead of four. Falls back to the plain computation when a
    projection is not a plain ``nn.Linear`` (e.g. wrapped by a LoRA adapter)."""

    def __init__(self, mlp: nn.Module):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        self.act_fn = mlp.act_fn

    def forward(self, x):
        plain = all(type(p) is nn.Linear for p in (self.gate_proj, self.up_proj, self.down_proj))
        recipe = lean_norm_recipe(x) if torch.is_grad_enabled() and plain else None
        if recipe is not None:
            g, u, d = self.gate_proj, self.up_proj, self.down_proj
            return _NormedSiluGatedMLP.apply(x, *recipe, g.weight, g.bias, u.weight, u.bias, d.weight, d.bias)
        gate, up = self.gate_proj(x), self.up_proj(x)
        if torch.is_grad_enabled() and type(self.down_proj) is nn.Linear:
            return _SiluGatedDown.apply(gate, up, self.down_proj.weight, self.down_proj.bias)
        return self.down_proj(self.act_fn(gate) * up)


def lean_gated_mlps(model: nn.Module) -> int:
    """Replace every SiLU-gated MLP of ``model``'s decoder layers by ``LeanGatedMLP`` (in place);
    returns how many were replaced. MLPs of another shape or activation are left as they are."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "hidden_act", None) not in SILU_NAMES:
        return 0
    replaced = 0
    for name, module in list(model.named_modules()):
        if name.endswith(".mlp") and all(hasattr(module, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            if isinstance(module, LeanGatedMLP):
                continue
            parent, attr = model.get_submodule(name.rsplit(".", 1)[0]), name.rsplit(".", 1)[1]
            setattr(parent, attr, LeanGatedMLP(module))
            replaced += 1
    return replaced


class _RMSNorm(torch.autograd.Function):
    """weight * (x / rms(x)) in the order Hugging Face's Llama-style norm computes it, keeping x and
    1 / rms(x) for the backward."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        xf = x.to(torch.float32)
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, rstd, weight)
        ctx.mark_non_differentiable(rstd)
        return normed_again(x, rstd, weight), rstd  # the very ops a consumer rebuilds it with

    @staticmethod
    def backward(ctx, grad_out, _grad_rstd):
        x, rstd, weight = ctx.saved_tensors
        normed = x.to(torch.float32) * rstd
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad_out * normed.to(x.dtype)).reshape(-1, x.shape[-1]).sum(0)
        grad_x = None
        if ctx.needs_input_grad[0]:
            g = (grad_out * weight).to(torch.float32)
            # d(x r)/dx applied to g: r (g - n mean(g n)), n = x r
            grad_x = (rstd * (g - normed * (g * normed).mean(-1, keepdim=True))).to(x.dtype)
        return grad_x, grad_weight, None


# Norm classes whose forward is weight * (x.float() * rsqrt(mean(x^2) + eps)).to(dtype) (OLMo2's
# multiplies by the weight before casting back: left alone).
LLAMA_STYLE_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")


class LeanRMSNorm(nn.Module):
    """A teacher's Llama-style RMS norm (its ``weight``, shared) keeping x and 1 / rms(x) for the
    backward instead of x and x / rms(x)."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.weight, self.variance_epsilon = norm.weight, norm.variance_epsilon

    def forward(self, hidden_states):
        if torch.is_grad_enabled():
            out, rstd = _RMSNorm.apply(hidden_states, self.weight, self.variance_epsilon)
            # what rebuilds ``out`` exactly (``normed_again``), for a consumer that would rather not
            # keep it for its own backward (``LeanGatedMLP``); dropped with ``out`` itself
            out._lean_norm = (hidden_states, rstd, self.weight, out._version)
            return out
        xf = hidden_states.to(torch.float32)
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * xf.to(hidden_states.dtype)


def lean_rms_norms(model: nn.Module) -> int:
    """Replace the Llama-style RMS norms of ``model``'s decoder layers (``input_layernorm``,
    ``post_attention_layernorm``; not the heads' q/k norms) by ``LeanRMSNorm``; returns how many."""
    replaced = 0
    for name, module in list(model.named_modules()):
        attr = name.rsplit(".", 1)[-1]
        if type(module).__name__ in LLAMA_STYLE_NORMS and attr in ("input_layernorm", "post_attention_layernorm"):
            setattr(model.get_submodule(name.rsplit(".", 1)[0]), attr, LeanRMSNorm(module))
            replaced += 1
    return replaced


def lean_backward(model: nn.Module) -> int:
    """The lean plan on ``model``: its hybrid layers recompute their attention op in the backward
    (``HybridAttention.recompute_in_backward``), ``lean_gated_mlps`` and ``lean_rms_norms``;
    returns how many modules changed."""
    layers = [m for m in model.modules() if isinstance(m, HybridAttention)]
    for layer in layers:
        layer.recompute_in_backward = True
    return len(layers) + lean_gated_mlps(model) + lean_rms_norms(model)
