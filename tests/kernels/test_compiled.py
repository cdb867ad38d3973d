"""backend="compiled": the chunkwise form through torch.compile equals the float64 quadratic reference,
outputs and every input's gradient, and hands the decode step the eager form's state.

Each case compiles its own graph (10-30 s on 2 CPU cores), so the fast suite runs the paper's layer
with gradients and the no-grad prefill of two combinations; the other modes are ``slow``."""

import dataclasses

import pytest
import torch

from kernels import hybrid_attention, hybrid_attention_chunkwise, reference
from kernels.chunkwise import chunkwise_outputs
from kernels.compiled import hybrid_attention_compiled
from tests.conftest import rel_err
from tests.kernels.test_forms import feature_mapped, make_inputs

PAPER_LAYER = dict(window=8, sink_tokens=3, mode="hybrid", combine="gate", chunk_size=16, memory_norm="none")


def paper_inputs(T, requires_grad=False):
    """GQA (4 query heads on 2 key/value heads), feature-mapped memory queries and keys, float64."""
    inputs = make_inputs(2, 4, 2, T, 8, 8)
    inputs.update(feature_mapped(inputs))
    return {name: x.requires_grad_(requires_grad) for name, x in inputs.items()}


def reference_output(inputs, opts):
    return reference.hybrid_attention(**inputs, **{k: v for k, v in opts.items() if k != "chunk_size"})


def test_compiled_op_equals_the_reference_outputs_and_gradients_over_segments_and_a_partial_chunk():
    # 77 tokens: 4 whole chunks and a partial one, in segments of 32 (the state carried between them)
    inputs = paper_inputs(77, requires_grad=True)
    out = hybrid_attention_compiled(**inputs, segment_tokens=32, **PAPER_LAYER)
    expected = reference_output(inputs, PAPER_LAYER)
    assert rel_err(out, expected) < 1e-10
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    names = list(inputs)
    grads = torch.autograd.grad(out, [inputs[n] for n in names], grad_out)
    expected_grads = torch.autograd.grad(expected, [inputs[n] for n in names], grad_out)
    for name, grad, want in zip(names, grads, expected_grads):
        assert rel_err(grad, want) < 1e-10, name


@pytest.mark.parametrize("combine,memory_norm", [("gate", "none"), ("shared_norm", "rms")])
def test_compiled_prefill_without_gradients_gives_the_reference_output_and_the_eager_state(combine, memory_norm):
    """The no-grad graph (prefill) at a length ending in a partial chunk: torch 2.13's Inductor
    miscompiled exactly this (garbage in the last chunk) until the inputs were padded to whole chunks
    outside the graph; the state's padded positions must leave it as the eager form's."""
    opts = {**PAPER_LAYER, "combine": combine, "memory_norm": memory_norm}
    inputs = paper_inputs(45)
    with torch.no_grad():
        out, state = hybrid_attention(**inputs, backend="compiled", return_state=True, **opts)
        expected = reference_output(inputs, opts)
        _, eager_state = hybrid_attention_chunkwise(**inputs, return_state=True, **opts)
    assert rel_err(out, expected) < 1e-10
    for field in dataclasses.fields(state):
        got, want = getattr(state, field.name), getattr(eager_state, field.name)
        if isinstance(want, torch.Tensor):
            assert got.shape == want.shape and got.dtype == want.dtype, field.name
            assert torch.allclose(got, want, rtol=1e-10, atol=1e-12), field.name
        else:
            assert got == want, field.name


def test_the_op_compiles_as_one_graph_without_breaks():
    """The whole op, both branches and the mix, is one graph: a break would leave its pieces eager."""
    inputs = paper_inputs(45)
    options = {**PAPER_LAYER, "scale": None, "norm_weight": None, "norm_eps": 1e-6, "eps": 1e-6,
               "segment_tokens": None, "window_form": "auto"}
    torch._dynamo.reset()
    explained = torch._dynamo.explain(chunkwise_outputs)(**inputs, **options)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


@pytest.mark.slow
@pytest.mark.parametrize("mode,combine,memory_norm", [("mlstm", "gate", "rms"), ("swa", "gate", "none"),
                                                      ("hybrid", "gate", "rms"), ("hybrid", "shared_norm", "rms")])
def test_every_variant_compiled_equals_the_reference(mode, combine, memory_norm):
    opts = {**PAPER_LAYER, "mode": mode, "combine": combine, "memory_norm": memory_norm}
    inputs = paper_inputs(45, requires_grad=True)
    opts["norm_weight"] = torch.linspace(0.5, 1.5, 4 * 8, dtype=torch.float64).view(4, 8) if memory_norm == "rms" else None
    out = hybrid_attention(**inputs, backend="compiled", **opts)
    expected = reference_output(inputs, opts)
    assert rel_err(out, expected) < 1e-10
    names = list(inputs)
    grads = torch.autograd.grad(out, [inputs[n] for n in names], torch.ones_like(out), allow_unused=True)
    expected_grads = torch.autograd.grad(expected, [inputs[n] for n in names], torch.ones_like(out),
                                         allow_unused=True)
    for name, grad, want in zip(names, grads, expected_grads):
        if want is None or grad is None:  # an input the variant does not read (swa's gates, mlstm's q, k)
            assert grad is None or not grad.any(), name
            continue
        assert rel_err(grad, want) < 1e-9, name
