"""Training throughput of each stage, and peak memory of the KD loss with top-k vs dense logits.

    python -m experiments.measure_stages throughput --seq_len 256 --batch_size 4
    python -m experiments.measure_stages kd_memory --seq_len 256 --batch_size 4 --k 64

Quick measurements for the closing notes (the benchmark suite is a separate work item). All
variants of one table run in the same process (throughput) or in fresh processes one after the
other (memory, read from the peak resident set size), side by side.
"""

from __future__ import annotations

import resource
import statistics
import subprocess
import sys
import time

import torch
from jsonargparse import CLI

from lightning_modules import AlignmentModule, SparseKDModule


def _steps(module, batch, steps: int, warmup: int = 1) -> float:
    module.log = module.log_dict = lambda *a, **k: None  # no Trainer: nothing to log to
    opt = torch.optim.AdamW(module.trainable_parameters(), lr=1e-5)
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        loss = module.training_step(batch, i)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return batch["input_ids"].numel() / statistics.median(times)


def throughput(teacher: str = "smollm2-135m-instruct", seq_len: int = 256, batch_size: int = 4, steps: int = 3,
               k: int = 64, threads: int = 2) -> list[dict]:
    """Tokens per second of one optimizer step of each stage (median of ``steps`` after a warm-up)."""
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 40000, (batch_size, seq_len), generator=g)
    batch = {"input_ids": ids, "labels": ids.clone()}
    rows = []
    variants = [
        ("align (new params)", AlignmentModule(teacher=teacher), batch),
        ("kd online top-64 (all params)", SparseKDModule(teacher=teacher, top_k=k), batch),
        ("kd cached top-64 (all params)", SparseKDModule(teacher=teacher, top_k=k), None),
        ("expert (kd objective, all params)", None, batch),
    ]
    kd_module = None
    for name, module, b in variants:
        if module is None:  # the expert stage is the KD step on another domain's data
            module = kd_module
        module.configure_model()
        if b is None:
            from lightning_modules.losses import teacher_topk

            with torch.no_grad():
                top_ids, top_lp = teacher_topk(module.teacher(ids).logits, k)
            b = {**batch, "topk_ids": top_ids, "topk_logprobs": top_lp}
        if isinstance(module, SparseKDModule):
            kd_module = module
        rows.append({"stage": name, "tokens_per_s": _steps(module, b, steps)})
    print(f"seq_len {seq_len}, batch {batch_size}, threads {threads}, torch {torch.__version__}")
    print(f"{'stage':<36} {'tokens/s':>10}")
    for r in rows:
        print(f"{r['stage']:<36} {r['tokens_per_s']:>10.0f}")
    return rows


def _kd_loss_peak(variant: str, batch_size: int, seq_len: int, vocab: int, k: int) -> int:
    """Peak resident memory added by computing the KD loss and its backward, in bytes."""
    from lightning_modules.losses import dense_kd_loss, sparse_kd_loss, teacher_topk

    torch.manual_seed(0)
    student = torch.randn(batch_size, seq_len, vocab, requires_grad=True)
    if variant == "topk":  # what a cache delivers: ids and log-probs only
        ids, lp = teacher_topk(torch.randn(1, seq_len, vocab), k)
        ids, lp = ids.expand(batch_size, -1, -1).contiguous(), lp.expand(batch_size, -1, -1).contiguous()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if variant == "topk":
        loss = sparse_kd_loss(student, ids, lp, 2.0)
    else:
        teacher = torch.randn(batch_size, seq_len, vocab)
        loss = dense_kd_loss(student, teacher, 2.0)
    loss.backward()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024


def kd_memory(seq_len: int = 256, batch_size: int = 4, vocab: int = 49152, k: int = 64) -> dict:
    """Peak memory of the KD loss (forward + backward) with top-k vs dense teacher logits."""
    results = {}
    for variant in ("topk", "dense"):
        code = (f"from experiments.measure_stages import _kd_loss_peak; "
                f"print(_kd_loss_peak({variant!r}, {batch_size}, {seq_len}, {vocab}, {k}))")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        results[variant] = int(out.stdout.strip().splitlines()[-1])
    logits_mb = batch_size * seq_len * vocab * 4 / 2**20
    print(f"batch {batch_size} x {seq_len} tokens, vocabulary {vocab} (one float32 logits tensor = {logits_mb:.0f} MB)")
    print(f"{'teacher input':<28} {'peak MB':>9}")
    print(f"{f'top-{k} ids + log-probs':<28} {results['topk'] / 2**20:>9.0f}")
    print(f"{'dense logits':<28} {results['dense'] / 2**20:>9.0f}")
    return results


if __name__ == "__main__":
    CLI([throughput, kd_memory], as_positional=False)
