import pytest
import torch

import kernels
from tests.kernels.test_forms import make_inputs


def call(**over):
    inp = make_inputs(1, 2, 2, 5, 4, 4, dtype=torch.float32)
    kw = dict(window=4, sink_tokens=1, mode="hybrid", combine="gate", backend="auto")
    kw.update(over)
    tensors = {k: kw.pop(k) for k in list(kw) if k in inp}
    inp.update(tensors)
    return kernels.hybrid_attention(**inp, **kw)


@pytest.mark.parametrize("over,field", [
    (dict(window=0), "window"), (dict(sink_tokens=-1), "sink_tokens"), (dict(mode="linear"), "mode"),
    (dict(combine="sum"), "combine"), (dict(backend="cuda"), "backend"), (dict(chunk_size=48), "chunk_size"),
])
def test_bad_options_name_the_field_and_allowed_values(over, field):
    with pytest.raises(ValueError, match=field) as err:
        call(**over)
    assert "allowed values" in str(err.value)


def test_head_dim_mismatch_is_named():
    with pytest.raises(ValueError, match="head dim"):
        call(k=torch.randn(1, 2, 5, 8))


def test_bad_gqa_grouping_and_gate_shape():
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        call(k=torch.randn(1, 3, 5, 4), v=torch.randn(1, 3, 5, 4))
    with pytest.raises(ValueError, match="i_gate must have shape"):
        call(i_gate=torch.randn(1, 2, 4))


def test_triton_backend_without_cuda_or_interpreter_names_the_reason(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("CUDA is present: the Triton backend is available")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend='triton' cannot run here: it needs a CUDA device") as err:
        call(backend="triton")
    assert "backend='torch'" in str(err.value)


@pytest.mark.parametrize("inputs,reason", [
    (dict(q=torch.randn(1, 2, 5, 4), k=torch.randn(1, 2, 5, 4)), "q/k head dim 4 is outside 16..256"),
    (dict(v=torch.randn(1, 2, 5, 300)), "v head dim 300 is outside 16..256"),
    (dict(q=torch.randn(1, 2, 5, 16, dtype=torch.float64), k=torch.randn(1, 2, 5, 16, dtype=torch.float64),
          v=torch.randn(1, 2, 5, 16, dtype=torch.float64)), "dtype torch.float64 is not supported"),
])
def test_triton_backend_refuses_unsupported_inputs_with_the_reason(inputs, reason):
    full = dict(q=torch.randn(1, 2, 5, 16), k=torch.randn(1, 2, 5, 16), v=torch.randn(1, 2, 5, 16))
    full.update(inputs)
    with pytest.raises(ValueError, match="backend='triton'") as err:
        call(backend="triton", **full)
    assert reason in str(err.value)


def test_triton_function_called_directly_checks_its_inputs_too():
    from kernels.triton_hybrid import hybrid_attention_triton

    inputs = make_inputs(1, 2, 2, 5, 16, 16, dtype=torch.float32)
    with pytest.raises(ValueError, match="chunk_size=48 is not a power of two in 16..128"):
        hybrid_attention_triton(**inputs, window=4, sink_tokens=1, chunk_size=48)
    with pytest.raises(ValueError, match="chunk_size=8 is not a power of two in 16..128"):
        kernels.hybrid_attention(**inputs, window=4, sink_tokens=1, backend="triton", chunk_size=8)


def test_auto_picks_triton_only_on_cuda():
    assert kernels.resolve_backend("auto", torch.device("cpu"), torch.float32, 64, 64, 64) == "torch"
    if torch.cuda.is_available():
        cuda = torch.device("cuda")
        assert kernels.resolve_backend("auto", cuda, torch.bfloat16, 64, 64, 64) == "triton"
        # what Triton cannot serve falls back to the torch path rather than failing
        assert kernels.resolve_backend("auto", cuda, torch.float64, 64, 64, 64) == "torch"
        assert kernels.resolve_backend("auto", cuda, torch.float32, 8, 8, 64) == "torch"


def test_auto_uses_chunkwise_and_matches_reference():
    a = call(backend="auto")
    b = call(backend="reference")
    assert torch.allclose(a, b, atol=1e-5)
