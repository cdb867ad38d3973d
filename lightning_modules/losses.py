"""Losses of the training stages, as plain functions (DESIGN §4). Each is tested against its
textbook formula in tests/lightning_modules/test_losses.py.

Conventions: ``logits`` [B, T, V] predict the token after each position; ``targets`` [B, T] hold
that next token, or IGNORE where no loss applies (padding, prompts, the last position).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models.targets import IGNORE, next_token_targets, teacher_topk  # noqa: F401 (the losses' conventions)


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` where ``mask``; 0 (with a gradient path) when nothing is selected."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over positions with a target (0 if there are none)."""
    per_token = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten().clamp_min(0), reduction="none")
    return masked_mean(per_token, targets.flatten() != IGNORE)


# Teacher top-k log-probabilities come from a cache in float32 or float16, so 1 - sum(p) carries
# rounding noise of about 1e-7 per entry; a remaining mass below this is treated as exactly zero.
REST_MASS_NOISE = 1e-6


def _tempered(log_classes: torch.Tensor, temperature: float) -> torch.Tensor:
    """Raise a distribution over classes to 1/T and renormalise, in log space."""
    scaled = log_classes / temperature
    return scaled - torch.logsumexp(scaled, -1, keepdim=True)


def _teacher_classes(topk_logprobs: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """log of the teacher's (k + 1)-class distribution [top-k tokens, every other token]."""
    rest = (1.0 - topk_logprobs.double().exp().sum(-1, keepdim=True)).clamp_min(0.0)
    rest = torch.where(rest < REST_MASS_NOISE, torch.zeros_like(rest), rest)
    return torch.cat([topk_logprobs.to(dtype), rest.log().to(dtype)], -1)


def _student_classes(student_logits: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """log of the student's (k + 1)-class distribution on the teacher's top-k support; the rest is
    computed from the other logits directly (exact, -inf when k covers the vocabulary)."""
    logits = student_logits.float()
    log_z = torch.logsumexp(logits, -1, keepdim=True)
    on_support = logits.gather(-1, topk_ids.long()) - log_z
    others = logits.scatter(-1, topk_ids.long(), float("-inf"))
    return torch.cat([on_support, torch.logsumexp(others, -1, keepdim=True) - log_z], -1)


KD_TAILS = ("bucket", "renormalised")


def _check_tail(tail: str) -> None:
    if tail not in KD_TAILS:
        raise ValueError(f"tail={tail!r} is not supported; allowed values: {', '.join(KD_TAILS)}")


def _teacher_log_q(topk_logprobs: torch.Tensor, temperature: float, tail: str,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The teacher's tempered log-distribution over the tail's classes (the top-k, and the bucket)."""
    classes = _teacher_classes(topk_logprobs, dtype) if tail == "bucket" else topk_logprobs.to(dtype)
    return _tempered(classes, temperature)


def _kl_per_position(log_q_teacher: torch.Tensor, log_q_student: torch.Tensor):
    """(KL(teacher || student) over the classes, per position; the teacher's probabilities)."""
    q_teacher = log_q_teacher.exp()
    # 0 * log 0 = 0: an empty "rest" bucket contributes nothing, never nan
    terms = torch.where(q_teacher > 0, q_teacher * (log_q_teacher - log_q_student), torch.zeros_like(q_teacher))
    return terms.sum(-1), q_teacher


def sparse_kd_loss(student_logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor,
                   temperature: float, mask: torch.Tensor | None = None, tail: str = "bucket") -> torch.Tensor:
    """T^2 * KL between the teacher's and the student's tempered distributions reduced to the
    teacher's top-k, averaged over positions where ``mask`` (default: all). ``tail`` says what
    happens to the tokens outside the top-k:

    - ``renormalised`` (the paper's p^(k), Eq. 13): both distributions restricted to the top-k and
      renormalised there, after tempering: q_t ~ softmax(z_t / T) on the support, likewise q_s. At
      any T this is the dense tempered distributions' KL once both are conditioned on the support.
    - ``bucket``: k + 1 classes, the top-k tokens and "any other token" carrying the remaining
      mass, tempered as classes (q ~ p^(1/T) over the k + 1 classes). At T = 1 this is exactly the
      KL between the coarsened dense distributions (a lower bound of the dense KL); at T != 1 the
      bucket is tempered as one class, which is not the tempered tail's mass (the sum of p_i^(1/T)
      over the tail), so it is dense KD at T != 1 only when k is the whole vocabulary.
    """
    _check_tail(tail)
    if tail == "renormalised":
        # the log-normaliser of either side cancels in the renormalisation: logits on the support suffice
        log_q_student = _tempered(student_logits.float().gather(-1, topk_ids.long()), temperature)
    else:
        log_q_student = _tempered(_student_classes(student_logits, topk_ids), temperature)
    kl, _ = _kl_per_position(_teacher_log_q(topk_logprobs, temperature, tail), log_q_student)
    if mask is None:
        mask = torch.ones_like(kl, dtype=torch.bool)
    return temperature**2 * masked_mean(kl, mask)


def sparse_kd_and_ce_with_gradient(logits: torch.Tensor, targets: torch.Tensor, topk_ids: torch.Tensor,
                                   topk_logprobs: torch.Tensor, temperature: float, kd_weight: float,
                                   ce_weight: float, positions: int | torch.Tensor, tail: str = "bucket"):
    """``kd_weight * sparse_kd_loss + ce_weight * cross_entropy`` over rows of logits, each term a
    sum over the rows with a target divided by ``positions`` (the whole batch's count, so that chunks
    add up to the batch's means), with its gradient w.r.t. the logits written in closed form: what
    autograd through ``sparse_kd_loss`` and ``cross_entropy`` gives, from one log-softmax and no
    graph. Autograd keeps the logits' log-softmax twice (once per term), the k + 1 classes' gather
    and scatter and a gradient per path, each [n, V]; this holds the log-softmax and, inside the
    tail's logsumexp, one temporary. Over SmolLM2's head (49k words, 256 positions a chunk) the loss
    over the head, products included, took 0.63x autograd's time and added 320 MiB against 467
    (docs/performance.md, "The KD loss's gradient in closed form").

    logits [n, V] (any float dtype; computed in float32, or float64 for float64 logits; left as they
    are). targets [n] (IGNORE: no loss), topk_ids / topk_logprobs [n, k].
    Returns (loss, KD term, cross-entropy term, gradient [n, V]); the terms unweighted.

    The gradient (s: the student's log-classes, a_c = d loss / d s_c = kd_weight T (q_s - q_t)_c
    per position weight, since d(T^2 KL)/ds = T (q_s - q_t)): on the top-k, a_i plus the
    cross-entropy's p_i w; off it, with the ``bucket`` tail, s_rest = log sum_{j not in K} p_j gives
    a_rest p_i / (1 - P_K) = a_rest exp(z_i - logsumexp_{j not in K} z_j), and the cross-entropy
    p_i w; with ``renormalised`` only the cross-entropy's. Then -w at the target token."""
    _check_tail(tail)
    dtype = torch.promote_types(logits.dtype, torch.float32)
    ids = topk_ids.long()
    weight = (targets != IGNORE).to(dtype) / positions  # per position: its share of the batch's mean
    tokens = targets.clamp_min(0)[:, None]
    with torch.no_grad():
        log_p = torch.log_softmax(logits.detach().to(dtype), -1)
        log_p_topk = log_p.gather(-1, ids)
        ce = -(log_p.gather(-1, tokens)[:, 0] * weight).sum()
        if tail == "bucket":
            log_p.scatter_(-1, ids, float("-inf"))  # what is left: the tokens outside the top-k
            log_rest = torch.logsumexp(log_p, -1, keepdim=True)  # log(1 - P_K), exact; -inf when k = V
            log_q_student = _tempered(torch.cat([log_p_topk, log_rest], -1), temperature)
        else:
            log_q_student = _tempered(log_p_topk, temperature)
        kl, q_teacher = _kl_per_position(_teacher_log_q(topk_logprobs, temperature, tail, dtype), log_q_student)
        q_student = log_q_student.exp()
        kd = temperature**2 * (kl * weight).sum()
        d_classes = (kd_weight * temperature) * (q_student - q_teacher) * weight[:, None]
        ce_w = (ce_weight * weight)[:, None]
        if tail == "bucket":
            d_rest = d_classes[:, -1:] * torch.exp(-log_rest)
            off_topk = ce_w + torch.where(torch.isinf(log_rest), torch.zeros_like(d_rest), d_rest)
            grad = log_p.exp_().mul_(off_topk)  # the top-k's entries are exp(-inf) = 0 here
            grad.scatter_(-1, ids, d_classes[:, :-1] + ce_w * log_p_topk.exp())
        else:
            grad = log_p.exp_().mul_(ce_w)
            grad.scatter_add_(-1, ids, d_classes)
        grad.scatter_add_(-1, tokens, -ce_w)
    return kd_weight * kd + ce_weight * ce, kd, ce, grad


def dense_kd_loss(student_logits, teacher_logits, temperature: float, mask=None) -> torch.Tensor:
    """Textbook T^2 * KL(softmax(z_t / T) || softmax(z_s / T)), averaged over masked positions."""
    log_p = F.log_softmax(teacher_logits.float() / temperature, -1)
    log_q = F.log_softmax(student_logits.float() / temperature, -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    if mask is None:
        mask = torch.ones_like(kl, dtype=torch.bool)
    return temperature**2 * masked_mean(kl, mask)


def frobenius_alignment_loss(student_hidden: torch.Tensor, teacher_hidden: torch.Tensor) -> torch.Tensor:
    """Distil-xLSTM eq. 38: mean over the batch of ||h_t - h_s||_F, divided by sqrt(|h_s|) where
    |h_s| is the number of elements of one sequence's hidden state ([B, T, D] -> T * D)."""
    diff = (teacher_hidden.float() - student_hidden.float()).flatten(1)
    return diff.norm(dim=1).mean() / diff.shape[1] ** 0.5


LAYER_REDUCTIONS = ("sum", "mean")


def alignment_mse(student_outputs: list[torch.Tensor], teacher_outputs: list[torch.Tensor],
                  reduction: str = "mean") -> torch.Tensor:
    """Stage 1: the MSE between student and teacher attention outputs of each layer (mean over
    tokens and features), summed (the paper's Eq. 12) or averaged over layers."""
    if len(student_outputs) != len(teacher_outputs) or not student_outputs:
        raise ValueError(f"alignment needs one teacher output per student layer; got {len(student_outputs)} "
                         f"student and {len(teacher_outputs)} teacher outputs")
    check_layer_reduction(reduction)
    return combine_layer_losses([F.mse_loss(s.float(), t.float()) for s, t in zip(student_outputs, teacher_outputs)],
                                reduction)


def check_layer_reduction(reduction: str) -> None:
    if reduction not in LAYER_REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} is not supported; allowed values: {', '.join(LAYER_REDUCTIONS)}")


def combine_layer_losses(per_layer: list[torch.Tensor], reduction: str) -> torch.Tensor:
    """Per-layer losses summed (the paper's Eq. 12) or averaged over layers."""
    check_layer_reduction(reduction)
    stacked = torch.stack(per_layer)
    return stacked.sum() if reduction == "sum" else stacked.mean()


def heldout_metrics(student_logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor) -> dict:
    """Validation signals of a student against its teacher on held-out text, as means over the
    positions with a target: both cross-entropies, KL(teacher || student) and top-1 agreement (how
    often the student's most likely next token is the teacher's). Empty when nothing is scored."""
    mask = targets != IGNORE
    if not bool(mask.any()):
        return {}
    s_logits, t_logits = student_logits.float(), teacher_logits.float()
    log_p = torch.log_softmax(t_logits, -1)
    log_q = torch.log_softmax(s_logits, -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)[mask].mean()
    agree = (s_logits.argmax(-1) == t_logits.argmax(-1))[mask].float().mean()
    return {"student_ce": cross_entropy(s_logits, targets), "teacher_ce": cross_entropy(t_logits, targets),
            "kl_teacher_student": kl, "top1_agreement": agree}
