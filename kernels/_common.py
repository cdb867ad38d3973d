"""Argument checks and small helpers shared by every form of the hybrid attention op."""

from __future__ import annotations


import torch
import torch.nn.functional as F

MODES = ("hybrid", "mlstm", "swa")
COMBINES = ("gate", "shared_norm")
# What the ``gate`` combination does to the memory read-out before mixing: "rms" a per-head RMS
# norm (weight ``norm_weight``), "none" nothing (the paper: the normaliser state does the job).
MEMORY_NORMS = ("rms", "none")
# A finite stand-in for log(0): exp() of it is 0 in float32, and unlike -inf it never makes
# inf - inf = nan in the stabiliser arithmetic (nor nan gradients).
LOG_ZERO = -1e30


def check_inputs(q, k, v, i_gate, f_gate, g_gate, window, sink_tokens, mode, combine, mq=None, mk=None,
                 memory_norm="rms"):
    """Validate shapes and options; returns (B, H, Hkv, T, Dqk, Dv). ``mq``/``mk`` (the memory
    branch's own queries and keys) must have the shapes of ``q``/``k`` when given."""
    if memory_norm not in MEMORY_NORMS:
        raise ValueError(f"memory_norm={memory_norm!r} is not supported; allowed values: {', '.join(MEMORY_NORMS)}")
    for name, given, like in (("mq", mq, q), ("mk", mk, k)):
        if given is not None and tuple(given.shape) != tuple(like.shape):
            raise ValueError(f"{name} must have the shape of {name[1]} {tuple(like.shape)} (the memory branch's own "
                             f"{'queries' if name == 'mq' else 'keys'}); got {tuple(given.shape)}")
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not supported; allowed values: {', '.join(MODES)}")
    if combine not in COMBINES:
        raise ValueError(f"combine={combine!r} is not supported; allowed values: {', '.join(COMBINES)}")
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise ValueError(f"window={window!r} is invalid; allowed values: an integer >= 1")
    if not isinstance(sink_tokens, int) or isinstance(sink_tokens, bool) or sink_tokens < 0:
        raise ValueError(f"sink_tokens={sink_tokens!r} is invalid; allowed values: an integer >= 0")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"q, k, v must be 4-D [B, H, T, D]; got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
        )
    B, H, T, Dqk = q.shape
    Hkv = k.shape[1]
    if k.shape[-1] != Dqk:
        raise ValueError(
            f"head dim mismatch: q has head dim {Dqk} but k has {k.shape[-1]}; q and k must share the head dim"
        )
    if k.shape[0] != B or k.shape[2] != T or v.shape[0] != B or v.shape[2] != T:
        raise ValueError(f"batch/time mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if v.shape[1] != Hkv:
        raise ValueError(f"k has {Hkv} heads but v has {v.shape[1]}; they must match")
    if H % Hkv != 0:
        raise ValueError(f"query heads ({H}) must be a multiple of key/value heads ({Hkv}) for GQA")
    for name, gate in (("i_gate", i_gate), ("f_gate", f_gate), ("g_gate", g_gate)):
        if gate is None:
            continue
        if tuple(gate.shape) != (B, H, T):
            raise ValueError(f"{name} must have shape [B, H, T] = {(B, H, T)}; got {tuple(gate.shape)}")
    if mode != "swa" and (i_gate is None or f_gate is None):
        raise ValueError(f"mode={mode!r} needs i_gate and f_gate (the mLSTM gates); got None")
    if mode == "hybrid" and g_gate is None:
        raise ValueError("mode='hybrid' needs g_gate (the mix gate); got None")
    return B, H, Hkv, T, Dqk, v.shape[-1]


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 stays float64; everything else is computed in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def expand_kv(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, Hkv, ...] -> [B, H, ...]; query head h reads key/value head h // (H / Hkv), as HF GQA does."""
    rep = num_heads // x.shape[1]
    return x if rep == 1 else x.repeat_interleave(rep, dim=1)


def default_scale(scale, head_dim: int) -> float:
    return head_dim**-0.5 if scale is None else float(scale)


def head_rms_norm(h: torch.Tensor, weight, eps: float) -> torch.Tensor:
    """RMS normalisation over the last dim per head; h [B, H, T, Dv] (or [B, H, Dv] for one
    decoding step), weight [H, Dv] or None."""
    out = h * torch.rsqrt(h.square().mean(-1, keepdim=True) + eps)
    if weight is not None:
        out = out * weight.to(out.dtype).view(weight.shape[0], *([1] * (h.dim() - 3)), weight.shape[1])
    return out


# exp(-m) above e^60 (m < -60: every key's weight is below e^-60) would overflow float32 and
# poison gradients with inf * 0; the read-out there is ~num * e^-60 either way.
MAX_NEG_LOG_FLOOR = 60.0


def mlstm_normalise(num, den, m, eps):
    """h^m = num / (max(|den|, exp(-m)) + eps): the mLSTM normaliser in stabilised units
    (num, den [..., Dv] / [...] are the sums divided by exp(m)), as mlstm_kernels computes it."""
    floor = torch.exp(torch.clamp(-m, max=MAX_NEG_LOG_FLOOR))
    return num / (torch.maximum(den.abs(), floor) + eps).unsqueeze(-1)


def shared_norm_combine(num_a, den_a, a_max, num_o, den_o, m_o, g_gate):
    """``combine="shared_norm"``: one normaliser over the window/sink keys (softmax weights) and the
    older keys (gate-weighted mLSTM weights). Each branch's sums come in units of exp(its own
    stabiliser: a_max, m_o); num [..., Dv], den/max/g [...].

    The common unit is the larger of the two branches' actual log masses (mix gate and |den|
    included), so the shared denominator lies in [1, 2]: with units taken from the stabilisers
    alone, a closed mix gate (g -> 0) or a near-zero memory mass leaves a denominator near 1e-40,
    whose gradient (1 / den^2) underflows to inf. The unit cancels in num / den, so it carries no
    gradient. Rows with no older key have den_o = 0 (log mass -inf): the attention mass sets the unit.
    """
    log_g = F.logsigmoid(g_gate)
    with torch.no_grad():
        log_mass_a = a_max + torch.log(den_a)  # den_a >= 1: the best-scoring key weighs 1
        log_mass_o = m_o + log_g + torch.log(den_o.abs())
        unit = torch.maximum(log_mass_a, log_mass_o)
    a_scale = torch.exp(a_max - unit)
    o_scale = torch.exp(m_o + log_g - unit)
    num = a_scale.unsqueeze(-1) * num_a + o_scale.unsqueeze(-1) * num_o
    den = a_scale * den_a + o_scale * den_o.abs()
    return num / den.unsqueeze(-1)


def mix_gate(combined_hm_normed, h_attn, g_gate):
    """g * norm(h^m) + (1 - g) * h^a with g = sigmoid(g_gate), as one lerp."""
    return torch.lerp(h_attn, combined_hm_normed, torch.sigmoid(g_gate).unsqueeze(-1))


def gate_combine(h_mem, h_attn, g_gate, memory_norm, norm_weight, norm_eps):
    """The ``gate`` combination: g * h^m + (1 - g) * h^a, h^m RMS-normed per head first when
    ``memory_norm == "rms"``."""
    if memory_norm == "rms":
        h_mem = head_rms_norm(h_mem, norm_weight, norm_eps)
    return mix_gate(h_mem, h_attn, g_gate)


def log_forget(f_gate: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return F.logsigmoid(f_gate.to(dtype))


def is_power_of_two(n) -> bool:
    return isinstance(n, int) and n >= 1 and (n & (n - 1)) == 0 and not isinstance(n, bool)


def memory_inputs(q, k, mq, mk):
    """The memory branch's queries and keys: ``mq``/``mk`` where given, else the attention's q/k."""
    return (q if mq is None else mq), (k if mk is None else mk)


__all__ = [
    "MODES", "COMBINES", "MEMORY_NORMS", "gate_combine", "memory_inputs", "LOG_ZERO", "check_inputs", "compute_dtype", "expand_kv",
    "default_scale", "head_rms_norm", "mix_gate", "shared_norm_combine", "mlstm_normalise", "log_forget", "is_power_of_two",
]
