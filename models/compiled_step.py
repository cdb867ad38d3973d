"""The hybrid layer's decoding step as one compiled graph.

Eagerly, a decoding step of a hybrid layer is several dozen tensor ops on a few thousand numbers
(projections, gates, RoPE, feature maps, the memory update, the window softmax, the mix), and on a
CPU each op costs microseconds of dispatch: more than the teacher's attention, which is a handful of
ops. ``torch.compile`` turns the whole step (``HybridAttention.decode_step``) into one graph whose
elementwise work fuses into a few kernels: one graph serves every layer of a model (the layer is an
input, not a constant), and the state stays a ``HybridState``, so compiled and eager steps mix.

Two choices keep the call cheap, because this graph is entered once per layer and token:
- its guards skip the module globals it reads (this package's functions, ``HybridState``'s
  dataclass fields, ``transformers``' RoPE): they cannot change in a running process unless someone
  patches them, and checking them costs more than the step's arithmetic. Guards on the layer, its
  parameters, the state and the inputs (shapes, dtypes, devices, grad mode) stay.
- on a CPU the wrapper that launches the kernels is C++ (inductor's ``cpp_wrapper``), not Python.

Each new batch size, dtype or layer configuration compiles once more (a new batch size after the
first makes the batch dimension symbolic); past dynamo's recompile limit (8 per process) the step
runs eagerly, with dynamo's warning.
"""

from __future__ import annotations

import torch

_COMPILED: dict[str, object] = {}


def _decode_step(layer, hidden_states, position_embeddings, state, folded):
    return layer.decode_step(hidden_states, position_embeddings, state, folded)


def compiled_decode_step(device: torch.device):
    """``HybridAttention.decode_step`` compiled for ``device``'s type (compiled on first use: seconds
    on a CPU; once per process, then once more per new batch size or dtype)."""
    kind = torch.device(device).type
    step = _COMPILED.get(kind)
    if step is None:
        options = {"guard_filter_fn": torch.compiler.skip_guard_on_globals_unsafe}
        if kind == "cpu":
            options["cpp_wrapper"] = True
        step = _COMPILED[kind] = torch.compile(_decode_step, fullgraph=True, options=options)
    return step
