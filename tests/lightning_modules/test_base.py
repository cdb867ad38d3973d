import torch

from lightning_modules.base import adamw


def _adamw_in_float64(p, grads, lr, weight_decay, betas=(0.9, 0.999), eps=1e-8):
    """AdamW (decoupled weight decay, bias-corrected moments) written out in float64."""
    p, m, v = p.double().clone(), torch.zeros_like(p, dtype=torch.float64), torch.zeros_like(p, dtype=torch.float64)
    for step, g in enumerate(grads, start=1):
        g = g.double()
        p = p * (1 - lr * weight_decay)
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g * g
        m_hat, v_hat = m / (1 - betas[0] ** step), v / (1 - betas[1] ** step)
        p = p - lr * m_hat / (v_hat.sqrt() + eps)
    return p


def test_adamw_is_fused_on_a_cpu_and_updates_as_adamw_written_out_in_float64():
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(7, 5, generator=gen), torch.randn(11, generator=gen)]
    params = [torch.nn.Parameter(w.clone()) for w in weights]
    grads = [[torch.randn(w.shape, generator=gen) for _ in range(3)] for w in weights]
    optimizer = adamw(params, lr=1e-2, weight_decay=0.1)
    assert optimizer.defaults["fused"] is True
    for step in range(3):
        for p, g in zip(params, grads):
            p.grad = g[step].clone()
        optimizer.step()
    for p, w, g in zip(params, weights, grads):
        expected = _adamw_in_float64(w, g, lr=1e-2, weight_decay=0.1)
        torch.testing.assert_close(p.detach().double(), expected, rtol=0, atol=1e-6)


def test_adamw_falls_back_to_the_default_implementation_without_a_fused_kernel():
    # the meta device has no fused AdamW kernel: the optimizer is built the default way
    optimizer = adamw([torch.nn.Parameter(torch.zeros(3, device="meta"))], lr=1e-3)
    assert not optimizer.defaults["fused"]
