import math

import pytest
import torch
import torch.nn.functional as F

from lightning_modules.losses import (
    IGNORE, alignment_mse, cross_entropy, dense_kd_loss, frobenius_alignment_loss, heldout_metrics,
    next_token_targets, sparse_kd_and_ce_with_gradient, sparse_kd_loss, teacher_topk,
)


def logits_pair(V=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 5, V, generator=g, dtype=torch.float64) * 2, torch.randn(2, 5, V, generator=g, dtype=torch.float64) * 2


@pytest.mark.parametrize("T", [1.0, 2.0, 0.7])
def test_sparse_kd_with_full_vocabulary_equals_dense_kl(T):
    s, t = logits_pair()
    ids, lp = teacher_topk(t, k=11)
    sparse = sparse_kd_loss(s, ids, lp, T)
    # textbook formula, written out in float64
    p = torch.softmax(t / T, -1)
    q = torch.softmax(s / T, -1)
    expected = T**2 * (p * (p.log() - q.log())).sum(-1).mean()
    assert sparse.item() == pytest.approx(expected.item(), rel=1e-5)
    assert dense_kd_loss(s, t, T).item() == pytest.approx(expected.item(), rel=1e-5)


def test_sparse_kd_hand_computed_bucket():
    # vocabulary 3, k = 1: teacher p = [0.7, 0.2, 0.1] -> classes [0.7, 0.3]; student [0.5, 0.3, 0.2] -> [0.5, 0.5]
    t = torch.tensor([[[0.7, 0.2, 0.1]]]).log()
    s = torch.tensor([[[0.5, 0.3, 0.2]]]).log()
    ids, lp = teacher_topk(t, k=1)
    expected = 0.7 * math.log(0.7 / 0.5) + 0.3 * math.log(0.3 / 0.5)
    assert sparse_kd_loss(s, ids, lp, 1.0).item() == pytest.approx(expected, rel=1e-5)
    # at T = 2 both two-class distributions are p^(1/2) renormalised
    pt = torch.tensor([0.7, 0.3]).sqrt()
    pt = pt / pt.sum()
    ps = torch.tensor([0.5, 0.5])
    expected2 = 4 * float((pt * (pt / ps).log()).sum())
    assert sparse_kd_loss(s, ids, lp, 2.0).item() == pytest.approx(expected2, rel=1e-5)


def test_kd_is_zero_for_identical_models_and_positive_otherwise():
    s, t = logits_pair()
    ids, lp = teacher_topk(t, k=4)
    assert sparse_kd_loss(t, ids, lp, 2.0).abs().item() < 1e-6
    assert sparse_kd_loss(s, ids, lp, 2.0).item() > 0


def test_everything_masked_gives_zero_not_nan():
    s, t = logits_pair()
    s.requires_grad_(True)
    ids, lp = teacher_topk(t, k=4)
    targets = torch.full((2, 5), IGNORE)
    kd = sparse_kd_loss(s, ids, lp, 2.0, mask=targets != IGNORE)
    ce = cross_entropy(s, targets)
    assert kd.item() == 0.0 and ce.item() == 0.0
    (kd + ce).backward()
    assert torch.isfinite(s.grad).all()


def test_cross_entropy_matches_torch_on_unmasked_positions():
    s, _ = logits_pair()
    targets = torch.randint(0, 11, (2, 5))
    targets[0, :2] = IGNORE
    expected = F.cross_entropy(s.reshape(-1, 11), targets.reshape(-1), ignore_index=IGNORE)
    assert cross_entropy(s, targets).item() == pytest.approx(expected.item(), rel=1e-6)


def test_next_token_targets_shift():
    labels = torch.tensor([[5, 6, 7, IGNORE]])
    assert next_token_targets(labels).tolist() == [[6, 7, IGNORE, IGNORE]]


def test_frobenius_and_alignment_mse_formulas():
    a, b = torch.randn(3, 4, 5), torch.randn(3, 4, 5)
    expected = sum(torch.sqrt(((a[i] - b[i]) ** 2).sum()) for i in range(3)) / 3 / math.sqrt(20)
    assert frobenius_alignment_loss(a, b).item() == pytest.approx(expected.item(), rel=1e-6)
    assert alignment_mse([a, b], [b, b]).item() == pytest.approx((((a - b) ** 2).mean() / 2).item(), rel=1e-6)
    # the paper's Eq. 12 sums the layers
    c = torch.randn(3, 4, 5)
    expected = ((a - b) ** 2).mean() + ((c - b) ** 2).mean()
    assert alignment_mse([a, c], [b, b], reduction="sum").item() == pytest.approx(expected.item(), rel=1e-6)
    with pytest.raises(ValueError, match="reduction='max' is not supported; allowed values: sum, mean"):
        alignment_mse([a], [b], reduction="max")
    with pytest.raises(ValueError, match="one teacher output per student layer"):
        alignment_mse([a], [a, b])


