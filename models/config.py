"""Configuration of the hybrid student (DESIGN §3)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Literal, get_args

from kernels import BACKENDS, COMBINES, MODES
from kernels._common import is_power_of_two

FeatureMap = Literal["softmax", "none"]
MemoryNorm = Literal["none", "rms"]
GateInput = Literal["qkv", "hidden"]
# What a student saved before these fields existed was: raw q/k, an RMS norm on the memory, the mix
# gate from the layer input. A saved config without them is read with these values.
LEGACY_LAYER = {"feature_map": "none", "memory_norm": "rms", "gate_input": "hidden"}
# The whole previous layer, for comparisons: also the input gate bias it was converted with.
PREVIOUS_LAYER = {**LEGACY_LAYER, "input_gate_bias_init": 0.0}


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
    """``auto`` | ``torch`` (chunkwise) | ``compiled`` (chunkwise through ``torch.compile``: one graph
    per input shape, compiled on its first call; for training at a fixed sequence length; a saved
    student records ``auto`` in its place) |
    ``reference`` (quadratic) | ``triton``."""
    gate_soft_cap: float = 15.0
    """Input/forget gate pre-activations pass through cap * tanh(x / cap), as xLSTM does (0: off)."""
    input_gate_bias_init: float = 6.0
    """Initial input-gate bias (weights start at zero). exp(6) = 403 lifts the memory's normaliser
    |n . phi(q)| above its floor (max(., 1)), so a fresh read-out is a weighted average of values
    (the paper's phi(q) S / (phi(q) z)) rather than a vanishing sum: with softmax feature maps,
    phi(q) . phi(k) / sqrt(d) is about 0.002 per key. Measured on the embedded teacher (see
    docs/results/layer_init): mLSTM-only held-out CE 10.4 at 0, 7.9 at 6, no better at 9 or 12."""
    forget_gate_bias_init: tuple[float, float] = (3.0, 6.0)
    """Forget-gate biases spread linearly over heads in this range: sigmoid(3..6) = 0.95..0.998 memory."""
    mix_gate_bias_init: float = -4.0
    """Mix-gate bias: sigmoid(-4) = 0.018, so a fresh student is almost its windowed teacher."""
    norm_eps: float = 1e-6
    """Epsilon of the per-head RMS norm on the mLSTM branch (``memory_norm: rms``)."""
    full_attention_layers: list[int] = field(default_factory=list)
    """Decoder layers kept as the teacher's full softmax attention (with a growing KV cache)."""
    feature_map: FeatureMap = "softmax"
    """q and k of the memory branch. ``softmax`` (the paper, Hedgehog-style): per layer, per head,
    separate maps for q and k, phi(x) = softmax(W x + b) over the feature dimension (d -> d), on
    the RoPE'd q and k; W starts at ``feature_map_init_scale`` * identity, b at 0. ``none``: the raw
    RoPE'd q and k (the layer before feature maps)."""
    feature_map_init_scale: float = 1.0
    """Initial W = scale * identity of every feature map: phi(x) = softmax(scale * x) at conversion."""
    memory_norm: MemoryNorm = "none"
    """``none`` (the paper: a norm before the output projection hurt alignment; the normaliser state
    does the job) or ``rms``: a per-head RMS norm with a learnable weight on the memory read-out."""
    gate_input: GateInput = "qkv"
    """Input of the per-head mix gate o. ``qkv`` (the paper, Eq. 11): o = sigmoid(w_h . [q; k; v]
    + b_h) from the head's own q, k (before RoPE: the gate folds into one projection of x) and v;
    ``hidden``: from the layer input x, like the input and forget gates."""

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
        for name, kind in (("feature_map", FeatureMap), ("memory_norm", MemoryNorm), ("gate_input", GateInput)):
            if getattr(self, name) not in get_args(kind):
                raise ValueError(f"HybridConfig.{name}={getattr(self, name)!r} is not supported; allowed values: "
                                 f"{', '.join(get_args(kind))}")
        if not self.feature_map_init_scale > 0:
            raise ValueError(f"HybridConfig.feature_map_init_scale={self.feature_map_init_scale!r} is invalid; "
                             "allowed values: > 0")

    def describe(self) -> str:
        """One line for reports and tables."""
        layer = []
        if self.mode != "swa":
            layer.append(f"{self.feature_map} feature map")
            if self.mode == "hybrid" and self.combine == "gate":
                layer += [f"memory norm {self.memory_norm}", f"gate on {self.gate_input}"]
        detail = f"; {', '.join(layer)}" if layer else ""
        return f"hybrid layers ({self.mode}/{self.combine}{detail}), window {self.window}, {self.sink_tokens} sinks"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["forget_gate_bias_init"] = list(self.forget_gate_bias_init)
        return d

    @classmethod
    def from_saved(cls, d: dict, *, source: str = "HybridConfig") -> "HybridConfig":
        """A config read from a saved student: fields it predates take their legacy values
        (``LEGACY_LAYER``), so an old student is rebuilt as the layer it was trained as."""
        return cls.from_dict({**LEGACY_LAYER, **d}, source=source)

    @classmethod
    def from_dict(cls, d: dict, *, source: str = "HybridConfig") -> "HybridConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(
                f"{source}: unknown HybridConfig field(s) {', '.join(unknown)}; known fields: {', '.join(sorted(known))}"
            )
        return cls(**d)
