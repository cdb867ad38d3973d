"""The reference against independent implementations: mlstm_kernels (invariant 2), torch SDPA
with an explicit mask, and a per-query float64 loop written from DESIGN §3."""

import math

import pytest
import torch
import torch.nn.functional as F
from mlstm_kernels.torch.chunkwise.native import mlstm_chunkwise__native_autograd
from mlstm_kernels.torch.parallel.native.fw import mlstm_parallel_fw

import kernels
from kernels import reference
from tests.conftest import rel_err
from tests.kernels.test_forms import feature_mapped, make_inputs


@pytest.mark.parametrize("T", [1, 63, 64, 130])
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_mlstm_mode_equals_mlstm_kernels_parallel(T, backend):
    torch.manual_seed(T)
    B, H, D = 2, 3, 16
    q, k, v = torch.randn(B, H, T, D), torch.randn(B, H, T, D), torch.randn(B, H, T, D)
    i, f = torch.randn(B, H, T), torch.randn(B, H, T) + 2.0
    expected, _, _ = mlstm_parallel_fw(q, k, v, i, f)
    out = kernels.hybrid_attention(q, k, v, i, f, None, window=16, sink_tokens=0, mode="mlstm", backend=backend)
    assert rel_err(out, expected) < 2e-6


def test_mlstm_mode_gradients_equal_mlstm_kernels_native_autograd():
    torch.manual_seed(0)
    B, H, T, D = 1, 2, 128, 16
    # q/k at scale 0.1: mlstm_kernels' chunkwise stabiliser differs from the exact one, which only
    # matters where the max(|n.q|, exp(-m)) floor is active (DESIGN notes, issue text).
    leaves = [0.1 * torch.randn(B, H, T, D), 0.1 * torch.randn(B, H, T, D), torch.randn(B, H, T, D),
              torch.randn(B, H, T), torch.randn(B, H, T) + 2.0]
    leaves = [x.double().requires_grad_(True) for x in leaves]
    upstream = torch.randn(B, H, T, D, dtype=torch.float64)
    expected = mlstm_chunkwise__native_autograd(*leaves, return_last_states=False, chunk_size=64)
    out = kernels.hybrid_attention(*leaves[:5], None, window=8, sink_tokens=0, mode="mlstm", backend="torch")
    assert rel_err(out, expected) < 1e-6
    g_exp = torch.autograd.grad((expected * upstream).sum(), leaves)
    g_out = torch.autograd.grad((out * upstream).sum(), leaves)
    for a, b in zip(g_out, g_exp):
        assert rel_err(a, b) < 1e-5


@pytest.mark.parametrize("window,sinks", [(1, 0), (5, 0), (5, 3), (100, 0)])
def test_swa_mode_equals_sdpa_with_explicit_mask(window, sinks):
    inp = make_inputs(2, 4, 2, 37, 8, 8, dtype=torch.float64, seed=1)
    T = 37
    t, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    allowed = (j <= t) & ((t - j < window) | (j < sinks))
    k = inp["k"].repeat_interleave(2, 1)
    v = inp["v"].repeat_interleave(2, 1)
    expected = F.scaled_dot_product_attention(inp["q"], k, v, attn_mask=allowed)
    for backend in ("reference", "torch"):
        out = kernels.hybrid_attention(**inp, window=window, sink_tokens=sinks, mode="swa", backend=backend)
        assert rel_err(out, expected) < 1e-12


