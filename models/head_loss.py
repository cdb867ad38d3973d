"""A loss over the vocabulary-sized head's logits that never holds them all (DESIGN §4).

Training a 135 M model on 4 x 512 tokens with a 49,152-token vocabulary makes [B, T, V] float32
logits of 384 MiB, and the loss keeps several tensors of that size alive until the backward (the
logits, their log-softmax, the gradient). ``head_loss`` instead walks over the positions in chunks:
for each chunk it computes the logits, the loss and the loss's gradient with respect to those
logits, turns that gradient into the gradients of the hidden states and of the head's weight at
once, and drops the chunk. The backward only scales what the forward stored, so nothing is
recomputed: the FLOPs are those of the plain head (one product forward, two backward) and the
memory is one chunk's logits plus two tensors the size of the hidden states and of the weight.

Any loss that is a sum over positions works unchanged: the caller's function gets one chunk's
logits and the rows they belong to, and returns that chunk's share of the total (e.g. a masked
mean over the chunk times the chunk's share of the masked positions).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

# chunk_loss(logits [n, V] of rows, rows) -> (that chunk's share of the loss: a scalar with a
# gradient w.r.t. the logits, {name: detached value of a component's share, for logs}); or, for a
# loss that writes its gradient itself (lightning_modules.losses.sparse_kd_and_ce_with_gradient),
# (loss, components, d loss / d logits [n, V]): then no graph is built over the logits.
ChunkLoss = Callable[[torch.Tensor, slice], tuple]

# Each chunk holds several tensors of [chunk, V] float32 at once while its loss and gradient are
# computed (through autograd: logits, their copies in the loss, the gradients of each path; a loss
# with its gradient in closed form holds fewer, docs/performance.md): at 512 positions of a
# 49k vocabulary they rose about 480 MiB above the activations and set the KD step's peak, at 256
# about 150 (docs/performance.md, "Training step per stage"). The head's products over 256 rows
# still run at the machine's matrix rate (the chunked loss took 1.04x the time at 256 as at 512).
DEFAULT_CHUNK_TOKENS = 256


class HandOverGradients(torch.autograd.Function):
    """A loss whose gradients were computed in its forward (``head_loss``, the layer-by-layer
    alignment): ``apply(loss, grads, *inputs)`` returns the loss, and its backward hands ``grads``
    (one per input, None where there is none) over to ``inputs``, scaled in place by the incoming
    gradient (a loss scaler's factor, a weight on the loss). In place, so that no second copy of them
    exists at the backward's start, where a training step peaks; hence one backward only."""

    @staticmethod
    def forward(ctx, loss, grads, *inputs):
        ctx.grads = grads  # intermediate tensors, not inputs or outputs: kept as the context's own
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_loss):
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            raise RuntimeError("a loss whose gradients were computed in its forward (head_loss, the layer-by-layer "
                               "alignment) hands them over on its one backward: compute the loss again instead of "
                               "retain_graph=True")
        return (None, None, *[None if g is None else g.mul_(grad_loss.to(g.dtype)) for g in grads])


def _chunked_loss_and_gradients(hidden, weight, bias, want_weight: bool, want_bias: bool, chunk_loss,
                                chunk_tokens: int, components: dict):
    """The loss over ``F.linear(hidden, weight, bias)`` chunk by chunk, and its gradients w.r.t.
    hidden, weight (if ``want_weight``) and bias (if ``want_bias``); the inputs come detached."""
    n = hidden.shape[0]
    grad_hidden = torch.empty_like(hidden)
    grad_weight = torch.zeros_like(weight) if want_weight else None
    grad_bias = torch.zeros_like(bias) if want_bias else None
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, n, chunk_tokens):
        rows = slice(start, min(start + chunk_tokens, n))
        h = hidden[rows]
        with torch.enable_grad():
            logits = F.linear(h, weight, bias).requires_grad_(True)
            loss, parts, *written = chunk_loss(logits, rows)
            (grad_logits,) = written or torch.autograd.grad(loss, logits)
        total += loss.detach().float()
        for name, value in parts.items():
            components[name] = components.get(name, 0.0) + value.detach().float()
        grad_logits = grad_logits.to(h.dtype)
        torch.matmul(grad_logits, weight, out=grad_hidden[rows])
        if grad_weight is not None:
            grad_weight.addmm_(grad_logits.t(), h)
        if grad_bias is not None:
            grad_bias += grad_logits.sum(0)
        del logits, grad_logits, loss
    return total, (grad_hidden, grad_weight, grad_bias)


def head_loss(hidden: torch.Tensor, head: torch.nn.Linear, chunk_loss: ChunkLoss,
              chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss ``chunk_loss`` defines over ``head(hidden)``, summed over chunks of ``chunk_tokens``
    positions, with the gradients w.r.t. ``hidden`` and the head's parameters of the same loss over
    the whole logits. ``hidden`` [..., d] (flattened to rows in order). Returns (loss, the summed
    detached components ``chunk_loss`` reported). ``chunk_loss`` must not depend on anything
    that needs a gradient other than the logits it is given.

    ``head`` is called as its weight and bias, read inside the student's forward: under FSDP2 the
    caller runs this inside the root module's forward, where the head's parameters are gathered."""
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens={chunk_tokens} is invalid; allowed values: an integer >= 1 (positions "
                         "whose logits are computed at once)")
    components: dict[str, torch.Tensor] = {}
    rows = hidden.reshape(-1, hidden.shape[-1])
    weight, bias = head.weight, head.bias
    with torch.no_grad():
        total, grads = _chunked_loss_and_gradients(
            rows.detach(), weight.detach(), None if bias is None else bias.detach(), weight.requires_grad,
            bias is not None and bias.requires_grad, chunk_loss, chunk_tokens, components)
    return HandOverGradients.apply(total, grads, rows, weight, bias), components
