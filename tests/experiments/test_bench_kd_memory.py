"""The KD loss's peak memory, measured in a fresh process: dense logits against the teacher's top-k."""

from pathlib import Path

import pytest

from experiments.bench_kd_memory import kd_loss_peak_in_fresh_process


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's resettable peak memory")
def test_dense_kd_loss_peak_holds_at_least_the_teacher_logits_and_more_than_top_k():
    batch, seq_len, vocab = 2, 128, 20000
    teacher_logits = batch * seq_len * vocab * 4  # allocated inside the measured block by the dense variant
    dense = kd_loss_peak_in_fresh_process("dense", batch, seq_len, vocab, 8)
    top_k = kd_loss_peak_in_fresh_process("topk", batch, seq_len, vocab, 8)
    assert dense >= teacher_logits
    assert top_k < dense
