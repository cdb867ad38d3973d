"""The KD loss over the head benchmark: the stage-2 loss (sparse KD + cross-entropy over the
vocabulary-sized head, in chunks of positions, ``models.head_loss``) with its gradient in closed form
(``lightning_modules.losses.sparse_kd_and_ce_with_gradient``, what the KD stages run) against the
same loss's autograd gradient, side by side: time per forward and backward, paired round by round,
and the peak memory each adds, each measured in a fresh process.

``head_loss_peak`` is what that fresh interpreter runs; this module imports only what it needs.
"""

from __future__ import annotations

import itertools
import statistics

import torch

from experiments.bench_base import BenchBase
from experiments.bench_report import interval_text, markdown_table, paired_ratio
from experiments.measure import MiB, PeakMemory, peak_in_fresh_process, proc_status_bytes, timed

GRADIENTS = ("closed_form", "autograd")
# the loss timed and measured: 0.1 sparse KD at T = 2 + 0.9 cross-entropy (the paper's stage-2 weights)
KD_LOSS = dict(temperature=2.0, kd_weight=0.1, ce_weight=0.9)


def kd_chunk_loss(gradient: str, targets, topk_ids, topk_logprobs, temperature: float, kd_weight: float,
                  ce_weight: float):
    """The chunk function ``models.head_loss`` calls for ``kd_weight`` sparse KD (bucket tail) +
    ``ce_weight`` cross-entropy over rows [n]: ``closed_form`` returns its gradient,
    ``autograd`` leaves it to autograd through ``sparse_kd_loss`` and ``cross_entropy``."""
    from lightning_modules.losses import IGNORE, cross_entropy, sparse_kd_and_ce_with_gradient, sparse_kd_loss

    if gradient not in GRADIENTS:
        raise ValueError(f"gradient={gradient!r} is not supported; allowed values: {', '.join(GRADIENTS)}")
    positions = (targets != IGNORE).sum().clamp_min(1)

    def closed_form(logits, rows):
        loss, kd, ce, grad = sparse_kd_and_ce_with_gradient(logits, targets[rows], topk_ids[rows], topk_logprobs[rows],
                                                            temperature, kd_weight, ce_weight, positions)
        return loss, {"kd": kd, "ce": ce}, grad

    def through_autograd(logits, rows):
        t = targets[rows]
        share = (t != IGNORE).sum() / positions
        kd = sparse_kd_loss(logits[None], topk_ids[rows][None], topk_logprobs[rows][None], temperature,
                            (t != IGNORE)[None]) * share
        ce = cross_entropy(logits[None], t[None]) * share
        return kd_weight * kd + ce_weight * ce, {"kd": kd, "ce": ce}
    return closed_form if gradient == "closed_form" else through_autograd


def head_loss_problem(rows: int, hidden_size: int, vocab: int, top_k: int, seed: int = 0,
                      device: torch.device = torch.device("cpu")):
    """A head [vocab, hidden] (requires grad), hidden states [rows, hidden] (requires grad), next
    tokens and a teacher's top-k over the same vocabulary, on ``device``: random, logits of a few
    units as a trained model's."""
    from lightning_modules.losses import teacher_topk

    gen = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(hidden_size, vocab, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, hidden_size, generator=gen) / hidden_size**0.5)
    hidden = (torch.randn(rows, hidden_size, generator=gen) * 3).to(device).requires_grad_(True)
    targets = torch.randint(0, vocab, (rows,), generator=gen)
    ids, logprobs = teacher_topk((torch.randn(1, rows, vocab, generator=gen) * 3), top_k)
    return head.to(device), hidden, targets.to(device), ids[0].to(device), logprobs[0].to(device)


def head_loss_step(head, hidden, chunk_loss, chunk_tokens: int) -> torch.Tensor:
    """One forward and backward of the loss over the head; the gradients land in .grad."""
    from models.head_loss import head_loss

    head.weight.grad = hidden.grad = None
    loss, _ = head_loss(hidden, head, chunk_loss, chunk_tokens)
    loss.backward()
    return loss.detach()


def head_loss_peak(gradient: str, rows: int, hidden_size: int, vocab: int, top_k: int, chunk_tokens: int,
                   device: str = "cpu") -> int:
    """Peak memory one step of the loss over the head adds to what is held before it (head, hidden
    states, targets and top-k), in bytes: on a CPU the resident set (run it in a fresh process), on
    CUDA the allocator's peak over what was allocated."""
    where = torch.device(device)
    head, hidden, targets, ids, logprobs = head_loss_problem(rows, hidden_size, vocab, top_k, device=where)
    chunk_loss = kd_chunk_loss(gradient, targets, ids, logprobs, **KD_LOSS)
    before = torch.cuda.memory_allocated(where) if where.type == "cuda" else None
    with PeakMemory(where) as peak:
        if before is None:
            before = proc_status_bytes("VmRSS")
        head_loss_step(head, hidden, chunk_loss, chunk_tokens)
    return peak.bytes - before


def head_loss_peak_in_fresh_process(gradient: str, rows: int, hidden_size: int, vocab: int, top_k: int,
                                    chunk_tokens: int) -> int:
    """``head_loss_peak`` in a new interpreter whose resident set follows its live tensors
    (``measure.peak_in_fresh_process``)."""
    return peak_in_fresh_process("experiments.bench_head_loss", "head_loss_peak", gradient, rows, hidden_size, vocab,
                                 top_k, chunk_tokens)


