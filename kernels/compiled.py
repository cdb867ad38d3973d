"""The chunkwise torch form through ``torch.compile`` (``backend="compiled"``).

The chunkwise form is a few dozen small ops per segment (gates, decays, masks, exponentials, the
mix) between its matrix products; eagerly each reads and writes its tensor once and pays its own
dispatch, which on a CPU costs as much as the products at the lengths a prompt or a training
sequence has. Compiled, Inductor fuses those chains into a handful of loops, forward and backward,
and leaves the products and the window's SDPA call to the same library kernels: on 2 CPU cores one
SmolLM2 layer's op took 0.73-0.76x the eager time forward and backward from 256 to 2k tokens, but
1.05x at 4k (docs/performance.md, "The compiled op"). The maths is ``chunkwise_outputs``' own.

A graph is compiled per input shape (the loop over chunks unrolls; 10-40 s on 2 CPU cores) and
reused by every layer of that shape: it pays where shapes repeat (training at a fixed sequence
length, prompts of one length); torch's recompile limit sends further new shapes to the eager form.
"""

from __future__ import annotations

import functools

import torch

from .chunkwise import pad_time, chunkwise_outputs, hybrid_attention_chunkwise


@functools.cache
def compiled_outputs():
    """``chunkwise_outputs`` compiled once per process (each input shape gets its own graph)."""
    return torch.compile(chunkwise_outputs, dynamic=False)


def _padded_outputs(q, k, v, i_gate, f_gate, g_gate, *, chunk_size, mq, mk, **options):
    """The compiled graph on inputs padded to whole chunks, its output cut back to T positions.

    Inductor (torch 2.13, CPU) miscompiled the no-grad graph whose inputs end in a partial chunk: the
    last chunk's outputs came out as garbage (NaN or values of 1e32) in the gate mix without a memory
    norm, where the eager form and the graph with gradients were right. Padded here, outside the
    graph, every graph sees whole chunks; ``length`` tells it where the real positions end, so the
    padding leaves the memory state as it was after the last real one."""
    T = q.shape[2]
    pad = (-T) % chunk_size
    length = None
    if pad:
        q, k, v, mq, mk, i_gate, f_gate, g_gate = (None if x is None else pad_time(x, pad)
                                                   for x in (q, k, v, mq, mk, i_gate, f_gate, g_gate))
        length = torch.tensor(T, device=q.device)  # a tensor: prompts of 45 and 46 tokens share the graph of 48
    out, state = compiled_outputs()(q, k, v, i_gate, f_gate, g_gate, chunk_size=chunk_size, mq=mq, mk=mk,
                                    length=length, **options)
    return out[:, :, :T], state


def hybrid_attention_compiled(q, k, v, i_gate, f_gate, g_gate, **options):
    """``hybrid_attention_chunkwise`` with its outputs from the compiled graph: same arguments, same
    result (and decode state with ``return_state=True``)."""
    return hybrid_attention_chunkwise(q, k, v, i_gate, f_gate, g_gate, outputs=_padded_outputs, **options)
