"""The chunkwise memory's written-out backward (kernels/chunkwise_memory.py) against autograd through
the very same forward and against finite differences, in float64; the whole-op gradients against
the parallel form are in test_forms.py."""

import pytest
import torch
import torch.nn.functional as F

from kernels._common import LOG_ZERO
from kernels.chunkwise import mlstm_chunkwise
from kernels.chunkwise_memory import MemorySums, memory_stabilisers, memory_sums


def _inputs(B=2, H=3, N=3, L=4, D=5, Dv=6, seed=0, initial=True, gate_shift=0.0):
    gen = torch.Generator().manual_seed(seed)
    x = dict(q=torch.randn(B, H, N, L, D, generator=gen, dtype=torch.float64) * 0.5,
             k=torch.randn(B, H, N, L, D, generator=gen, dtype=torch.float64) * 0.5,
             v=torch.randn(B, H, N, L, Dv, generator=gen, dtype=torch.float64),
             i_gate=torch.randn(B, H, N, L, generator=gen, dtype=torch.float64) * 2 + gate_shift,
             log_f=F.logsigmoid(torch.randn(B, H, N, L, generator=gen, dtype=torch.float64) + 2))
    if initial:
        x.update(C0=torch.randn(B, H, D, Dv, generator=gen, dtype=torch.float64),
                 n0=torch.randn(B, H, D, generator=gen, dtype=torch.float64),
                 m0=torch.randn(B, H, generator=gen, dtype=torch.float64))
    else:
        x.update(C0=torch.zeros(B, H, D, Dv, dtype=torch.float64), n0=torch.zeros(B, H, D, dtype=torch.float64),
                 m0=torch.full((B, H), LOG_ZERO, dtype=torch.float64))
    return x


def _outputs(x, written_out: bool):
    """num, den, m_t, final C, n, m: through ``MemorySums`` or autograd through ``memory_sums``."""
    b = x["log_f"].cumsum(-1)
    m_t, m_in = memory_stabilisers(x["i_gate"], b, x["m0"])
    args = (x["q"], x["k"], x["v"], x["i_gate"], b, m_t, m_in, x["C0"], x["n0"])
    if written_out:
        num, den, C_end, n_end = MemorySums.apply(*args)
    else:
        num, den, _, _, C_end, n_end, _, _ = memory_sums(*args)
    return num, den, m_t, C_end, n_end, m_in[..., -1]


@pytest.mark.parametrize("initial", [False, True])
@pytest.mark.parametrize("gate_shift", [0.0, -8.0, 6.0])  # -8: the normaliser's floor exp(-m) binds
@pytest.mark.parametrize("frozen", [(), ("v",), ("q", "k", "v")])  # alignment: v from the frozen teacher
def test_written_out_backward_equals_autograd_through_the_same_forward(initial, gate_shift, frozen):
    x = _inputs(initial=initial, gate_shift=gate_shift)
    leaves = {n: t.clone().requires_grad_((n != "m0" or initial) and n not in frozen) for n, t in x.items()}
    gen = torch.Generator().manual_seed(1)
    results = []
    for written_out in (True, False):
        for t in leaves.values():
            t.grad = None
        outs = _outputs(leaves, written_out)
        # every output in the loss, the stabilisers too, as the normaliser and the next segment use them
        weights = [torch.randn(o.shape, generator=gen, dtype=torch.float64) for o in outs]
        num, den, m_t, C_end, n_end, m_end = outs
        h = num / (torch.maximum(den.abs(), torch.exp(-m_t)) + 1e-6).unsqueeze(-1)
        loss = sum((o * w).sum() for o, w in zip((h, den, m_t, C_end, n_end, m_end), weights))
        loss.backward()
        results.append({n: t.grad.clone() for n, t in leaves.items() if t.grad is not None})
        gen = torch.Generator().manual_seed(1)  # the same weights for both
    written, autograd = results
    assert written.keys() == autograd.keys() and {"q", "k", "v", "i_gate", "log_f"} - set(frozen) <= written.keys()
    for name in written:
        torch.testing.assert_close(written[name], autograd[name], rtol=1e-10, atol=1e-12, msg=name)


def test_written_out_backward_passes_gradcheck():
    x = _inputs(B=1, H=2, N=2, L=3, D=2, Dv=3)
    b = x["log_f"].cumsum(-1)
    m_t, m_in = memory_stabilisers(x["i_gate"], b, x["m0"])
    args = [t.clone().requires_grad_() for t in (x["q"], x["k"], x["v"], x["i_gate"], b, m_t, m_in, x["C0"], x["n0"])]
    assert torch.autograd.gradcheck(MemorySums.apply, args, eps=1e-6, atol=1e-7)


def test_mlstm_chunkwise_takes_the_written_out_backward_only_for_a_gradient(monkeypatch):
    calls = []
    original = MemorySums.apply
    monkeypatch.setattr(MemorySums, "apply", lambda *a: calls.append(1) or original(*a))
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 10, 4, generator=gen) for _ in range(3))
    i_gate, log_f = torch.randn(1, 2, 10, generator=gen), F.logsigmoid(torch.randn(1, 2, 10, generator=gen))
    plain = mlstm_chunkwise(q, k, v, i_gate, log_f, scale=0.5, chunk_size=4)
    assert not calls
    q.requires_grad_(True)
    with_grad = mlstm_chunkwise(q, k, v, i_gate, log_f, scale=0.5, chunk_size=4)
    assert calls
    for a, b in zip(plain[:3] + plain[3], with_grad[:3] + with_grad[3]):
        torch.testing.assert_close(a, b.detach(), rtol=0, atol=0)


def _kept_bytes(fn):
    saved = {}

    def pack(t):  # a tensor saved by several ops is kept once
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(saved.values())


def test_written_out_backward_keeps_less_than_autograd_through_the_same_forward():
    x = _inputs(B=1, H=2, N=8, L=16, D=16, Dv=16, initial=False)
    leaves = {n: t.clone().requires_grad_(n != "m0") for n, t in x.items()}
    written = _kept_bytes(lambda: _outputs(leaves, True))
    autograd = _kept_bytes(lambda: _outputs(leaves, False))
    # 0.67 at this size: the inputs, the stabilisers, the chunk states, the outputs, the intra-chunk
    # weights and their product with q k^T, against autograd's per-op intermediates
    assert written < 0.7 * autograd, (written, autograd)