def test_heldout_metrics_against_per_position_hand_computation():
    s, t = logits_pair(V=7, seed=3)
    targets = torch.tensor([[1, 2, IGNORE, 4, 0], [IGNORE, IGNORE, 6, 5, 3]])
    m = heldout_metrics(s, t, targets)
    kept = [(b, i) for b in range(2) for i in range(5) if targets[b, i] != IGNORE]
    s_ce = [-math.log(math.exp(s[b, i, targets[b, i]]) / sum(math.exp(x) for x in s[b, i].tolist())) for b, i in kept]
    t_ce = [-math.log(math.exp(t[b, i, targets[b, i]]) / sum(math.exp(x) for x in t[b, i].tolist())) for b, i in kept]
    kls, agree = [], []
    for b, i in kept:
        p = [math.exp(x) for x in t[b, i].tolist()]
        q = [math.exp(x) for x in s[b, i].tolist()]
        p, q = [x / sum(p) for x in p], [x / sum(q) for x in q]
        kls.append(sum(pi * math.log(pi / qi) for pi, qi in zip(p, q)))
        agree.append(float(max(range(7), key=lambda v: p[v]) == max(range(7), key=lambda v: q[v])))
    for name, expected in (("student_ce", s_ce), ("teacher_ce", t_ce), ("kl_teacher_student", kls),
                           ("top1_agreement", agree)):
        assert float(m[name]) == pytest.approx(sum(expected) / len(expected), rel=1e-5), name
    assert heldout_metrics(s, t, torch.full_like(targets, IGNORE)) == {}


@pytest.mark.parametrize("T", [1.0, 2.0, 0.5])
def test_renormalised_tail_is_the_kl_of_the_tempered_distributions_restricted_to_the_top_k(T):
    """Reference in float64 from the dense logits: softmax(z / T) of either model, kept on the
    teacher's top-k and renormalised there, then KL(teacher || student), times T^2."""
    s, t = logits_pair(V=13, seed=3)
    k = 5
    ids, logprobs = teacher_topk(t, k)
    expected = []
    for b in range(2):
        for pos in range(5):
            support = ids[b, pos]
            p = torch.softmax(t[b, pos] / T, -1)[support]
            q = torch.softmax(s[b, pos] / T, -1)[support]
            p, q = p / p.sum(), q / q.sum()
            expected.append((p * (p / q).log()).sum())
    loss = sparse_kd_loss(s, ids, logprobs, T, tail="renormalised")
    assert loss.item() == pytest.approx(T**2 * torch.stack(expected).mean().item(), rel=1e-5)
    # it differs from the bucket form, and both vanish when the student is the teacher
    assert loss.item() != pytest.approx(sparse_kd_loss(s, ids, logprobs, T, tail="bucket").item(), rel=1e-3)
    assert sparse_kd_loss(t, ids, logprobs, T, tail="renormalised").item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="tail='dense' is not supported; allowed values: bucket, renormalised"):
        sparse_kd_loss(s, ids, logprobs, T, tail="dense")


def test_bucket_tail_at_t_above_one_is_not_dense_kd_below_the_full_vocabulary():
    """What the docstring says the bucket is: exact dense KD at T = 1 on the coarsened classes, but
    at T = 2 it tempers the bucket as one class, which is not the tempered tail's mass."""
    s, t = logits_pair(V=13, seed=4)
    ids, logprobs = teacher_topk(t, 4)
    log_p, log_q = torch.log_softmax(t / 2.0, -1), torch.log_softmax(s / 2.0, -1)

    def coarsened(log_dist):
        top = log_dist.gather(-1, ids)
        rest = torch.log1p(-top.exp().sum(-1, keepdim=True))
        return torch.cat([top, rest], -1)

    a, b = coarsened(log_p), coarsened(log_q)
    tempered_then_coarsened = 4.0 * (a.exp() * (a - b)).sum(-1).mean()
    assert sparse_kd_loss(s, ids, logprobs, 2.0).item() != pytest.approx(tempered_then_coarsened.item(), rel=1e-3)


def autograd_kd_and_ce(logits, targets, ids, logprobs, T, kd_weight, ce_weight, positions, tail):
    """Autograd through the library's ``sparse_kd_loss`` and ``cross_entropy`` (float32 inside), each a
    masked mean over the rows times the rows' share of ``positions``: what the plain plan trains on."""
    logits = logits.detach().requires_grad_(True)
    share = (targets != IGNORE).sum() / positions
    kd = sparse_kd_loss(logits[None], ids[None], logprobs[None], T, (targets != IGNORE)[None], tail=tail) * share
    ce = cross_entropy(logits[None], targets[None]) * share
    loss = kd_weight * kd + ce_weight * ce
    (grad,) = torch.autograd.grad(loss, logits)
    return loss, kd, ce, grad