class HeadLossBenchmark(BenchBase):
    """``head_loss``."""

    def head_loss(self, seq_len: int = 512, batch: int = 4, top_k: int = 256, chunk_tokens: list[int] = [256, 512],
                  rounds: int = 9, warmup: int = 1) -> dict:
        """The KD stages' loss over the head (0.1 sparse KD on the teacher's top-k at T = 2, bucket
        tail, + 0.9 cross-entropy) for ``batch`` x ``seq_len`` positions of the teacher's head shape,
        with the gradient in closed form and through autograd, at each chunk size: ``rounds`` paired
        rounds, each timing every variant once (order reversed every other round), and the peak
        memory each adds, in a fresh process. Also the two gradients' largest difference.

        Args:
            seq_len: tokens per sequence.
            batch: sequences.
            top_k: teacher tokens kept per position.
            chunk_tokens: positions whose logits are computed at once (the KD stages' loss_chunk_tokens).
            rounds: paired rounds (9: a 96 % interval for the median ratio).
            warmup: untimed steps of each variant first.
        """
        if rounds < 1 or warmup < 0:
            raise ValueError(f"rounds={rounds}, warmup={warmup} are invalid; allowed values: rounds >= 1, warmup >= 0")
        teacher, _ = self._loaded()
        config = teacher.config
        rows_n, d, vocab = batch * seq_len, config.hidden_size, config.vocab_size
        head, hidden, targets, ids, logprobs = head_loss_problem(rows_n, d, vocab, top_k, self.seed, self.device)
        variants = list(itertools.product(chunk_tokens, GRADIENTS))
        losses = {g: kd_chunk_loss(g, targets, ids, logprobs, **KD_LOSS) for g in GRADIENTS}
        times = {v: [] for v in variants}
        results = {}
        for chunk, gradient in variants:
            for _ in range(warmup):
                head_loss_step(head, hidden, losses[gradient], chunk)
            results[(chunk, gradient)] = (head_loss_step(head, hidden, losses[gradient], chunk),
                                          hidden.grad.clone(), head.weight.grad.clone())
        for round_ in range(rounds):
            for chunk, gradient in variants[::-1] if round_ % 2 else variants:
                times[(chunk, gradient)].append(timed(lambda: head_loss_step(head, hidden, losses[gradient], chunk),
                                                      self.device)[1])
        rows = []
        for chunk, gradient in variants:
            loss, grad_hidden, grad_weight = results[(chunk, gradient)]
            ref_loss, ref_hidden, ref_weight = results[(chunk, "autograd")]
            if self.device.type == "cuda":
                peak = head_loss_peak(gradient, rows_n, d, vocab, top_k, chunk, str(self.device))
            else:
                peak = head_loss_peak_in_fresh_process(gradient, rows_n, d, vocab, top_k, chunk)
            row = {"chunk_tokens": chunk, "gradient": gradient, "times_s": times[(chunk, gradient)],
                   "ms": 1e3 * statistics.median(times[(chunk, gradient)]), "loss": float(loss),
                   "peak_added_mib": peak / MiB}
            if gradient != "autograd":
                row["loss_difference"] = abs(float(loss) - float(ref_loss))
                row["max_gradient_difference"] = max(float((a - b).abs().max() / b.abs().max())
                                                     for a, b in ((grad_hidden, ref_hidden), (grad_weight, ref_weight)))
                rounds_ = paired_ratio(row["times_s"], times[(chunk, "autograd")])
                row.update(against_autograd=rounds_, against_autograd_text=interval_text(rounds_))
            rows.append(row)
        logits_mib = rows_n * vocab * 4 / MiB
        payload = self._payload("head_loss", rows, {"seq_len": seq_len, "batch": batch, "top_k": top_k,
                                                    "rounds": rounds, "vocab": vocab, "logits_tensor_mib": logits_mib})
        columns = [("chunk_tokens", "chunk (positions)", ""), ("gradient", "gradient", ""), ("ms", "ms (median)", ".0f"),
                   ("against_autograd_text", "time / autograd's, per round: median [interval] coverage", ""),
                   ("peak_added_mib", "peak added MiB", ".0f"),
                   ("max_gradient_difference", "largest gradient difference / autograd's largest", ".1e")]
        title = (f"KD loss over the head, forward and backward: batch {batch} x {seq_len} positions, vocabulary "
                 f"{vocab}, top-{top_k} (one float32 logits tensor = {logits_mib:.0f} MiB)")

        def draw(axes):
            names = [f"{r['gradient']}\nchunk {r['chunk_tokens']}" for r in rows]
            colors = ["tab:blue" if r["gradient"] == "closed_form" else "tab:gray" for r in rows]
            axes[0].bar(names, [r["ms"] for r in rows], color=colors)
            axes[0].set_ylabel("ms per forward and backward")
            axes[1].bar(names, [r["peak_added_mib"] for r in rows], color=colors)
            axes[1].set_ylabel("peak memory added (MiB)")
        return self._finish("head_loss", payload, markdown_table(rows, columns), title, draw)
