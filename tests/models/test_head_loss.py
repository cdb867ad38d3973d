"""The loss over the head in chunks: the same value and the same gradients as the loss over the
whole logits, for every student family, a bias, frozen heads and chunks that do not divide the rows."""

import pytest
import torch
import torch.nn.functional as F

from lightning_modules.losses import cross_entropy, sparse_kd_loss, teacher_topk
from models import DistilXLSTMConfig, HybridConfig, convert_to_hybrid, distil_xlstm_from_teacher
from models.head_loss import head_loss
from tests.conftest import make_teacher, rel_err


def mixed_loss(logits, targets, ids, logprobs, mask):
    """0.1 * sparse KD + 0.9 * CE, each a mean over the masked positions (the paper's Stage II)."""
    return 0.1 * sparse_kd_loss(logits, ids, logprobs, 2.0, mask, tail="bucket") + 0.9 * cross_entropy(logits, targets)


def chunked_mixed_loss(targets, ids, logprobs, mask):
    """The same loss as a sum of chunk shares: a chunk's masked mean times its share of the positions."""
    flat = [t.flatten(0, 1) for t in (targets, ids, logprobs, mask)]
    total = flat[3].sum().clamp_min(1)

    def chunk(logits, rows):
        t, i, lp, m = (x[rows] for x in flat)
        share = m.sum() / total
        kd = sparse_kd_loss(logits[None], i[None], lp[None], 2.0, m[None], tail="bucket") * share
        ce = cross_entropy(logits[None], t[None]) * share
        return 0.1 * kd + 0.9 * ce, {"kd": kd, "ce": ce}
    return chunk


def problem(seed=0, batch=3, seq=11, vocab=97, k=8):
    gen = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, vocab, (batch, seq), generator=gen)
    targets[0, -3:] = -100  # ignored positions
    ids, logprobs = teacher_topk(torch.randn(batch, seq, vocab, generator=gen) * 3, k)
    return targets, ids, logprobs, targets != -100


@pytest.mark.parametrize("chunk_tokens", [1, 5, 33, 1000])
@pytest.mark.parametrize("with_bias", [False, True])
def test_chunked_head_loss_equals_the_loss_over_whole_logits_with_its_gradients(chunk_tokens, with_bias):
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 97, bias=with_bias).double()
    hidden = torch.randn(3, 11, 16, dtype=torch.float64, requires_grad=True)
    targets, ids, logprobs, mask = problem()
    expected = mixed_loss(head(hidden), targets, ids, logprobs.double(), mask)
    expected_grads = torch.autograd.grad(expected, [hidden, *head.parameters()])
    got, parts = head_loss(hidden, head, chunked_mixed_loss(targets, ids, logprobs.double(), mask), chunk_tokens)
    got_grads = torch.autograd.grad(got, [hidden, *head.parameters()])
    torch.testing.assert_close(got, expected.float(), rtol=1e-6, atol=1e-7)
    for g, e in zip(got_grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-8)  # the losses run in float32
    torch.testing.assert_close(0.1 * parts["kd"] + 0.9 * parts["ce"], expected.float(), rtol=1e-6, atol=1e-7)


def test_a_frozen_head_gets_no_gradient_and_the_hidden_states_still_do():
    head = torch.nn.Linear(16, 97, bias=False).requires_grad_(False)
    hidden = torch.randn(2, 7, 16, requires_grad=True)
    targets = torch.randint(0, 97, (2, 7))
    loss, _ = head_loss(hidden, head, lambda logits, rows: (cross_entropy(logits[None], targets.flatten()[rows][None])
                                                           * (logits.shape[0] / 14), {}), 4)
    loss.backward()
    assert head.weight.grad is None
    (expected,) = torch.autograd.grad(F.cross_entropy(head(hidden).flatten(0, 1), targets.flatten()), hidden)
    torch.testing.assert_close(hidden.grad, expected, rtol=1e-5, atol=1e-7)


def test_chunk_tokens_below_one_is_refused():
    with pytest.raises(ValueError, match="chunk_tokens=0 is invalid"):
        head_loss(torch.zeros(1, 2, 4), torch.nn.Linear(4, 5), lambda logits, rows: (logits.sum(), {}), 0)


STUDENTS = {
    "hybrid": lambda t: convert_to_hybrid(t, HybridConfig(window=4, sink_tokens=1, chunk_size=16)),
    "distil_xlstm": lambda t: distil_xlstm_from_teacher(t, DistilXLSTMConfig()),
}


@pytest.mark.parametrize("family", sorted(STUDENTS))
def test_student_chunk_loss_trains_every_parameter_as_the_whole_logits_loss_does(family):
    """Tied embedding and head (SmolLM2 ties them): the chunked head's weight gradient and the
    embedding's add up in one tensor, as with the plain head."""
    teacher = make_teacher("llama", tie_word_embeddings=True)
    student = STUDENTS[family](teacher).double()
    ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(1))
    targets, top_ids, logprobs, mask = problem(batch=2, seq=12)
    params = [p for p in student.parameters() if p.requires_grad]
    out = student(ids)
    expected = mixed_loss(out.logits, targets, top_ids, logprobs.double(), mask)
    expected_grads = torch.autograd.grad(expected, params)
    got = student(ids, chunk_loss=chunked_mixed_loss(targets, top_ids, logprobs.double(), mask), chunk_tokens=5)
    assert got.logits is None and set(got.loss_components) == {"kd", "ce"}
    got_grads = torch.autograd.grad(got.loss, params)
    torch.testing.assert_close(got.loss, expected.float(), rtol=1e-6, atol=1e-7)
    for (name, _), g, e in zip([(n, p) for n, p in student.named_parameters() if p.requires_grad], got_grads,
                               expected_grads):
        assert rel_err(g, e) < 1e-5, name  # float32 rounding of the losses, through the layers


def test_student_refuses_chunk_loss_with_labels_or_padding():
    student = STUDENTS["hybrid"](make_teacher("llama"))
    ids = torch.randint(0, 97, (2, 6))
    loss = lambda logits, rows: (logits.sum(), {})  # noqa: E731
    with pytest.raises(ValueError, match="put the cross-entropy inside chunk_loss"):
        student(ids, labels=ids, chunk_loss=loss)
    mask = torch.ones_like(ids)
    mask[0, -1] = 0
    with pytest.raises(ValueError, match="chunk_loss needs an unpadded batch"):
        student(ids, attention_mask=mask, chunk_loss=loss)


def test_the_backward_scales_the_gradients_by_the_incoming_one_and_refuses_a_second_run():
    # the precomputed gradients are handed over scaled in place (no second head-sized copy), so a
    # loss multiplied after head_loss must scale them, and a second backward must say why it cannot
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 97).double()
    hidden = torch.randn(3, 11, 16, dtype=torch.float64, requires_grad=True)
    targets, ids, logprobs, mask = problem()
    expected = 2.5 * mixed_loss(head(hidden), targets, ids, logprobs.double(), mask)
    expected_grads = torch.autograd.grad(expected, [hidden, *head.parameters()])
    got, _ = head_loss(hidden, head, chunked_mixed_loss(targets, ids, logprobs.double(), mask), 5)
    got_grads = torch.autograd.grad(2.5 * got, [hidden, *head.parameters()], retain_graph=True)
    for g, e in zip(got_grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-8)
    with pytest.raises(RuntimeError, match="retain_graph"):
        torch.autograd.grad(got, [hidden])
