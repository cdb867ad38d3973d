"""Invariant 1 and conversion behaviour on tiny teachers of every supported family."""

import pytest
import torch
import transformers as tf

from models import HybridAttention, HybridConfig, convert_to_hybrid, get_adapter
from tests.conftest import FAMILIES, make_teacher, rel_err


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_swa_with_full_window_reproduces_teacher_logits(family, backend):
    teacher = make_teacher(family)
    ids = torch.randint(0, 97, (2, 45), generator=torch.Generator().manual_seed(1))
    student = convert_to_hybrid(teacher, HybridConfig(mode="swa", window=64, sink_tokens=0, chunk_size=16,
                                                      backend=backend))
    with torch.no_grad():
        expected = teacher(ids).logits
        got = student(ids).logits
    assert got.shape == expected.shape
    assert rel_err(got, expected) < 1e-5


@pytest.mark.parametrize("family", ["qwen2", "olmo2"])
def test_kept_full_attention_layers_reproduce_teacher(family):
    teacher = make_teacher(family)
    ids = torch.randint(0, 97, (1, 70))
    student = convert_to_hybrid(teacher, HybridConfig(mode="swa", window=80, sink_tokens=0, full_attention_layers=[1]))
    assert type(student.lm.model.layers[1].self_attn).__name__ == "FullAttention"
    with torch.no_grad():
        assert rel_err(student(ids).logits, teacher(ids).logits) < 1e-5


def test_short_window_differs_from_teacher_and_hybrid_starts_close():
    teacher = make_teacher("llama")
    ids = torch.randint(0, 97, (1, 120))
    with torch.no_grad():
        ref = teacher(ids).logits
        swa = convert_to_hybrid(teacher, HybridConfig(mode="swa", window=8, sink_tokens=0))(ids).logits
        hyb = convert_to_hybrid(teacher, HybridConfig(mode="hybrid", window=8, sink_tokens=0))(ids).logits
    assert rel_err(swa, ref) > 1e-3  # the window really truncates context
    # mix gate bias -4: the fresh hybrid is within a few percent of its windowed teacher
    assert rel_err(hyb, swa) < 0.1


def test_teacher_is_untouched_and_weights_are_copied():
    teacher = make_teacher("qwen3")
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = convert_to_hybrid(teacher, HybridConfig())
    assert all(type(layer.self_attn).__name__ == "Qwen3Attention" for layer in teacher.model.layers)
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k])
    s_attn, t_attn = student.lm.model.layers[0].self_attn, teacher.model.layers[0].self_attn
    assert isinstance(s_attn, HybridAttention)
    assert torch.equal(s_attn.q_proj.weight, t_attn.q_proj.weight)
    assert s_attn.q_proj.weight.data_ptr() != t_attn.q_proj.weight.data_ptr()
    assert torch.equal(s_attn.q_norm.weight, t_attn.q_norm.weight)
    # training the student does not move the teacher
    ids = torch.randint(0, 97, (1, 20))
    student.train()
    student(ids, labels=ids).loss.backward()
    assert s_attn.hybrid_gates.weight.grad is not None and s_attn.hybrid_gates.weight.grad.abs().sum() > 0
    assert teacher.model.layers[0].self_attn.q_proj.weight.grad is None


