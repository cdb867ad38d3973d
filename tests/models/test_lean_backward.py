"""Modules with a lean backward: the teacher's gated MLP and RMS norm outputs and gradients
(float64), fewer saved tensors, the plain path where a projection is wrapped, other norms left alone."""

import pytest
import torch

from models import HybridConfig, convert_to_hybrid
from models.lean_backward import LeanGatedMLP, LeanRMSNorm, lean_gated_mlps, lean_rms_norms
from tests.conftest import FAMILIES, make_teacher


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_lean_mlp_gives_the_teacher_mlps_outputs_and_gradients(family):
    teacher = make_teacher(family, mlp_bias=True) if family == "llama" else make_teacher(family)
    plain = teacher.model.layers[0].mlp.double()
    lean = LeanGatedMLP(plain)
    x = torch.randn(2, 9, plain.gate_proj.in_features, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(2, 9, plain.down_proj.out_features, dtype=torch.float64)
    params = [x, *plain.parameters()]
    expected = plain(x)
    expected_grads = torch.autograd.grad(expected, params, grad_out)
    got = lean(x)
    got_grads = torch.autograd.grad(got, params, grad_out)
    assert torch.equal(got, expected)  # the same ops in the same order
    for g, e in zip(got_grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


def test_lean_mlp_keeps_half_the_intermediate_tensors():
    mlp = make_teacher("llama").model.layers[0].mlp
    ff = mlp.gate_proj.out_features
    x = torch.randn(3, 7, mlp.gate_proj.in_features, requires_grad=True)

    def saved_intermediate(module):
        weights = {p.untyped_storage().data_ptr() for p in module.parameters()}
        kept = set()

        def pack(t):
            if t.untyped_storage().data_ptr() not in weights and t.numel() == 3 * 7 * ff:
                kept.add(t.untyped_storage().data_ptr())
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            module(x)
        return len(kept)

    # gate, up (lean) against gate, silu(gate), up, product (plain); the weights are not counted
    assert saved_intermediate(LeanGatedMLP(mlp)) == 2
    assert saved_intermediate(mlp) == 4


def test_student_gets_lean_mlps_and_a_lora_wrapped_projection_takes_the_plain_path():
    student = convert_to_hybrid(make_teacher("llama"), HybridConfig(window=4, sink_tokens=1))
    ids = torch.randint(0, 97, (2, 10))
    before = student(ids).logits
    assert lean_gated_mlps(student) == 2 and lean_gated_mlps(student) == 0  # once per layer
    assert all(isinstance(layer.mlp, LeanGatedMLP) for layer in student.lm.model.layers)
    assert torch.equal(student(ids).logits, before)
    assert all(".mlp.gate_proj.weight" in n or ".mlp." not in n for n, _ in student.named_parameters()
               if n.endswith("gate_proj.weight"))
    from peft import LoraConfig, inject_adapter_in_model

    inject_adapter_in_model(LoraConfig(r=2, target_modules=["down_proj"]), student.lm)
    student(ids).logits.sum().backward()  # the LoRA-wrapped down projection: the plain computation
    assert all(layer.mlp.down_proj.lora_A["default"].weight.grad is not None for layer in student.lm.model.layers)


def test_an_mlp_with_another_activation_is_left_alone():
    teacher = make_teacher("llama", hidden_act="gelu")
    assert lean_gated_mlps(teacher) == 0


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_lean_norm_gives_the_teacher_norms_outputs_and_gradients_and_olmo2_is_left_alone(family):
    teacher = make_teacher(family).double()
    replaced = lean_rms_norms(teacher)
    assert replaced == (0 if family == "olmo2" else 2 * 2)  # two norms per layer, two layers
    if family == "olmo2":
        return
    plain = make_teacher(family).double().model.layers[0].input_layernorm
    with torch.no_grad():
        plain.weight.normal_(1.0, 0.3)
    lean = LeanRMSNorm(plain)
    x = torch.randn(2, 9, plain.weight.shape[0], dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(2, 9, plain.weight.shape[0], dtype=torch.float64)
    expected = plain(x)
    expected_grads = torch.autograd.grad(expected, [x, plain.weight], grad_out)
    got = lean(x)
    assert torch.equal(got, expected)
    for g, e in zip(torch.autograd.grad(got, [x, plain.weight], grad_out), expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)  # both norms compute in float32, as HF's does
    with torch.no_grad():
        assert torch.equal(lean(x), expected)


def test_lean_norm_keeps_one_tensor_of_the_hidden_size():
    norm = make_teacher("llama").model.layers[0].input_layernorm
    x = torch.randn(3, 7, norm.weight.shape[0], requires_grad=True)

    def saved_full_size(module):
        kept = set()

        def pack(t):
            if t.numel() == x.numel():
                kept.add(t.untyped_storage().data_ptr())
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            module(x)
        return len(kept)
    assert saved_full_size(LeanRMSNorm(norm)) == 1 and saved_full_size(norm) == 2


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_lean_norm_then_mlp_gives_the_teachers_outputs_and_gradients_without_keeping_the_norms_output(family):
    teacher = make_teacher(family, mlp_bias=True) if family == "llama" else make_teacher(family)
    layer = teacher.model.layers[0].double()
    norm, mlp = layer.post_attention_layernorm, layer.mlp
    if type(norm).__name__ not in ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"):
        pytest.skip(f"{type(norm).__name__} is not made lean")
    torch.nn.init.normal_(norm.weight, 1.0, 0.3)
    lean_norm, lean_mlp = LeanRMSNorm(norm), LeanGatedMLP(mlp)
    x = torch.randn(2, 9, norm.weight.shape[0], dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(2, 9, mlp.down_proj.out_features, dtype=torch.float64)
    params = [x, norm.weight, *mlp.parameters()]
    expected = mlp(norm(x))
    expected_grads = torch.autograd.grad(expected, params, grad_out)

    normed = {}

    def pack(t):
        normed.setdefault("kept", False)
        normed["kept"] |= t.untyped_storage().data_ptr() == normed.get("ptr")
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = lean_norm(x)
        normed["ptr"] = y.untyped_storage().data_ptr()
        got = lean_mlp(y)
    got_grads = torch.autograd.grad(got, params, grad_out)
    assert normed["kept"] is False  # the MLP kept the norm's input and 1 / rms, not its output
    assert torch.equal(got, expected)
    for g, e in zip(got_grads[:2], expected_grads[:2]):  # through the norm: float32, as HF's computes it
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    for g, e in zip(got_grads[2:], expected_grads[2:]):  # the MLP's weights: from the rebuilt output
        torch.testing.assert_close(g, e, rtol=1e-12, atol=1e-12)


def test_a_norm_output_changed_in_place_is_kept_not_rebuilt():
    layer = make_teacher("llama").model.layers[0].double()
    lean_norm, lean_mlp = LeanRMSNorm(layer.post_attention_layernorm), LeanGatedMLP(layer.mlp)
    x = torch.randn(2, 5, layer.mlp.gate_proj.in_features, dtype=torch.float64, requires_grad=True)
    y = lean_norm(x) * 1.0
    y_lean = lean_norm(x)
    y_lean.add_(1.0)  # the rebuilt output would miss this: the MLP must keep the tensor itself
    expected = torch.autograd.grad(layer.mlp(y + 1.0).sum(), layer.mlp.gate_proj.weight)[0]
    got = torch.autograd.grad(lean_mlp(y_lean).sum(), layer.mlp.gate_proj.weight)[0]
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