def _loop_reference(q, k, v, i, f, g, window, sinks, combine, eps=1e-6, norm_eps=1e-6, mq=None, mk=None,
                    memory_norm="rms"):
    """Per query, per head, straight from the formulas (float64, no masks, no stabilisation tricks);
    the memory on mq, mk (default q, k), its read-out RMS-normed when memory_norm is "rms"."""
    B, H, T, D = q.shape
    rep = H // k.shape[1]
    mq, mk = (q if mq is None else mq), (k if mk is None else mk)
    out = torch.zeros(B, H, T, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            kh, vh, mkh = k[b, h // rep], v[b, h // rep], mk[b, h // rep]
            logf = [math.log(1 / (1 + math.exp(-x))) for x in f[b, h].tolist()]
            for t in range(T):
                attn = [s for s in range(t + 1) if s < sinks or t - s < window]
                older = [s for s in range(t + 1) if s not in attn]
                decay = lambda s: math.exp(sum(logf[s + 1:t + 1]) + i[b, h, s].item())  # noqa: E731
                qk = lambda s: (q[b, h, t] @ kh[s]).item() / math.sqrt(D)  # noqa: E731
                mqk = lambda s: (mq[b, h, t] @ mkh[s]).item() / math.sqrt(D)  # noqa: E731
                gt = 1 / (1 + math.exp(-g[b, h, t].item()))
                if combine == "gate":
                    num = sum(decay(s) * mqk(s) * vh[s] for s in range(t + 1))
                    den = sum(decay(s) * mqk(s) for s in range(t + 1))
                    m = max(math.log(decay(s)) for s in range(t + 1))
                    # xLSTM's normaliser in true units: max(|n.q|, 1); the op's stabilised form
                    # max(|n.q| e^-m, e^-m) + eps equals it with eps scaled by e^m.
                    hm = num / (max(abs(den), 1.0) + eps * math.exp(m))
                    if memory_norm == "rms":
                        hm = hm / torch.sqrt((hm**2).mean() + norm_eps)
                    w = [math.exp(qk(s)) for s in attn]
                    ha = sum(ws * vh[s] for ws, s in zip(w, attn)) / sum(w)
                    out[b, h, t] = gt * hm + (1 - gt) * ha
                else:
                    num = sum(math.exp(qk(s)) * vh[s] for s in attn) + sum(gt * decay(s) * mqk(s) * vh[s] for s in older)
                    den = sum(math.exp(qk(s)) for s in attn) + gt * abs(sum(decay(s) * mqk(s) for s in older))
                    out[b, h, t] = num / den
    return out


@pytest.mark.parametrize("combine", ["gate", "shared_norm"])
def test_hybrid_equals_loop_over_formulas(combine):
    inp = make_inputs(1, 2, 1, 11, 4, 3, seed=7)
    expected = _loop_reference(*inp.values(), window=3, sinks=2, combine=combine)
    for backend in ("reference", "torch"):
        out = kernels.hybrid_attention(**inp, window=3, sink_tokens=2, mode="hybrid", combine=combine, backend=backend)
        assert rel_err(out, expected) < 1e-10


@pytest.mark.parametrize("memory_norm", ["none", "rms"])
@pytest.mark.parametrize("combine", ["gate", "shared_norm"])
def test_paper_layer_equals_loop_over_formulas(combine, memory_norm):
    """The memory on feature-mapped queries and keys (positive, so the shared normaliser's older
    keys weigh g * exp(gates) * phi(q).phi(k) >= 0), with and without the memory's RMS norm; GQA."""
    inp = make_inputs(1, 2, 1, 13, 4, 3, seed=8)
    inp.update(feature_mapped(inp, seed=2))
    # a large input gate: the normaliser |n.phi(q)| above its floor, the regime the layer starts in
    inp["i_gate"] = inp["i_gate"] + 6.0
    expected = _loop_reference(*[inp[n] for n in ("q", "k", "v", "i_gate", "f_gate", "g_gate")], window=3, sinks=2,
                               combine=combine, mq=inp["mq"], mk=inp["mk"], memory_norm=memory_norm)
    for backend in ("reference", "torch"):
        out = kernels.hybrid_attention(**inp, window=3, sink_tokens=2, mode="hybrid", combine=combine, backend=backend,
                                       memory_norm=memory_norm)
        assert rel_err(out, expected) < 1e-10


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_mlstm_mode_on_memory_inputs_equals_mlstm_kernels_parallel(backend):
    """Invariant 2 with mq/mk: the memory is mlstm_kernels' mLSTM on (mq, mk, v), q and k unused."""
    torch.manual_seed(5)
    B, H, T, D = 2, 3, 70, 16
    q, k, v = torch.randn(B, H, T, D), torch.randn(B, H, T, D), torch.randn(B, H, T, D)
    mq, mk = torch.softmax(torch.randn(B, H, T, D), -1), torch.softmax(torch.randn(B, H, T, D), -1)
    i, f = torch.randn(B, H, T) + 4.0, torch.randn(B, H, T) + 2.0
    expected, _, _ = mlstm_parallel_fw(mq, mk, v, i, f)
    out = kernels.hybrid_attention(q, k, v, i, f, None, window=16, sink_tokens=0, mode="mlstm", backend=backend,
                                   mq=mq, mk=mk)
    assert rel_err(out, expected) < 2e-6


def test_mix_gate_extremes_select_one_branch():
    inp = make_inputs(1, 2, 2, 20, 8, 8, seed=2)
    kw = dict(window=4, sink_tokens=1)
    swa = reference.hybrid_attention(**inp, mode="swa", **kw)
    mem = reference.hybrid_attention(**inp, mode="mlstm", **kw)
    normed = mem / mem.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
    inp["g_gate"] = torch.full_like(inp["g_gate"], -60.0)
    assert rel_err(reference.hybrid_attention(**inp, mode="hybrid", **kw), swa) < 1e-12
    inp["g_gate"] = torch.full_like(inp["g_gate"], 60.0)
    assert rel_err(reference.hybrid_attention(**inp, mode="hybrid", **kw), normed) < 1e-12
    # shared_norm with g -> 0 is plain sliding-window attention as well
    inp["g_gate"] = torch.full_like(inp["g_gate"], -800.0)
    assert rel_err(reference.hybrid_attention(**inp, mode="hybrid", combine="shared_norm", **kw), swa) < 1e-12
    # without the memory norm, g -> 1 gives the raw memory read-out
    inp["g_gate"] = torch.full_like(inp["g_gate"], 60.0)
    assert rel_err(reference.hybrid_attention(**inp, mode="hybrid", memory_norm="none", **kw), mem) < 1e-12


@pytest.mark.parametrize("value", [100.0, -100.0])
@pytest.mark.parametrize("combine", ["gate", "shared_norm"])
def test_extreme_gate_preactivations_stay_finite(value, combine):
    inp = make_inputs(1, 2, 2, 70, 8, 8, dtype=torch.float32, seed=4)
    for name in ("i_gate", "f_gate", "g_gate"):
        inp[name] = torch.full_like(inp[name], value)
    leaves = [x.requires_grad_(True) for x in inp.values()]
    out = kernels.hybrid_attention(**inp, window=8, sink_tokens=2, mode="hybrid", combine=combine, backend="torch")
    assert torch.isfinite(out).all()
    for g in torch.autograd.grad(out.sum(), leaves):
        assert torch.isfinite(g).all()
