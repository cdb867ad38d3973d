"""The gated MLP (Llama, Qwen, Mistral, OLMo: ``down(silu(gate(x)) * up(x))``) with a lean backward.

Autograd keeps four intermediate-size tensors per layer for the plain MLP (the gate projection,
its SiLU, the up projection and their product, which the down projection saves). They are the
largest activations of a training step (4 x 512 tokens x 1,536 x 4 bytes x 4 per layer for
SmolLM2). ``LeanGatedMLP`` keeps the two projections only and recomputes SiLU and the product
in the backward: elementwise work, no matrix product is repeated. Its forward computes exactly
what the teacher's MLP does, in the same order, and it holds the teacher's own three
projections under their own names, so state dicts and checkpoints do not change.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

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
        sig = torch.sigmoid(gate)
        silu = gate * sig
        grad_product = grad_out @ weight
        grad_gate = grad_up = grad_weight = grad_bias = None
        if ctx.needs_input_grad[2]:
            grad_weight = grad_out.reshape(-1, grad_out.shape[-1]).t() @ (silu * up).reshape(-1, up.shape[-1])
        if ctx.has_bias and ctx.needs_input_grad[3]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        if ctx.needs_input_grad[1]:
            grad_up = grad_product * silu
        if ctx.needs_input_grad[0]:
            # d silu / d gate = sigmoid(g) * (1 + g * (1 - sigmoid(g)))
            grad_gate = grad_product * up * (sig * (1 + gate * (1 - sig)))
        return grad_gate, grad_up, grad_weight, grad_bias


class LeanGatedMLP(nn.Module):
    """A teacher's gated MLP (its ``gate_proj``, ``up_proj``, ``down_proj`` modules, shared) whose
    backward keeps two tensors instead of four. Falls back to the plain computation when a
    projection is not a plain ``nn.Linear`` (e.g. wrapped by a LoRA adapter)."""

    def __init__(self, mlp: nn.Module):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        self.act_fn = mlp.act_fn

    def forward(self, x):
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
