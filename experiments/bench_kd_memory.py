"""The KD-loss memory benchmark: the peak memory the distillation loss and its backward add when fed
the teacher's top-k ids and log-probabilities (as a cache delivers them) against dense logits.

One module per benchmark keeps ``experiments.bench`` an entry point. ``kd_loss_peak`` is what a
fresh interpreter runs (``kd_loss_peak_in_fresh_process`` starts it by importing this module), so
this module imports only what that measurement needs, not the other benchmarks.
"""

from __future__ import annotations

import platform

import torch

from experiments.bench_base import BenchBase
from experiments.bench_report import markdown_table
from experiments.measure import MiB, PeakMemory, peak_in_fresh_process, proc_status_bytes


def kd_loss_peak(variant: str, batch: int, seq_len: int, vocab: int, k: int) -> int:
    """Peak resident memory the KD loss and its backward add to what is resident before them
    (the student's logits and, for ``topk``, the teacher's ids and log-probs), in bytes. Run it in
    a fresh process: on Linux the high-water mark is reset first, elsewhere the lifetime peak is
    compared before and after."""
    import resource

    from lightning_modules.losses import dense_kd_loss, sparse_kd_loss, teacher_topk

    torch.manual_seed(0)
    student = torch.randn(batch, seq_len, vocab, requires_grad=True)
    if variant == "topk":  # what a cache delivers: ids and log-probs only
        ids, logprobs = teacher_topk(torch.randn(1, seq_len, vocab), k)
        ids, logprobs = ids.expand(batch, -1, -1).contiguous(), logprobs.expand(batch, -1, -1).contiguous()
    with PeakMemory(torch.device("cpu")) as peak:
        if peak.kind == "resident set high-water mark":
            before = proc_status_bytes("VmRSS")
        else:
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if platform.system() == "Darwin" else 1024)
        if variant == "topk":
            loss = sparse_kd_loss(student, ids, logprobs, 2.0)
        else:  # the teacher's logits are part of what the dense loss needs in memory
            loss = dense_kd_loss(student, torch.randn(batch, seq_len, vocab), 2.0)
        loss.backward()
    return peak.bytes - before


def kd_loss_peak_in_fresh_process(variant: str, batch: int, seq_len: int, vocab: int, k: int) -> int:
    """``kd_loss_peak`` in a new interpreter (``measure.peak_in_fresh_process``)."""
    return peak_in_fresh_process("experiments.bench_kd_memory", "kd_loss_peak", variant, batch, seq_len, vocab, k)


class KdMemoryBenchmark(BenchBase):
    """``kd_memory``."""

    def kd_memory(self, seq_len: int = 256, batch: int = 4, top_k: int = 64) -> dict:
        """Peak memory of the KD loss (forward and backward) fed the teacher's top-k ids and
        log-probabilities, as a cache delivers them, against dense teacher logits. Each variant
        runs in a fresh process and reports the peak resident memory the loss added.

        Args:
            seq_len: tokens per sequence.
            batch: sequences.
            top_k: teacher tokens kept per position.
        """
        teacher, _ = self._loaded()
        vocab = teacher.config.vocab_size
        rows = []
        for variant in ("topk", "dense"):
            added = kd_loss_peak_in_fresh_process(variant, batch, seq_len, vocab, top_k)
            rows.append({"teacher_input": f"top-{top_k} ids + log-probs" if variant == "topk" else "dense logits",
                         "variant": variant, "peak_added_bytes": added, "peak_added_mib": added / MiB})
        logits_mib = batch * seq_len * vocab * 4 / MiB
        payload = self._payload("kd_memory", rows, {"seq_len": seq_len, "batch": batch, "top_k": top_k,
                                                    "vocab": vocab, "logits_tensor_mib": logits_mib})
        columns = [("teacher_input", "teacher input", ""), ("peak_added_mib", "peak added MiB", ".0f")]
        title = (f"KD loss memory: batch {batch} x {seq_len} tokens, vocabulary {vocab} "
                 f"(one float32 logits tensor = {logits_mib:.0f} MiB)")

        def draw(axes):
            axes[0].bar([r["teacher_input"] for r in rows], [r["peak_added_mib"] for r in rows], color="tab:blue")
            axes[0].set_ylabel("peak memory added by the loss (MiB)")
            axes[1].axis("off")
        return self._finish("kd_memory", payload, markdown_table(rows, columns), title, draw)
