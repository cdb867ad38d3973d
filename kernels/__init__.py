"""The hybrid attention op (DESIGN §3, §6): one dispatcher over a quadratic reference, a chunkwise
torch path and Triton kernels (forward and backward; ``kernels.triton_hybrid``)."""

from __future__ import annotations

import importlib.util
import os

import torch

from . import reference
from ._common import COMBINES, MEMORY_NORMS, MODES, is_power_of_two
from .chunkwise import hybrid_attention_chunkwise
from .recurrent import HybridState, hybrid_attention_step

BACKENDS = ("auto", "torch", "compiled", "reference", "triton")
TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# tl.dot needs every matrix dimension >= 16; above 256 a head no longer fits one program's registers.
TRITON_MIN_DIM, TRITON_MAX_DIM = 16, 256


def triton_unavailable_reason(device: torch.device, dtype: torch.dtype, qk_dim: int, v_dim: int,
                              chunk_size: int) -> str | None:
    """Why the Triton kernels cannot run these inputs, or None when they can."""
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed (pip install triton==3.7.1; Linux only)"
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return (f"it needs a CUDA device and the inputs are on {device.type}; use backend='torch' (or set "
                "TRITON_INTERPRET=1 before anything imports triton to run the kernels in Triton's CPU "
                "interpreter, slowly, as the tests do)")
    if dtype not in TRITON_DTYPES:
        return (f"dtype {dtype} is not supported (float32, float16, bfloat16); use backend='torch' or "
                "'reference' for float64")
    for name, dim in (("q/k head dim", qk_dim), ("v head dim", v_dim)):
        if not TRITON_MIN_DIM <= dim <= TRITON_MAX_DIM:
            return (f"{name} {dim} is outside {TRITON_MIN_DIM}..{TRITON_MAX_DIM} (Triton's matrix products "
                    "need at least 16); use backend='torch'")
    if not (is_power_of_two(chunk_size) and TRITON_MIN_DIM <= chunk_size <= 128):
        return f"chunk_size={chunk_size} is not a power of two in 16..128; use 16, 32, 64 or 128"
    return None


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype = torch.float32, qk_dim: int = 64,
                    v_dim: int = 64, chunk_size: int = 64) -> str:
    """The implementation that will run: "triton", "torch" or "reference", or a ValueError saying why
    the requested one cannot. "auto" is Triton on CUDA when it can serve the inputs, torch elsewhere."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not supported; allowed values: {', '.join(BACKENDS)}")
    if backend == "triton":
        reason = triton_unavailable_reason(device, dtype, qk_dim, v_dim, chunk_size)
        if reason is not None:
            raise ValueError(f"backend='triton' cannot run here: {reason}")
        return "triton"
    if backend == "auto":
        usable = device.type == "cuda" and triton_unavailable_reason(device, dtype, qk_dim, v_dim, chunk_size) is None
        return "triton" if usable else "torch"
    return backend


def hybrid_attention(
    q, k, v, i_gate, f_gate, g_gate, *, window, sink_tokens, mode="hybrid", combine="gate", backend="auto",
    chunk_size=64, scale=None, norm_weight=None, norm_eps=1e-6, eps=1e-6, return_state=False, mq=None, mk=None,
    memory_norm="rms",
):
    """Hybrid mLSTM + sliding-window/sink attention.

    Shapes: q [B, H, T, Dqk]; k [B, Hkv, T, Dqk]; v [B, Hkv, T, Dv] with H % Hkv == 0 (Hkv == H
    is the plain case); i_gate, f_gate, g_gate [B, H, T] gate pre-activations (input gate exp(i),
    forget gate logsigmoid(f), mix gate sigmoid(g)). RoPE is applied by the caller. Returns
    [B, H, T, Dv] in q's dtype (and the decode state after the last token if ``return_state``).

    backend: "auto" (Triton on CUDA when it can serve the inputs, the chunkwise torch path
    elsewhere), "triton" (an error says why when it cannot run), "torch", "compiled" (the chunkwise
    torch path through ``torch.compile``, one graph per input shape: ``kernels.compiled``),
    "reference". With
    mode="mlstm" the result is the raw mLSTM hidden state h^m, comparable with mlstm_kernels'
    parallel mLSTM on the same inputs.

    mq [B, H, T, Dqk], mk [B, Hkv, T, Dqk]: the memory branch's own queries and keys (the layer's
    feature-mapped q, k); None means q, k. memory_norm: "rms" (per-head RMS norm of h^m before
    the ``gate`` mix, weight ``norm_weight``) or "none" (the paper's layer).

    See ``kernels.reference.hybrid_attention`` for the meaning of every option.
    """
    if not is_power_of_two(chunk_size):
        raise ValueError(f"chunk_size={chunk_size!r} is invalid; allowed values: a power of two (16, 32, 64, ...)")
    impl = resolve_backend(backend, q.device, q.dtype, q.shape[-1], v.shape[-1], chunk_size)
    kwargs = dict(window=window, sink_tokens=sink_tokens, mode=mode, combine=combine, scale=scale,
                  norm_weight=norm_weight, norm_eps=norm_eps, eps=eps, mq=mq, mk=mk, memory_norm=memory_norm)
    if impl == "triton":
        from .triton_hybrid import hybrid_attention_triton  # imports Triton: only when it runs

        return hybrid_attention_triton(q, k, v, i_gate, f_gate, g_gate, chunk_size=chunk_size,
                                       return_state=return_state, **kwargs)
    if impl == "compiled":
        from .compiled import hybrid_attention_compiled

        return hybrid_attention_compiled(q, k, v, i_gate, f_gate, g_gate, chunk_size=chunk_size,
                                         return_state=return_state, **kwargs)
    if impl == "reference" and not return_state:
        return reference.hybrid_attention(q, k, v, i_gate, f_gate, g_gate, **kwargs)
    return hybrid_attention_chunkwise(q, k, v, i_gate, f_gate, g_gate, chunk_size=chunk_size,
                                      return_state=return_state, **kwargs)


__all__ = [
    "BACKENDS", "COMBINES", "MEMORY_NORMS", "MODES", "HybridState", "TRITON_DTYPES", "hybrid_attention", "hybrid_attention_chunkwise",
    "hybrid_attention_step", "reference", "resolve_backend", "triton_unavailable_reason",
]
