"""Decode time per token and decode memory of a converted student against its teacher.

    python -m experiments.measure_decode --prompt_lengths '[256, 4096]'

Student and teacher run side by side in one process, after warm-up, on the same random prompt;
each number is the median over ``new_tokens`` decoding steps. The teacher uses its own KV cache
and SDPA attention; the student decodes recurrently from a constant-size state. This is a quick
check, not the benchmark suite.
"""

from __future__ import annotations

import json
import platform
import statistics
import time

import torch
from jsonargparse import CLI

from models import HybridConfig, convert_to_hybrid, load_student, load_teacher, prefill
from models.checkpoint import atomic_file_write


def _kv_cache_bytes(cache) -> int:
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in cache.layers)


@torch.no_grad()
def _time_teacher(teacher, ids, new_tokens, warmup):
    t0 = time.perf_counter()
    out = teacher(ids, use_cache=True)
    ttft = time.perf_counter() - t0
    cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
    times = []
    for step in range(warmup + new_tokens):
        t0 = time.perf_counter()
        out = teacher(token, past_key_values=cache, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        if step >= warmup:
            times.append(time.perf_counter() - t0)
    return ttft, statistics.median(times), _kv_cache_bytes(cache)


@torch.no_grad()
def _time_student(student, ids, new_tokens, warmup):
    t0 = time.perf_counter()
    logits, state = prefill(student, ids)
    ttft = time.perf_counter() - t0
    token = logits.argmax(-1, keepdim=True)
    times = []
    for step in range(warmup + new_tokens):
        t0 = time.perf_counter()
        logits = student(token, decode_state=state).logits
        token = logits[:, -1:].argmax(-1)
        if step >= warmup:
            times.append(time.perf_counter() - t0)
    return ttft, statistics.median(times), state.nbytes()


def measure(
    teacher: str = "smollm2-135m-instruct",
    student: str | None = None,
    hybrid: HybridConfig = HybridConfig(),
    prompt_lengths: list[int] = [256, 4096],
    batch_size: int = 1,
    new_tokens: int = 32,
    warmup: int = 4,
    threads: int = 2,
    out: str | None = None,
) -> list[dict]:
    """Print a table of decode ms/token and decode state bytes, student vs teacher.

    Args:
        teacher: the teacher (hub id, folder, or the embedded default).
        student: a saved student folder; None converts the teacher with ``hybrid``.
        hybrid: student configuration when no student is given.
        prompt_lengths: prompt lengths in tokens.
        batch_size: sequences decoded together.
        new_tokens: timed decoding steps per measurement (the median is reported).
        warmup: untimed steps before timing.
        threads: torch CPU threads.
        out: optional JSON file for the results.
    """
    torch.set_num_threads(threads)
    model = load_teacher(teacher, attn_implementation="sdpa")
    student = load_student(student).eval() if student else convert_to_hybrid(model, hybrid).eval()
    gen = torch.Generator().manual_seed(0)
    rows = []
    for T in prompt_lengths:
        ids = torch.randint(min(100, model.config.vocab_size // 2), model.config.vocab_size, (batch_size, T), generator=gen)
        t_ttft, t_tok, t_bytes = _time_teacher(model, ids, new_tokens, warmup)
        s_ttft, s_tok, s_bytes = _time_student(student, ids, new_tokens, warmup)
        rows.append(dict(prompt=T, batch=batch_size, teacher_ms_per_token=1e3 * t_tok, student_ms_per_token=1e3 * s_tok,
                         decode_speedup=t_tok / s_tok, teacher_kv_cache_bytes=t_bytes, student_state_bytes=s_bytes,
                         teacher_prefill_s=t_ttft, student_prefill_s=s_ttft))
    header = (f"{'prompt':>7} {'teacher ms/tok':>15} {'student ms/tok':>15} {'speedup':>8} "
              f"{'teacher KV MB':>14} {'student state MB':>17} {'teacher prefill s':>18} {'student prefill s':>18}")
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, threads {threads}, "
          f"batch {batch_size}, student {student.describe()}")
    print(header)
    for r in rows:
        print(f"{r['prompt']:>7} {r['teacher_ms_per_token']:>15.1f} {r['student_ms_per_token']:>15.1f} "
              f"{r['decode_speedup']:>7.2f}x {r['teacher_kv_cache_bytes'] / 2**20:>14.1f} "
              f"{r['student_state_bytes'] / 2**20:>17.2f} {r['teacher_prefill_s']:>18.2f} {r['student_prefill_s']:>18.2f}")
    if out:
        atomic_file_write(out, lambda tmp: tmp.write_text(json.dumps(rows, indent=2)))
    return rows


if __name__ == "__main__":
    CLI(measure, as_positional=False)