@pytest.mark.parametrize("gate_input", ["hidden", "qkv"])
def test_new_gate_initialisation(gate_input):
    teacher = make_teacher("llama")
    cfg = HybridConfig(mix_gate_bias_init=-3.0, forget_gate_bias_init=(2.0, 5.0), input_gate_bias_init=-1.0,
                       gate_input=gate_input, feature_map_init_scale=0.5)
    attn = convert_to_hybrid(teacher, cfg).lm.model.layers[0].self_attn
    H, Hkv, D = 4, 2, 16
    assert torch.all(attn.hybrid_gates.weight == 0)
    assert torch.allclose(attn.hybrid_gates.bias[:H], torch.full((H,), -1.0))
    assert torch.allclose(attn.hybrid_gates.bias[H:2 * H], torch.linspace(2.0, 5.0, H))
    if gate_input == "hidden":
        assert attn.hybrid_gates.bias.shape == (3 * H,) and not hasattr(attn, "mix_gate_weight")
        assert torch.allclose(attn.hybrid_gates.bias[2 * H:], torch.full((H,), -3.0))
    else:  # one weight per head over [q; k; v], zero, and the bias
        assert attn.hybrid_gates.bias.shape == (2 * H,)
        assert attn.mix_gate_weight.shape == (H, 3 * D) and torch.all(attn.mix_gate_weight == 0)
        assert torch.allclose(attn.mix_gate_bias, torch.full((H,), -3.0))
    # feature maps: separate per query head and per key head, W = scale * identity, b = 0
    assert attn.feature_maps.weight.shape == (H + Hkv, D, D)
    assert torch.equal(attn.feature_maps.weight, 0.5 * torch.eye(D).expand(H + Hkv, D, D))
    assert torch.all(attn.feature_maps.bias == 0)
    assert not hasattr(attn, "mlstm_norm_weight")  # memory_norm "none"
    names = {n.split(".", 1)[1] if n.startswith("feature_maps") else n for n, _ in attn.new_named_parameters()}
    expected = {"hybrid_gates.weight", "hybrid_gates.bias", "weight", "bias"}
    assert names == (expected | ({"mix_gate_weight", "mix_gate_bias"} if gate_input == "qkv" else set()))


