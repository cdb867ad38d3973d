"""Configuration of the hybrid student (DESIGN §3)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

from kernels import BACKENDS, COMBINES, MODES
from kernels._common import is_power_of_two


@dataclass
class HybridConfig:
    """How each teacher attention layer becomes a hybrid mLSTM + sliding-window attention layer."""

    mode: str = "hybrid"
    """``hybrid`` (mLSTM memory + windowed softmax), ``mlstm`` (memory only) or ``swa`` (window only)."""
    combine: str = "gate"
    """``gate``: o = g * norm(h^m) + (1 - g) * h^a; ``shared_norm``: window/sink keys by exp(score),
    older keys by the gated mLSTM weights, one normaliser (LoLCATs-style)."""
    window: int = 64
    """Sliding window: query t attends exactly to keys (t - window, t]."""
    sink_tokens: int = 4
    """The first ``sink_tokens`` positions stay visible to every query (attention sinks)."""
    chunk_size: int = 64
    """Chunk length of the chunkwise form (a power of two)."""
    backend: str = "auto"
    """``auto`` | ``torch`` (chunkwise) | ``reference`` (quadratic) | ``triton``."""
    gate_soft_cap: float = 15.0
    """Input/forget gate pre-activations pass through cap * tanh(x / cap), as xLSTM does (0: off)."""
    input_gate_bias_init: float = 0.0
    """Initial input-gate bias (weights start at zero)."""
    forget_gate_bias_init: tuple[float, float] = (3.0, 6.0)
    """Forget-gate biases spread linearly over heads in this range: sigmoid(3..6) = 0.95..0.998 memory."""
    mix_gate_bias_init: float = -4.0
    """Mix-gate bias: sigmoid(-4) = 0.018, so a fresh student is almost its windowed teacher."""
    norm_eps: float = 1e-6
    """Epsilon of the per-head RMS norm on the mLSTM branch."""
    full_attention_layers: list[int] = field(default_factory=list)
    """Decoder layers kept as the teacher's full softmax attention (with a growing KV cache)."""

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"HybridConfig.mode={self.mode!r} is not supported; allowed values: {', '.join(MODES)}")
        if self.combine not in COMBINES:
            raise ValueError(
                f"HybridConfig.combine={self.combine!r} is not supported; allowed values: {', '.join(COMBINES)}"
            )
        if not isinstance(self.window, int) or isinstance(self.window, bool) or self.window < 1:
            raise ValueError(f"HybridConfig.window={self.window!r} is invalid; allowed values: an integer >= 1")
        if not isinstance(self.sink_tokens, int) or isinstance(self.sink_tokens, bool) or self.sink_tokens < 0:
            raise ValueError(
                f"HybridConfig.sink_tokens={self.sink_tokens!r} is invalid; allowed values: an integer >= 0"
            )
        if not is_power_of_two(self.chunk_size):
            raise ValueError(
                f"HybridConfig.chunk_size={self.chunk_size!r} is invalid; allowed values: a power of two (16, 32, 64, ...)"
            )
        if self.backend not in BACKENDS:
            raise ValueError(
                f"HybridConfig.backend={self.backend!r} is not supported; allowed values: {', '.join(BACKENDS)}"
            )
        if self.gate_soft_cap < 0:
            raise ValueError(f"HybridConfig.gate_soft_cap={self.gate_soft_cap!r} is invalid; allowed values: >= 0 (0 turns it off)")
        self.forget_gate_bias_init = tuple(float(x) for x in self.forget_gate_bias_init)
        if len(self.forget_gate_bias_init) != 2:
            raise ValueError("HybridConfig.forget_gate_bias_init must be a pair (low, high)")
        layers = list(self.full_attention_layers)
        if any(not isinstance(i, int) or isinstance(i, bool) or i < 0 for i in layers) or len(set(layers)) != len(layers):
            raise ValueError(
                f"HybridConfig.full_attention_layers={self.full_attention_layers!r} is invalid; "
                "allowed values: distinct layer indices >= 0"
            )
        self.full_attention_layers = sorted(layers)

    def describe(self) -> str:
        """One line for reports and tables."""
        return f"hybrid layers ({self.mode}/{self.combine}), window {self.window}, {self.sink_tokens} sinks"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["forget_gate_bias_init"] = list(self.forget_gate_bias_init)
        return d

    @classmethod
    def from_dict(cls, d: dict, *, source: str = "HybridConfig") -> "HybridConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(
                f"{source}: unknown HybridConfig field(s) {', '.join(unknown)}; known fields: {', '.join(sorted(known))}"
            )
        return cls(**d)
