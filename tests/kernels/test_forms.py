"""Invariant 3: parallel == chunkwise == recurrent (prefill then single steps), outputs and input gradients."""

import itertools

import pytest
import torch

from kernels import HybridState, hybrid_attention_chunkwise, hybrid_attention_step, reference
from tests.conftest import rel_err

VARIANTS = [("hybrid", "gate"), ("hybrid", "shared_norm"), ("mlstm", "gate"), ("swa", "gate")]


def make_inputs(B, H, Hkv, T, D, Dv, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    return dict(
        q=r(B, H, T, D), k=r(B, Hkv, T, D), v=r(B, Hkv, T, Dv),
        i_gate=r(B, H, T), f_gate=r(B, H, T) + 2.0, g_gate=r(B, H, T),
    )


def feature_mapped(inputs, seed=0):
    """The memory branch's own queries and keys, as the layer's softmax feature maps make them:
    per head softmax(W x + b) over the feature dim (positive, summing to one)."""
    g = torch.Generator().manual_seed(seed)
    D, dtype = inputs["q"].shape[-1], inputs["q"].dtype

    def phi(x):
        w = torch.randn(x.shape[1], D, D, generator=g, dtype=dtype) / D**0.5 + torch.eye(D, dtype=dtype)
        return torch.softmax(torch.einsum("bhtd,hde->bhte", x, w) + torch.randn(x.shape[1], 1, D, generator=g,
                                                                                   dtype=dtype), -1)

    return {"mq": phi(inputs["q"]), "mk": phi(inputs["k"])}


def zero_in_theory(mode, combine, T, window, sinks, memory_inputs, memory_norm="rms"):
    """Inputs whose gradient is zero in theory (or, for q/k at T = 1 without memory inputs, up to
    the eps of the mLSTM normaliser): the forget gate at T = 1 (no decay between a key and
    itself); under shared_norm everything of the memory when no key is older than the window; the
    attention's q, k when each query sees one key (T = 1, or window 1 without sinks) and no memory
    mass shares its normaliser; with separate memory inputs, q and k always in mode mlstm; without
    them, q and k at T = 1 (a single key's normalised read-out does not depend on their scale);
    the input gate at T = 1 too, unless the normaliser's floor exp(-m) is active (data decides);
    and at T = 1 mq, mk under the memory's RMS norm (it removes the read-out's only dependence)."""
    shared = combine == "shared_norm" and mode == "hybrid"
    zero = {"f_gate", "i_gate"} if T == 1 else set()
    if shared and T <= window + sinks:
        zero |= {"mq", "mk", "i_gate", "f_gate", "g_gate"}
    one_key = T == 1 or (window == 1 and sinks == 0)
    if memory_inputs:
        if mode == "mlstm" or (one_key and not (shared and "mq" not in zero)):
            zero |= {"q", "k"}
    elif T == 1 or (mode == "swa" and one_key):
        zero |= {"q", "k"}
    if T == 1 and mode == "hybrid" and combine == "gate" and memory_norm == "rms":
        zero |= {"mq", "mk"}
    return zero


def run_recurrent(inputs, prefix, kw, chunk_size=16):
    """Chunkwise prefill of the first ``prefix`` tokens, then one step per token (``mq``/``mk``
    sliced with the rest when ``inputs`` has them)."""
    q = inputs["q"]
    B, H, T, D = q.shape
    Hkv, Dv = inputs["k"].shape[1], inputs["v"].shape[-1]
    names = tuple(n for n in ("q", "k", "v", "i_gate", "f_gate", "g_gate", "mq", "mk") if n in inputs)
    outs = []
    if prefix > 0:
        head = {n: inputs[n][:, :, :prefix] for n in names}
        out, state = hybrid_attention_chunkwise(**head, chunk_size=chunk_size, return_state=True, **kw)
        outs.append(out)
    else:
        state = HybridState.empty(B, H, Hkv, D, Dv, window=kw["window"], sink_tokens=kw["sink_tokens"],
                                  mode=kw["mode"], combine=kw["combine"], dtype=q.dtype, device=q.device,
                                  compute_dtype=torch.float64 if q.dtype == torch.float64 else torch.float32,
                                  memory_keys="mk" in inputs)
    step_kw = {k: v for k, v in kw.items() if k in ("norm_weight", "scale", "memory_norm")}
    for t in range(prefix, T):
        sl = {n: inputs[n][:, :, t:t + 1] for n in names}
        out, state = hybrid_attention_step(**sl, state=state, **step_kw)
        outs.append(out)
    return torch.cat(outs, 2)


@pytest.mark.parametrize("T,window,sinks", list(itertools.product([1, 7, 63, 64, 65, 200], [1, 16, 64], [0, 4])))
@pytest.mark.parametrize("mode,combine", VARIANTS)
def test_parallel_chunkwise_recurrent_agree(T, window, sinks, mode, combine):
    inputs = make_inputs(2, 4, 2, T, 8, 6, seed=T * 7 + window)
    for x in inputs.values():
        x.requires_grad_(True)
    norm_weight = (torch.rand(4, 6, dtype=torch.float64) + 0.5).requires_grad_(True)
    kw = dict(window=window, sink_tokens=sinks, mode=mode, combine=combine, norm_weight=norm_weight)
    leaves = list(inputs.values()) + [norm_weight]
    upstream = torch.randn(2, 4, T, 6, dtype=torch.float64)

    results = {}
    for form in ("parallel", "chunkwise", "recurrent"):
        if form == "parallel":
            out = reference.hybrid_attention(**inputs, **kw)
        elif form == "chunkwise":
            out = hybrid_attention_chunkwise(**inputs, chunk_size=16, **kw)
        else:
            out = run_recurrent(inputs, prefix=T // 2, kw=kw)
        used = [x for x in leaves if x is not inputs["g_gate"] or mode == "hybrid"]
        grads = torch.autograd.grad((out * upstream).sum(), used, allow_unused=True)
        results[form] = (out, grads)

    ref_out, ref_grads = results["parallel"]
    assert torch.isfinite(ref_out).all()
    for form in ("chunkwise", "recurrent"):
        out, grads = results[form]
        assert rel_err(out, ref_out) < 1e-10, form
        for g, rg in zip(grads, ref_grads):
            if rg is None or g is None:
                assert (rg if g is None else g) is None or (rg if g is None else g).abs().max() < 1e-12
            else:
                # relative error, with an absolute floor for gradients that are exactly zero in theory
                assert (g - rg).norm() <= 1e-9 * rg.norm() + 1e-12, form


@pytest.mark.parametrize("mode,combine", VARIANTS)
def test_recurrent_from_empty_state_matches_parallel(mode, combine):
    inputs = make_inputs(1, 2, 1, 40, 8, 8, seed=3)
    kw = dict(window=8, sink_tokens=2, mode=mode, combine=combine)
    ref = reference.hybrid_attention(**inputs, **kw)
    assert rel_err(run_recurrent(inputs, prefix=0, kw=kw), ref) < 1e-10


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.float16, 2e-2), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("mode,combine", VARIANTS)
def test_low_precision_chunkwise_close_to_float64(dtype, tol, mode, combine):
    inputs64 = make_inputs(2, 4, 2, 130, 16, 16, seed=5)
    kw = dict(window=16, sink_tokens=4, mode=mode, combine=combine)
    ref = reference.hybrid_attention(**inputs64, **kw)
    low = {k: v.to(dtype) for k, v in inputs64.items()}
    out = hybrid_attention_chunkwise(**low, chunk_size=32, **kw)
    assert out.dtype == dtype
    assert rel_err(out, ref) < tol


def test_chunk_size_does_not_change_result():
    inputs = make_inputs(1, 2, 2, 100, 8, 8, seed=11)
    kw = dict(window=16, sink_tokens=4, mode="hybrid", combine="shared_norm")
    a = hybrid_attention_chunkwise(**inputs, chunk_size=8, **kw)
    b = hybrid_attention_chunkwise(**inputs, chunk_size=128, **kw)
    assert rel_err(a, b) < 1e-12


@pytest.mark.parametrize("segment", [None, 32])
@pytest.mark.parametrize("window,sinks", [(1, 0), (16, 4), (40, 3)])
@pytest.mark.parametrize("mode", ["hybrid", "swa"])
def test_window_as_masked_sdpa_equals_the_band_written_out_with_gradients(segment, window, sinks, mode):
    """The gate mix's window branch as one masked SDPA call over blocks of queries (GQA heads read in
    place) gives the band form's output and every gradient, across segments (keys before a segment,
    sinks after the first) and for a length that is not a multiple of the chunk."""
    inputs = make_inputs(2, 4, 2, 77, 8, 8, seed=5)
    kw = dict(window=window, sink_tokens=sinks, mode=mode, combine="gate", chunk_size=16, segment_tokens=segment,
              norm_weight=None, memory_norm="none")
    results = []
    for form in ("auto", "band"):
        leaves = {name: x.clone().requires_grad_(x.is_floating_point()) for name, x in inputs.items()}
        out = hybrid_attention_chunkwise(**leaves, window_form=form, **kw)
        out.square().sum().backward()
        results.append([out.detach()] + [leaves[name].grad for name in ("q", "k", "v", "i_gate", "f_gate", "g_gate")])
    for sdpa, band in zip(*results):
        assert (sdpa is None) == (band is None)
        if sdpa is not None:  # atol: window 1 without sinks, where q, k get no gradient (1e-15 from SDPA)
            torch.testing.assert_close(sdpa, band, rtol=1e-10, atol=1e-12)


def test_window_form_is_checked():
    with pytest.raises(ValueError, match="window_form='dense' is not supported; allowed values: 'auto', 'band'"):
        hybrid_attention_chunkwise(**make_inputs(1, 2, 2, 8, 8, 8), window=4, sink_tokens=0, window_form="dense")


GATE_PATTERNS = {
    "all +100": (100.0, 100.0, 100.0),
    "all -100": (-100.0, -100.0, -100.0),
    "write hard, forget all": (100.0, -100.0, 100.0),
    "no write, keep all": (-100.0, 100.0, -100.0),
    "random signs": None,
}


@pytest.mark.parametrize("pattern", list(GATE_PATTERNS))
@pytest.mark.parametrize("mode,combine", VARIANTS)
def test_extreme_gate_preactivations_give_finite_outputs_and_gradients_in_every_form(pattern, mode, combine):
    """Gate pre-activations of +-100 (no soft cap: the op must be stable on its own) in float32."""
    inputs = make_inputs(1, 2, 1, 70, 8, 8, dtype=torch.float32, seed=3)
    values = GATE_PATTERNS[pattern]
    g = torch.Generator().manual_seed(5)
    for j, name in enumerate(("i_gate", "f_gate", "g_gate")):
        signs = torch.randint(0, 2, inputs[name].shape, generator=g).float() * 2 - 1
        inputs[name] = signs * 100.0 if values is None else torch.full_like(inputs[name], values[j])
    for x in inputs.values():
        x.requires_grad_(True)
    kw = dict(window=8, sink_tokens=2, mode=mode, combine=combine, norm_weight=torch.ones(2, 8))
    forms = {"parallel": lambda: reference.hybrid_attention(**inputs, **kw),
             "chunkwise": lambda: hybrid_attention_chunkwise(**inputs, chunk_size=16, **kw),
             "recurrent": lambda: run_recurrent(inputs, prefix=33, kw=kw)}
    outputs = {}
    for form, run in forms.items():
        out = run()
        assert torch.isfinite(out).all(), form
        used = [x for n, x in inputs.items() if n != "g_gate" or mode == "hybrid"]
        for grad in torch.autograd.grad(out.square().sum(), used, allow_unused=True):
            assert grad is None or torch.isfinite(grad).all(), form
        outputs[form] = out.detach()
    # and the forms still agree there
    for form in ("chunkwise", "recurrent"):
        assert rel_err(outputs[form], outputs["parallel"]) < 1e-4, form


@pytest.mark.parametrize("segment", [16, 48])
@pytest.mark.parametrize("window,sinks", [(1, 0), (16, 4), (40, 3)])
@pytest.mark.parametrize("mode,combine", VARIANTS)
def test_segmented_chunkwise_equals_reference_with_gradients_and_state(segment, window, sinks, mode, combine):
    """Long prompts run in segments (bounded temporaries): the mLSTM state crosses each boundary,
    and each segment's window reaches back into the previous ones; nothing may change."""
    T = 131
    inputs = make_inputs(2, 4, 2, T, 8, 6, seed=segment + window)
    for x in inputs.values():
        x.requires_grad_(True)
    kw = dict(window=window, sink_tokens=sinks, mode=mode, combine=combine)
    upstream = torch.randn(2, 4, T, 6, dtype=torch.float64)
    unused = {"swa": ("i_gate", "f_gate", "g_gate"), "mlstm": ("g_gate",)}.get(mode, ())
    used = [x for name, x in inputs.items() if name not in unused]
    ref = reference.hybrid_attention(**inputs, **kw)
    ref_grads = torch.autograd.grad((ref * upstream).sum(), used)
    out, state = hybrid_attention_chunkwise(**inputs, chunk_size=16, segment_tokens=segment, return_state=True, **kw)
    grads = torch.autograd.grad((out * upstream).sum(), used)
    assert rel_err(out, ref) < 1e-10
    for g, rg in zip(grads, ref_grads):
        assert (g - rg).norm() <= 1e-9 * rg.norm() + 1e-12
    _, whole = hybrid_attention_chunkwise(**inputs, chunk_size=16, return_state=True, **kw)
    for name, tensor in whole.tensors().items():
        assert rel_err(state.tensors()[name], tensor) < 1e-10, name


def test_segment_length_must_be_a_multiple_of_the_chunk():
    inputs = make_inputs(1, 2, 2, 40, 8, 8)
    with pytest.raises(ValueError, match="segment_tokens=24 is invalid.*multiple of chunk_size=16"):
        hybrid_attention_chunkwise(**inputs, window=8, sink_tokens=2, chunk_size=16, segment_tokens=24)


@pytest.mark.parametrize("T,window,sinks", list(itertools.product([1, 7, 65, 130], [1, 16, 64], [0, 4])))
@pytest.mark.parametrize("memory_norm", ["none", "rms"])
@pytest.mark.parametrize("mode,combine", VARIANTS)
def test_forms_agree_with_memory_queries_and_keys_of_their_own(T, window, sinks, memory_norm, mode, combine):
    """Invariant 3 for the paper's layer: feature-mapped mq/mk for the memory (GQA: mk has the key
    heads), with and without the memory norm; outputs and every input gradient, mq and mk included."""
    inputs = make_inputs(2, 4, 2, T, 8, 6, seed=T * 3 + window + sinks)
    inputs.update(feature_mapped(inputs, seed=T))
    for x in inputs.values():
        x.requires_grad_(True)
    norm_weight = (torch.rand(4, 6, dtype=torch.float64) + 0.5).requires_grad_(True)
    kw = dict(window=window, sink_tokens=sinks, mode=mode, combine=combine, norm_weight=norm_weight,
              memory_norm=memory_norm)
    unused = {"swa": ("i_gate", "f_gate", "g_gate", "mq", "mk"), "mlstm": ("g_gate",)}.get(mode, ())
    names = [name for name in inputs if name not in unused]
    if mode == "hybrid" and combine == "gate" and memory_norm == "rms":
        names.append("norm_weight")
    used = [norm_weight if name == "norm_weight" else inputs[name] for name in names]
    upstream = torch.randn(2, 4, T, 6, dtype=torch.float64)
    forms = {"parallel": lambda: reference.hybrid_attention(**inputs, **kw),
             "chunkwise": lambda: hybrid_attention_chunkwise(**inputs, chunk_size=16, segment_tokens=32, **kw),
             "recurrent": lambda: run_recurrent(inputs, prefix=T // 2, kw=kw)}
    results = {}
    for form, run in forms.items():
        out = run()
        grads = torch.autograd.grad((out * upstream).sum(), used, allow_unused=True)
        results[form] = (out, [torch.zeros_like(x) if g is None else g for x, g in zip(used, grads)])
    zero = zero_in_theory(mode, combine, T, window, sinks, memory_inputs=True, memory_norm=memory_norm)
    ref_out, ref_grads = results["parallel"]
    assert torch.isfinite(ref_out).all()
    for form in ("chunkwise", "recurrent"):
        out, grads = results[form]
        assert rel_err(out, ref_out) < 1e-10, form
        for name, g, rg in zip(names, grads, ref_grads):
            if name in zero and g.abs().max() < 1e-12 and rg.abs().max() < 1e-12:
                continue  # zero in theory (some only for some data, see zero_in_theory), and zero here
            # each gradient against its own scale, never an absolute floor
            assert rg.norm() > 0, (form, name)
            assert (g - rg).norm() <= 1e-9 * rg.norm(), (form, name)


@pytest.mark.parametrize("mode,combine", VARIANTS)
def test_attention_branch_ignores_the_memory_inputs(mode, combine):
    """mq/mk feed the memory only: in mode swa they change nothing; elsewhere they change the output."""
    inputs = make_inputs(1, 4, 2, 40, 8, 8, seed=1)
    kw = dict(window=8, sink_tokens=2, mode=mode, combine=combine)
    plain = reference.hybrid_attention(**inputs, **kw)
    same = reference.hybrid_attention(**inputs, mq=inputs["q"], mk=inputs["k"], **kw)
    assert torch.equal(plain, same)
    mapped = reference.hybrid_attention(**inputs, **feature_mapped(inputs), **kw)
    if mode == "swa":
        assert torch.equal(mapped, plain)
    else:
        assert rel_err(mapped, plain) > 1e-3


def test_memory_inputs_must_match_q_and_k_shapes():
    inputs = make_inputs(1, 4, 2, 10, 8, 8)
    with pytest.raises(ValueError, match=r"mk must have the shape of k \(1, 2, 10, 8\)"):
        reference.hybrid_attention(**inputs, mk=inputs["q"], window=4, sink_tokens=0)
    with pytest.raises(ValueError, match="memory_norm='layer' is not supported; allowed values: rms, none"):
        hybrid_attention_chunkwise(**inputs, window=4, sink_tokens=0, memory_norm="layer")