def float64_kd_and_ce(logits, targets, ids, logprobs, T, kd_weight, ce_weight, positions, tail):
    """The same loss written out from the definitions in float64 (the library's losses round to
    float32), with autograd's gradient: log-softmax, the k (+ 1) classes, tempered, KL, T^2."""
    logits = logits.detach().requires_grad_(True)
    weight = (targets != IGNORE).double() / positions
    log_p = torch.log_softmax(logits, -1)
    student, teacher = log_p.gather(-1, ids), logprobs.double()
    if tail == "bucket":
        others = log_p.scatter(-1, ids, float("-inf"))
        student = torch.cat([student, torch.logsumexp(others, -1, keepdim=True)], -1)
        rest = (1 - teacher.exp().sum(-1, keepdim=True)).clamp_min(0)
        teacher = torch.cat([teacher, torch.where(rest < 1e-6, 0.0, rest).log()], -1)
    log_qs, log_qt = torch.log_softmax(student / T, -1), torch.log_softmax(teacher / T, -1)
    kl = torch.where(log_qt.exp() > 0, log_qt.exp() * (log_qt - log_qs), 0.0).sum(-1)
    kd = T**2 * (kl * weight).sum()
    ce = -(log_p.gather(-1, targets.clamp_min(0)[:, None])[:, 0] * weight).sum()
    loss = kd_weight * kd + ce_weight * ce
    (grad,) = torch.autograd.grad(loss, logits)
    return loss, kd, ce, grad


@pytest.mark.parametrize("tail", ["bucket", "renormalised"])
@pytest.mark.parametrize("T", [1.0, 2.5, 0.6])
@pytest.mark.parametrize("case", ["plain", "target_in_top_k", "k_is_the_vocabulary", "teacher_rest_empty",
                                  "all_ignored"])
def test_closed_form_kd_and_ce_gradient_equals_autograd_in_float64(tail, T, case):
    """The loss, both terms and the gradient w.r.t. the logits, against autograd through the
    definitions in float64: ignored rows, a target inside and outside the top-k, k = V (no tail:
    its logsumexp is -inf), a teacher whose top-k holds all its mass (an empty bucket)."""
    g = torch.Generator().manual_seed(sum(map(ord, f"{tail}{T}{case}")))
    n, V, k = 9, 31, (31 if case == "k_is_the_vocabulary" else 6)
    logits = torch.randn(n, V, generator=g, dtype=torch.float64) * 3
    teacher = torch.randn(n, V, generator=g, dtype=torch.float64) * 3
    if case == "teacher_rest_empty":
        teacher[:, k:] = -1e4  # every token outside the teacher's first k: no mass left for the bucket
    ids, logprobs = teacher_topk(teacher[None], k)
    ids, logprobs = ids[0], logprobs[0]
    targets = torch.randint(0, V, (n,), generator=g)
    targets[[1, 4]] = IGNORE
    if case == "target_in_top_k":
        targets[[0, 2, 3]] = ids[[0, 2, 3], 0]
    if case == "all_ignored":
        targets[:] = IGNORE
    positions = 20  # the batch's rows with a target, of which this chunk holds some
    expected = float64_kd_and_ce(logits, targets, ids, logprobs, T, 0.3, 0.7, positions, tail)
    got = sparse_kd_and_ce_with_gradient(logits.clone(), targets, ids, logprobs, T, 0.3, 0.7, positions, tail=tail)
    for name, a, b in zip(("loss", "kd", "ce", "gradient"), got, expected):
        assert a.dtype == torch.float64, name
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=name)
    assert bool(got[3].abs().sum() > 0) == (case != "all_ignored")


def test_closed_form_kd_and_ce_gradient_in_float32_and_its_refusal():
    """float32 logits (a training step's) give float32 results within float32's rounding of the
    float64 reference; an unknown tail is refused, naming the allowed ones."""
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(6, 50, generator=g, dtype=torch.float64) * 4
    ids, logprobs = teacher_topk(torch.randn(1, 6, 50, generator=g, dtype=torch.float64) * 4, 8)
    targets = torch.randint(0, 50, (6,), generator=g)
    expected = float64_kd_and_ce(logits, targets, ids[0], logprobs[0], 2.0, 0.1, 0.9, 6, "bucket")
    library = autograd_kd_and_ce(logits.float(), targets, ids[0], logprobs[0].float(), 2.0, 0.1, 0.9, 6, "bucket")
    got = sparse_kd_and_ce_with_gradient(logits.float(), targets, ids[0], logprobs[0].float(), 2.0, 0.1, 0.9, 6)
    for a, b, c in zip(got, expected, library):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-7)  # autograd through the losses themselves
    with pytest.raises(ValueError, match="tail='dense' is not supported; allowed values: bucket, renormalised"):
        sparse_kd_and_ce_with_gradient(logits, targets, ids[0], logprobs[0], 1.0, 0.1, 0.9, 6, tail="dense")
