"""The compiled decoding step (models.compiled_step) against the parallel forward and the eager step."""

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from models import HybridConfig, convert_to_hybrid, prefill
from models.config import PREVIOUS_LAYER
from tests.conftest import make_teacher, rel_err


@pytest.fixture(autouse=True)
def fresh_compiler():
    # every test compiles its own graph: dynamo's caches (and its recompile limit) are per process
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def make_student(family="llama", **cfg):
    student = convert_to_hybrid(make_teacher(family), HybridConfig(chunk_size=16, **cfg)).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # gates, mix and feature maps away from their initial values: every branch matters
        for layer in student.lm.model.layers:
            attn = layer.self_attn
            for name, p in attn.named_parameters():
                if name.startswith(("hybrid_gates", "mix_gate", "feature_maps", "mlstm_norm")):
                    p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return student


def stepwise(student, ids, start):
    """Logits of positions start-1 .. T-2 from a prefill of ids[:, :start] and one step per token."""
    with torch.no_grad():
        logits, state = prefill(student, ids[:, :start])
        out = [logits]
        for t in range(start, ids.shape[1] - 1):
            out.append(student(ids[:, t:t + 1], decode_state=state).logits[:, -1])
    return torch.stack(out, 1), state


def check_compiled_matches(student, batch=2, length=30, start=11):
    ids = torch.randint(0, 97, (batch, length), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        parallel = student(ids).logits[:, start - 1:-1]
    eager, eager_state = stepwise(student, ids, start)
    compiled, compiled_state = stepwise(student.compile_decode_step(), ids, start)
    student.compile_decode_step(False)
    assert counters["stats"]["unique_graphs"] >= 1, "the decoding step did not go through the compiler"
    assert rel_err(compiled, parallel) < 1e-5
    assert rel_err(compiled, eager) < 1e-5
    for eager_layer, compiled_layer in zip(eager_state.layers, compiled_state.layers):
        for name, t in eager_layer.tensors().items():
            other = compiled_layer.tensors()[name]
            if t.is_floating_point():
                assert rel_err(other, t) < 1e-5, name
            else:
                assert torch.equal(other, t), name
    return compiled


def test_compiled_step_of_the_paper_layer_equals_the_parallel_forward():
    """The default layer (hybrid/gate, softmax feature maps, mix gate on q/k/v folded into one
    projection) on a GQA Llama: every step's logits and the final state, compiled vs eager vs parallel."""
    check_compiled_matches(make_student(window=8, sink_tokens=2))


def test_one_graph_serves_every_layer():
    student = make_student(window=8, sink_tokens=2)
    check_compiled_matches(student)
    # two hybrid layers, many steps: compiled once (a recompile per layer would cost seconds each)
    assert counters["stats"]["unique_graphs"] == 1


def test_each_decoder_layer_steps_as_one_compiled_call(monkeypatch):
    """The compiled graph is the whole decoder layer (norms, attention step, MLP, residuals), one
    call per hybrid layer and token; a layer kept as full attention steps eagerly beside them."""
    import models.student as student_module

    calls = []
    real = student_module.compiled_layer_step

    def recording(device):
        step = real(device)

        def call(layer, hidden_states, position_embeddings, layer_step):
            calls.append(layer)
            return step(layer, hidden_states, position_embeddings, layer_step)
        return call

    monkeypatch.setattr(student_module, "compiled_layer_step", recording)
    student = make_student(window=8, sink_tokens=2, full_attention_layers=[0])
    layers = list(student.lm.model.layers)
    check_compiled_matches(student, length=20, start=11)
    steps = 20 - 1 - 11
    assert calls == layers[1:] * steps  # the decoder layer itself, not its attention module
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("family,cfg", [
    ("qwen2", {}),  # q/k/v biases: the folded gate carries them
    ("qwen3", {}),  # per-head q/k norms: the mix gate cannot fold and is computed from q, k, v in the graph
    ("olmo2", {}),  # norms over the whole projection
    ("llama", {"combine": "shared_norm"}),
    ("llama", {"mode": "mlstm", "memory_norm": "rms"}),
    ("llama", {"mode": "swa", "window": 5, "sink_tokens": 0}),
    ("llama", dict(PREVIOUS_LAYER)),  # no feature maps, RMS memory norm, gates from the layer input
    ("llama", {"full_attention_layers": [0]}),  # a kept softmax layer stays eager beside a compiled one
], ids=["qwen2", "qwen3", "olmo2", "shared_norm", "mlstm", "swa", "previous-layer", "full-layer"])
def test_compiled_step_equals_the_parallel_forward_in_every_variant(family, cfg):
    check_compiled_matches(make_student(family, **{"window": 8, "sink_tokens": 2, **cfg}))


@pytest.mark.slow
def test_a_new_batch_size_recompiles_and_still_matches():
    student = make_student(window=8, sink_tokens=2)
    check_compiled_matches(student, batch=2)
    check_compiled_matches(student, batch=3)
