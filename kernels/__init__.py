"""The hybrid attention op (DESIGN §3, §6): one dispatcher over a quadratic reference, a chunkwise
torch path and, on CUDA, Triton kernels (added by the Triton-kernels issue)."""

from __future__ import annotations

import torch

from . import reference
from ._common import COMBINES, MODES, is_power_of_two
from .chunkwise import hybrid_attention_chunkwise
from .recurrent import HybridState, hybrid_attention_step

BACKENDS = ("auto", "torch", "reference", "triton")


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map a backend string to the implementation that will run, or say why it cannot."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is not supported; allowed values: {', '.join(BACKENDS)}")
    if backend == "triton":
        raise ValueError(
            "backend='triton' is not available: this version ships no Triton hybrid kernels yet; "
            "use backend='torch' (chunkwise, any device) or 'auto'"
        )
    # The Triton kernels are a separate work item; until they land "auto" means the chunkwise
    # torch path on every device.
    return "reference" if backend == "reference" else "torch"


def hybrid_attention(
    q, k, v, i_gate, f_gate, g_gate, *, window, sink_tokens, mode="hybrid", combine="gate", backend="auto",
    chunk_size=64, scale=None, norm_weight=None, norm_eps=1e-6, eps=1e-6, return_state=False,
):
    """Hybrid mLSTM + sliding-window/sink attention.

    Shapes: q [B, H, T, Dqk]; k [B, Hkv, T, Dqk]; v [B, Hkv, T, Dv] with H % Hkv == 0 (Hkv == H
    is the plain case); i_gate, f_gate, g_gate [B, H, T] gate pre-activations (input gate exp(i),
    forget gate logsigmoid(f), mix gate sigmoid(g)). RoPE is applied by the caller. Returns
    [B, H, T, Dv] in q's dtype (and the decode state after the last token if ``return_state``;
    the chunkwise path computes it). With mode="mlstm" the result is the raw mLSTM hidden state
    h^m, comparable with mlstm_kernels' parallel mLSTM on the same inputs.

    See ``kernels.reference.hybrid_attention`` for the meaning of every option.
    """
    if not is_power_of_two(chunk_size):
        raise ValueError(f"chunk_size={chunk_size!r} is invalid; allowed values: a power of two (16, 32, 64, ...)")
    impl = resolve_backend(backend, q.device)
    kwargs = dict(window=window, sink_tokens=sink_tokens, mode=mode, combine=combine, scale=scale,
                  norm_weight=norm_weight, norm_eps=norm_eps, eps=eps)
    if impl == "reference" and not return_state:
        return reference.hybrid_attention(q, k, v, i_gate, f_gate, g_gate, **kwargs)
    return hybrid_attention_chunkwise(q, k, v, i_gate, f_gate, g_gate, chunk_size=chunk_size,
                                      return_state=return_state, **kwargs)


__all__ = [
    "BACKENDS", "COMBINES", "MODES", "HybridState", "hybrid_attention", "hybrid_attention_chunkwise",
    "hybrid_attention_step", "reference", "resolve_backend",
]
