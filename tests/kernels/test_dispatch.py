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


def test_triton_backend_says_why_it_is_unavailable():
    with pytest.raises(ValueError, match="triton"):
        call(backend="triton")


def test_auto_uses_chunkwise_and_matches_reference():
    a = call(backend="auto")
    b = call(backend="reference")
    assert torch.allclose(a, b, atol=1e-5)
