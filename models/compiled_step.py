"""A hybrid student's decoding step, one compiled graph per decoder layer.

Eagerly, a decoding step of a decoder layer is several dozen tensor ops on a few thousand numbers
(the norms, projections, gates, RoPE, feature maps, the memory update, the window softmax, the mix,
the MLP's SiLU and product, the residual adds), and on a CPU each op costs microseconds of
dispatch: the hybrid layer's part alone cost more than the teacher's attention, which is a handful
of ops. ``torch.compile`` turns the whole decoder layer's step (the teacher's own decoder-layer
forward, its attention module a ``HybridAttention`` taking ``HybridAttention.decode_step``) into one
graph whose elementwise work fuses into a few kernels between the matrix products. One graph
serves every layer of a model (the layer is an input, not a constant), and the state stays a
``HybridState``, so compiled and eager steps mix.

Why the decoder layer and not the attention alone (what this module compiled before): the norms,
the MLP's elementwise work and the residual adds fuse too, and each layer costs one compiled call
instead of one compiled call plus a dozen eager ops around it. A graph over the whole stack (one
call per token) was tried and rejected: 30 unrolled layers took over six minutes to compile on
this CPU.

Two choices keep the call cheap, because this graph is entered once per layer and token:
- its guards skip the module globals it reads (this package's functions, ``HybridState``'s
  dataclass fields, ``transformers``' functions): they cannot change in a running process unless
  someone patches them, and checking them costs more than the step's arithmetic. Guards on the
  layer, its parameters, the state and the inputs (shapes, dtypes, devices, grad mode) stay.
- on a CPU the wrapper that launches the kernels is C++ (inductor's ``cpp_wrapper``), not Python.

Each new batch size, dtype or layer configuration compiles once more (a new batch size after the
first makes the batch dimension symbolic); past dynamo's recompile limit (8 per process) the step
runs eagerly, with dynamo's warning.
"""

from __future__ import annotations

import torch

from kernels import HybridState

_COMPILED: dict[str, object] = {}


class LayerStep:
    """What one decoder layer's decoding step hands its ``HybridAttention`` (the ``layer_step``
    keyword, which Hugging Face decoder layers pass on to their attention module): the layer's state
    before the step, replaced by the state after it, and ``HybridAttention.gate_folding()``'s
    projection (computed outside the graph: its cache check reads tensor addresses)."""

    __slots__ = ("state", "folded")

    def __init__(self, state: HybridState, folded):
        self.state, self.folded = state, folded


def _decoder_layer_step(decoder_layer, hidden_states, position_embeddings, step: LayerStep):
    hidden_states = decoder_layer(hidden_states, position_embeddings=position_embeddings, layer_step=step)
    return hidden_states, step.state


def eager_layer_step(decoder_layer, hidden_states, position_embeddings, step: LayerStep):
    """One decoder layer's decoding step, eagerly: (hidden states [B, 1, hidden], the new state)."""
    return _decoder_layer_step(decoder_layer, hidden_states, position_embeddings, step)


def compiled_layer_step(device: torch.device):
    """``eager_layer_step`` compiled for ``device``'s type (compiled on first use: seconds on a CPU;
    once per process, then once more per new batch size, dtype or layer configuration)."""
    kind = torch.device(device).type
    step = _COMPILED.get(kind)
    if step is None:
        options = {"guard_filter_fn": torch.compiler.skip_guard_on_globals_unsafe}
        if kind == "cpu":
            options["cpp_wrapper"] = True
        step = _COMPILED[kind] = torch.compile(_decoder_layer_step, fullgraph=True, options=options)
    return step