def test_mix_gate_from_qkv_reads_each_heads_own_q_k_v():
    """o_h = sigmoid(w_h . [q_h; k_g(h); v_g(h)] + b_h), with q, k before RoPE and GQA's key head
    g(h) = h // (H / Hkv): checked against a loop over heads written from the formula."""
    attn = convert_to_hybrid(make_teacher("llama"), HybridConfig()).lm.model.layers[0].self_attn
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        attn.mix_gate_weight.copy_(torch.randn(attn.mix_gate_weight.shape, generator=g))
        attn.mix_gate_bias.copy_(torch.randn(attn.mix_gate_bias.shape, generator=g))
    q, k, v = torch.randn(2, 4, 5, 16, generator=g), torch.randn(2, 2, 5, 16, generator=g), torch.randn(2, 2, 5, 16,
                                                                                                       generator=g)
    got = attn.mix_gate_from_qkv(q, k, v)
    for h in range(4):
        x = torch.cat([q[:, h], k[:, h // 2], v[:, h // 2]], -1)  # [B, T, 3D]
        assert torch.allclose(got[:, h], x @ attn.mix_gate_weight[h] + attn.mix_gate_bias[h], atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_feature_maps_are_each_heads_softmax_of_its_own_map(dtype):
    """phi_h(x) = softmax(x W_h + b_h) over the feature dimension, query head h with map h and key
    head j with map Hq + j: outputs and gradients (inputs, weights, biases) against a float64 loop
    over heads written from the formula. Strided inputs (q, k as RoPE hands them over) included."""
    from models.hybrid_layer import FeatureMaps

    Hq, Hk, D = 4, 2, 8
    g = torch.Generator().manual_seed(0)
    maps = FeatureMaps(Hq, Hk, D, 1.0)
    with torch.no_grad():
        maps.weight.copy_(torch.randn(maps.weight.shape, generator=g))
        maps.bias.copy_(torch.randn(maps.bias.shape, generator=g))
    maps.to(dtype)
    q = torch.randn(2, 5, Hq, D, generator=g).transpose(1, 2).to(dtype).requires_grad_()  # [B, Hq, T, D], strided
    k = torch.randn(2, Hk, 5, D, generator=g).to(dtype).requires_grad_()
    phi_q, phi_k = maps(q, k)
    assert phi_q.shape == q.shape and phi_k.shape == k.shape and phi_q.dtype == dtype
    ((phi_q * torch.arange(D)).sum() + (phi_k ** 2).sum()).backward()

    w, b = (x.detach().double().requires_grad_() for x in (maps.weight, maps.bias))
    q64, k64 = (x.detach().double().requires_grad_() for x in (q, k))
    ref_q = torch.stack([torch.softmax(q64[:, h] @ w[h] + b[h], -1) for h in range(Hq)], 1)
    ref_k = torch.stack([torch.softmax(k64[:, j] @ w[Hq + j] + b[Hq + j], -1) for j in range(Hk)], 1)
    ((ref_q * torch.arange(D)).sum() + (ref_k ** 2).sum()).backward()
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for got, ref in ((phi_q, ref_q), (phi_k, ref_k), (q.grad, q64.grad), (k.grad, k64.grad),
                     (maps.weight.grad, w.grad), (maps.bias.grad, b.grad)):
        assert torch.allclose(got.double(), ref.detach(), atol=tol, rtol=tol)


@pytest.mark.parametrize("mode,combine", [("hybrid", "gate"), ("hybrid", "shared_norm"), ("mlstm", "gate")])
def test_extreme_gate_weights_give_finite_outputs_and_gradients(mode, combine):
    student = convert_to_hybrid(make_teacher("llama"), HybridConfig(mode=mode, combine=combine, window=4))
    for layer in student.lm.model.layers:
        with torch.no_grad():
            layer.self_attn.hybrid_gates.bias.fill_(100.0)
            if hasattr(layer.self_attn, "mix_gate_bias"):
                layer.self_attn.mix_gate_bias.fill_(100.0)
    ids = torch.randint(0, 97, (1, 30))
    loss = student(ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in student.parameters() if p.grad is not None)


def test_unsupported_family_lists_supported_ones():
    config = tf.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)
    gpt2 = tf.AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match="gpt2") as err:
        convert_to_hybrid(gpt2, HybridConfig())
    for family in ("llama", "mistral", "qwen2", "qwen3", "olmo2"):
        assert family in str(err.value)
    with pytest.raises(ValueError, match="supported families"):
        get_adapter(config)


def test_mismatched_head_dims_are_named():
    teacher = make_teacher("llama")
    teacher.config.head_dim = 8  # config now disagrees with the projection weights
    with pytest.raises(ValueError, match="mismatched head dims"):
        convert_to_hybrid(teacher, HybridConfig())


def test_full_attention_layer_out_of_range():
    with pytest.raises(ValueError, match="full_attention_layers"):
        convert_to_hybrid(make_teacher("llama"), HybridConfig(full_attention_layers=[5]))


def test_padded_batch_rows_equal_unpadded_rows():
    student = convert_to_hybrid(make_teacher("llama"), HybridConfig(window=4, sink_tokens=2)).eval()
    a = torch.randint(3, 97, (1, 12))
    b = torch.randint(3, 97, (1, 7))
    with torch.no_grad():
        la, lb = student(a).logits, student(b).logits
        for side in ("left", "right"):
            pad = torch.zeros(1, 5, dtype=torch.long)
            ids_b = torch.cat([pad, b], 1) if side == "left" else torch.cat([b, pad], 1)
            mask_b = (torch.arange(12) >= 5) if side == "left" else (torch.arange(12) < 7)
            ids = torch.cat([a, ids_b])
            mask = torch.stack([torch.ones(12, dtype=torch.bool), mask_b]).long()
            out = student(ids, attention_mask=mask).logits
            assert rel_err(out[0], la[0]) < 1e-6
            assert rel_err(out[1][mask_b], lb[0]) < 1e-6
    with pytest.raises(ValueError, match="contiguous"):
        student(ids, attention_mask=torch.tensor([[1] * 12, [1, 0] * 6]))


def test_hidden_states_follow_hugging_face_layout():
    teacher = make_teacher("llama")
    student = convert_to_hybrid(teacher, HybridConfig(mode="swa", window=64, sink_tokens=0))
    ids = torch.randint(0, 97, (1, 10))
    with torch.no_grad():
        t = teacher(ids, output_hidden_states=True).hidden_states
        s = student(ids, output_hidden_states=True).hidden_states
    assert len(s) == len(t) == 3
    for a, b in zip(s, t):
        assert rel_err(a, b) < 1e-5


@pytest.mark.parametrize("paper_layer", [True, False])
def test_new_parameters_are_exactly_the_gates_feature_maps_and_norms(paper_layer):
    teacher = make_teacher("llama")
    legacy = {} if paper_layer else dict(feature_map="none", memory_norm="rms", gate_input="hidden")
    student = convert_to_hybrid(teacher, HybridConfig(full_attention_layers=[0], **legacy))
    names = sorted(n for n, _ in student.new_parameters())
    prefix = "lm.model.layers.1.self_attn."
    own = (["feature_maps.bias", "feature_maps.weight", "hybrid_gates.bias", "hybrid_gates.weight", "mix_gate_bias",
            "mix_gate_weight"] if paper_layer else ["hybrid_gates.bias", "hybrid_gates.weight", "mlstm_norm_weight"])
    assert names == [prefix + n for n in own]
    n_teacher = sum(p.numel() for p in teacher.parameters())
    n_student = sum(p.numel() for p in student.parameters())
    assert n_student - n_teacher == sum(p.numel() for _, p in student.new_parameters())


def test_gradient_checkpointing_gives_the_same_gradients():
    student = convert_to_hybrid(make_teacher("qwen2"), HybridConfig(window=8, sink_tokens=2)).train()
    ids = torch.randint(0, 97, (2, 50))
    student(ids, labels=ids).loss.backward()
    plain = {n: p.grad.clone() for n, p in student.named_parameters()}
    student.zero_grad()
    student.lm.gradient_checkpointing_enable()
    student.train()
    student(ids, labels=ids).loss.backward()
    for n, p in student.named_parameters():
        assert rel_err(p.grad, plain[n]) < 1e-6, n


def saved_bytes_and_grads(student, ids):
    """Bytes autograd keeps for the backward of the attention modules' forwards in one training
    step, and the gradients of the step."""
    saved = {}

    def pack(t):  # a tensor saved by several ops (the layer input by q, k and v) is kept once
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    contexts, handles = [], []
    for layer in student.lm.model.layers:
        def enter(module, args, contexts=contexts):
            contexts.append(torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t))
            contexts[-1].__enter__()

        handles += [layer.self_attn.register_forward_pre_hook(enter),
                    layer.self_attn.register_forward_hook(lambda *a: contexts.pop().__exit__(None, None, None))]
    student.zero_grad()
    loss = student(ids, labels=ids).loss
    for h in handles:
        h.remove()
    loss.backward()
    return sum(saved.values()), {n: p.grad.clone() for n, p in student.named_parameters()}


@pytest.mark.parametrize("mode", ["hybrid", "mlstm"])
def test_recomputed_attention_gives_the_same_gradients_and_keeps_far_less(mode):
    """recompute_in_backward: the op's intermediates are recomputed in the backward, not kept."""
    student = convert_to_hybrid(make_teacher("qwen2"), HybridConfig(window=8, sink_tokens=2, chunk_size=16,
                                                                     mode=mode)).train()
    ids = torch.randint(0, 97, (2, 96), generator=torch.Generator().manual_seed(0))
    kept_plain, plain = saved_bytes_and_grads(student, ids)
    for layer in student.lm.model.layers:
        layer.self_attn.recompute_in_backward = True
    kept_recomputed, recomputed = saved_bytes_and_grads(student, ids)
    for n, g in recomputed.items():
        assert torch.equal(g, plain[n]), n  # the same ops on the same inputs: bit for bit
    # the plain form keeps less since the memory's backward is written out (kernels/chunkwise_memory.py;
    # mlstm: 2.03 -> 1.47 MB here), the recomputed one what it kept before (0.38 MB)
    assert kept_recomputed < 0.3 * kept_plain, (kept_recomputed, kept_plain)


def test_compiled_backend_trains_with_the_torch_backends_loss_and_gradients_and_keeps_as_little(monkeypatch):
    """backend="compiled" in the lean plan (the op recomputed in the backward through the compiled
    graph): the training step's loss and every gradient those of the eager chunkwise form, at a
    length ending in a partial chunk, and autograd keeps no more for the attention modules."""
    import kernels.compiled

    graph, calls = kernels.compiled.compiled_outputs(), []
    monkeypatch.setattr(kernels.compiled, "compiled_outputs",
                        lambda: lambda *args, **kwargs: calls.append(1) or graph(*args, **kwargs))
    teacher = make_teacher("llama")
    ids = torch.randint(0, 97, (2, 45), generator=torch.Generator().manual_seed(0))
    results = {}
    for backend in ("torch", "compiled"):
        student = convert_to_hybrid(teacher, HybridConfig(window=8, sink_tokens=2, chunk_size=16,
                                                          backend=backend)).train()
        for layer in student.lm.model.layers:
            layer.self_attn.recompute_in_backward = True
        results[backend] = saved_bytes_and_grads(student, ids)
    (kept_torch, expected), (kept_compiled, grads) = results["torch"], results["compiled"]
    for name, grad in grads.items():
        assert rel_err(grad, expected[name]) < 1e-5, name
    assert kept_compiled <= kept_torch, (kept_compiled, kept_torch)
    layers = teacher.config.num_hidden_layers
    assert len(calls) == 2 * layers  # each layer's forward, and again in its backward


@pytest.mark.parametrize("recompute", [False, True])
def test_recomputed_attention_does_not_keep_the_output_projections_input(recompute):
    student = convert_to_hybrid(make_teacher("llama"), HybridConfig(window=8, sink_tokens=2, chunk_size=16)).train()
    layer = student.lm.model.layers[0].self_attn
    layer.recompute_in_backward = recompute
    heads = []
    # the input itself is held (not only its address): a freed block reused by a kept tensor would look kept
    handle = layer.o_proj.register_forward_pre_hook(lambda m, args: heads.append(args[0]))
    kept = set()

    def pack(t):
        kept.add(t.untyped_storage().data_ptr())
        return t
    ids = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = student(ids).logits.sum()
    handle.remove()
    assert (heads[0].untyped_storage().data_ptr() in kept) is not recompute  # kept for o_proj's weight gradient unless recomputed
    loss.backward()


@pytest.mark.parametrize("lean", [False, True])
def test_lean_plan_keeps_the_attention_input_as_the_norms_recipe(lean):
    """With lean norms the layer input (the input norm's output) is rebuilt in the backward from the
    norm's input and 1 / rms: no kept tensor shares its memory; the gradients stay the same."""
    from models.lean_backward import lean_backward

    def run(student):
        inputs, kept = [], set()
        attn = student.lm.model.layers[0].self_attn
        handle = attn.register_forward_pre_hook(lambda m, a, kw: inputs.append(kw["hidden_states"]), with_kwargs=True)

        def pack(t):
            kept.add(t.untyped_storage().data_ptr())
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = student(ids).logits.square().mean()
        handle.remove()
        grads = torch.autograd.grad(loss, [p for p in student.parameters() if p.requires_grad])
        return inputs[0].untyped_storage().data_ptr() in kept, grads

    ids = torch.randint(0, 97, (2, 40), generator=torch.Generator().manual_seed(0))
    teacher = make_teacher("llama")
    config = HybridConfig(window=8, sink_tokens=2, chunk_size=16)
    plain = convert_to_hybrid(teacher, config).train()
    _, expected = run(plain)
    student = convert_to_hybrid(teacher, config).train()
    if lean:
        lean_backward(student)
    else:
        for layer in student.lm.model.layers:
            layer.self_attn.recompute_in_backward = True
    input_kept, grads = run(student)
    assert input_kept is not lean
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)


