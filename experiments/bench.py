"""Benchmarks: what a student costs against its teacher at inference and in training.

    python -m experiments.bench --config configs/bench/smollm2-cpu.yaml decode    # ms/token, state vs KV cache
    python -m experiments.bench --config configs/bench/smollm2-cpu.yaml prefill   # time to first token
    python -m experiments.bench --config configs/bench/smollm2-cpu.yaml train     # tokens/s, peak memory per stage
    python -m experiments.bench --config configs/bench/smollm2-cpu.yaml kernels   # the hybrid op's forms
    python -m experiments.bench --config configs/bench/smollm2-cpu.yaml kd_memory # top-k vs dense KD loss
    python -m experiments.bench --config configs/bench/smollm2-cpu.yaml head_loss # its gradient: closed form vs autograd
    python -m experiments.bench --config configs/bench/smollm2-cpu.yaml integrity # what manifests cost
    python -m experiments.bench --config configs/bench/gpu.yaml decode            # on a GPU: bf16, to 64k

Every key can be overridden on the command line (``--prompt_lengths '[256, 1024]' decode --steps 8``).
Student and teacher are measured side by side in one process, each cell after warm-up, and every
time is a median of repeats (decode: of single steps; prefill: of whole prompts). Each command prints
a table and writes ``<what>.json`` (the machine, the settings and every row), ``<what>.md`` (the
table) and ``<what>.png`` (time and memory against context length) to ``out_dir``; the JSON is
rewritten after every cell, so an interrupted run keeps what it measured.

Memory is the state a model carries between decoding steps (the teacher's KV cache, the student's
constant-size state) and the peak of the process over the measured part: the CUDA allocator's peak
on a GPU, the resident-set high-water mark on a CPU (reset before each cell through
``/proc/self/clear_refs``; where that file is missing it is the process's lifetime peak, and the JSON
says so).

This module is the entry point: ``Bench`` joins the benchmarks, each in a module of its own
(``bench_decode``, ``bench_prefill``, ``bench_train``, ``bench_kd_memory``, ``bench_head_loss``,
``bench_kernels``, on the shared ``bench_base``); how they measure is in ``experiments.measure``, the
FLOP models in ``experiments.flops``, the tables and figures in ``experiments.bench_report``.
"""


from __future__ import annotations

from jsonargparse import CLI

from experiments.bench_decode import DecodeBenchmarks
from experiments.bench_head_loss import HeadLossBenchmark
from experiments.bench_integrity import IntegrityBenchmark
from experiments.bench_kd_memory import KdMemoryBenchmark, kd_loss_peak, kd_loss_peak_in_fresh_process
from experiments.bench_kernels import KernelsBenchmark
from experiments.bench_prefill import PrefillBenchmark
from experiments.bench_train import TRAIN_STAGES, TrainBenchmark

__all__ = ["Bench", "TRAIN_STAGES", "kd_loss_peak", "kd_loss_peak_in_fresh_process", "main"]


class Bench(DecodeBenchmarks, PrefillBenchmark, TrainBenchmark, KdMemoryBenchmark, HeadLossBenchmark,
            KernelsBenchmark, IntegrityBenchmark):
    """Student against teacher: decode, prefill, training steps and the hybrid op's kernels; what the
    artifacts' manifests cost."""


def main(args: list[str] | None = None):
    return CLI(Bench, args=args, as_positional=False, allow_abbrev=False)


if __name__ == "__main__":
    main()
