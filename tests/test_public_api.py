"""The names DESIGN §6 promises to outside tools, with their signatures."""

import inspect

import kernels
import kernels.reference
import models


def test_models_public_names():
    for name in ("HybridConfig", "load_teacher", "convert_to_hybrid", "save_student", "load_student", "generate"):
        assert hasattr(models, name), name
    params = inspect.signature(models.generate).parameters
    assert list(params)[:7] == ["model", "input_ids", "max_new_tokens", "do_sample", "temperature", "top_p",
                                "eos_token_id"]
    assert {"mode", "combine", "window", "sink_tokens", "chunk_size", "backend"} <= set(
        inspect.signature(models.HybridConfig).parameters)


def test_kernel_signatures():
    for fn in (kernels.hybrid_attention, kernels.reference.hybrid_attention):
        params = inspect.signature(fn).parameters
        assert list(params)[:6] == ["q", "k", "v", "i_gate", "f_gate", "g_gate"]
        for kw in ("window", "sink_tokens", "mode", "combine", "backend"):
            assert params[kw].kind is inspect.Parameter.KEYWORD_ONLY
    assert inspect.signature(kernels.hybrid_attention).parameters["backend"].default == "auto"