def test_bfloat16_student_is_close_to_float32():
    teacher = make_teacher("llama")
    ids = torch.randint(0, 97, (2, 50))
    cfg = HybridConfig(window=8, sink_tokens=2)
    with torch.no_grad():
        ref = convert_to_hybrid(teacher, cfg).eval()(ids).logits
        low = convert_to_hybrid(teacher, cfg).to(torch.bfloat16).eval()(ids).logits
    assert low.dtype == torch.bfloat16
    assert rel_err(low.float(), ref) < 5e-2


def test_unknown_forward_keyword_is_an_error():
    student = convert_to_hybrid(make_teacher("llama"), HybridConfig())
    with pytest.raises(TypeError):
        student(torch.randint(0, 97, (1, 4)), past_key_values=None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [100.0, -100.0])
@pytest.mark.parametrize("combine", ["gate", "shared_norm"])
def test_hybrid_layer_with_extreme_gate_biases_stays_finite(dtype, bias, combine):
    """Every gate's bias at +-100 (through the layer: soft cap, norm, projections), fp32 and bf16."""
    config = HybridConfig(window=8, sink_tokens=2, chunk_size=16, combine=combine)
    student = convert_to_hybrid(make_teacher("llama"), config)
    student.to(dtype)
    with torch.no_grad():
        for name, p in student.named_parameters():
            if "hybrid_gates" in name and name.endswith("bias"):
                p.fill_(bias)
    ids = torch.randint(0, 97, (2, 40))
    loss = torch.nn.functional.cross_entropy(student(ids).logits.float().flatten(0, 1), ids.flatten())
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_folded_gate_gives_the_qkv_gates_output_at_inference(family):
    """At inference the qkv gate is folded into one projection of x (families without q/k norms; Qwen2's
    q/k/v biases fold into its bias): the same logits as computing it from q, k, v, also after the
    weights change (the cache follows them); Qwen3's q/k norms do not fold."""
    student = convert_to_hybrid(make_teacher(family), HybridConfig(window=4)).eval()
    g = torch.Generator().manual_seed(0)

    def perturb():
        with torch.no_grad():
            for layer in student.lm.model.layers:
                layer.self_attn.mix_gate_weight.add_(0.2 * torch.randn(layer.self_attn.mix_gate_weight.shape, generator=g))
                layer.self_attn.mix_gate_bias.add_(torch.randn(layer.self_attn.mix_gate_bias.shape, generator=g) + 3.0)

    ids = torch.randint(0, 97, (2, 20), generator=g)
    attn = student.lm.model.layers[0].self_attn
    for _ in range(2):  # the second round checks the cache is refreshed
        perturb()
        with torch.no_grad():
            folded = student(ids).logits
        computed = student(ids).logits.detach()  # with gradients on: the gate from q, k, v
        assert (attn.folded_gate_projection() is None) == (family == "qwen3")
        assert rel_err(folded, computed) < 1e-5


def test_adapter_wrapped_projections_are_not_folded():
    """LoRA adapters on q/k/v (before merging) add to x @ weight.T, which the folded gate cannot see:
    the gate is then computed from q, k, v at inference too, and gives the same logits as with gradients."""
    from peft import LoraConfig, inject_adapter_in_model

    student = convert_to_hybrid(make_teacher("llama"), HybridConfig(window=4)).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in student.lm.model.layers:  # a mix gate that reads q, k and v
            layer.self_attn.mix_gate_weight.add_(0.5 * torch.randn(layer.self_attn.mix_gate_weight.shape, generator=g))
    inject_adapter_in_model(LoraConfig(r=2, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"],
                                       init_lora_weights=False), student.lm)
    ids = torch.randint(0, 97, (2, 20), generator=g)
    with torch.no_grad():
        inference = student(ids).logits
    computed = student(ids).logits.detach()
    assert student.lm.model.layers[0].self_attn.folded_gate_projection() is None
    assert rel_err(inference, computed) < 1e-5
