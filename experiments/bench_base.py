"""What every benchmark of ``experiments.bench`` shares: the settings, the models, the cells, the output.

``BenchBase`` takes the command line's global settings (teacher, student, dtype, device, prompt
lengths, batch sizes, ...; its ``__init__`` is what ``python -m experiments.bench`` parses before
the command), loads teacher and student once, lays out the (batch, prompt) cells, measures both
models side by side in each, and writes ``<what>.json``, ``.md`` and ``.png``. Each benchmark is a
subclass in a module of its own (``bench_decode``, ``bench_prefill``, ``bench_train``,
``bench_kd_memory``, ``bench_kernels``) and ``experiments.bench.Bench`` joins them into the command.

The shared plumbing keeps its leading underscores on purpose: the command line turns every public
method and property of ``Bench`` into a command, so only the benchmarks themselves are public.
"""

from __future__ import annotations

import functools
import gc
from pathlib import Path

import torch

from experiments.bench_report import figure, series_of
from experiments.bench_runners import StudentRunner, TeacherRunner
from experiments.measure import describe_machine, machine_description, parameter_bytes
from models import HybridConfig, HybridStudent, convert_to_hybrid, load_student, load_teacher
from models.storage import atomic_file_write, write_json

DTYPES = ("float32", "bfloat16", "float16")
DECODE_STEPS = ("compiled", "eager")


class BenchBase:
    """The global settings, the loaded models and the plumbing every benchmark uses."""

    def __init__(self, teacher: str = "smollm2-135m-instruct", student: str | None = None,
                 hybrid: HybridConfig = HybridConfig(), dtype: str = "float32", device: str = "auto",
                 threads: int | None = None, prompt_lengths: list[int] = [256, 1024, 4096],
                 batch_sizes: list[int] = [1, 8], max_batch_tokens: int | None = None,
                 teacher_attention: str = "auto", student_decode_step: str = "compiled", seed: int = 0,
                 out_dir: str = "runs/bench"):
        """
        Args:
            teacher: the teacher (hub id, folder, or the embedded default).
            student: a saved student folder (hybrid or Distil-xLSTM); None converts the teacher with
                ``hybrid`` (an untrained student costs what a trained one does).
            hybrid: the conversion settings when no student folder is given.
            dtype: weights and activations: float32, bfloat16 or float16.
            device: ``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N``.
            threads: torch CPU threads (None: torch's default).
            prompt_lengths: context lengths in tokens (decode and prefill).
            batch_sizes: sequences per step (decode and prefill).
            max_batch_tokens: skip (and list as skipped) cells with batch x prompt above this.
            teacher_attention: the teacher's attention implementation; ``auto`` picks
                ``flash_attention_2`` on CUDA when flash-attn is installed, else ``sdpa``.
            student_decode_step: ``compiled`` (a hybrid student decodes through its compiled layer
                step, ``HybridStudent.compile_decode_step``; compiled during the untimed warm-up steps)
                or ``eager``.
            seed: seed of the random prompts.
            out_dir: folder for ``<what>.json``, ``<what>.md`` and ``<what>.png``.
        """
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r} is not supported; allowed values: {', '.join(DTYPES)}")
        if student_decode_step not in DECODE_STEPS:
            raise ValueError(f"student_decode_step={student_decode_step!r} is not supported; allowed values: "
                             f"{', '.join(DECODE_STEPS)}")
        bad = [n for n in list(prompt_lengths) + list(batch_sizes) if not isinstance(n, int) or n < 1]
        if bad or not prompt_lengths or not batch_sizes:
            raise ValueError(f"prompt_lengths={prompt_lengths} and batch_sizes={batch_sizes} must be non-empty lists "
                             "of integers >= 1")
        self.device = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else
                                   "cpu" if device == "auto" else device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device={device!r} but CUDA is not available here; use device=cpu or auto")
        if threads is not None:
            torch.set_num_threads(threads)
        self.teacher_name, self.student_path, self.hybrid = teacher, student, hybrid
        self.dtype = getattr(torch, dtype)
        self.prompt_lengths, self.batch_sizes = sorted(prompt_lengths), sorted(batch_sizes)
        self.max_batch_tokens, self.seed = max_batch_tokens, seed
        self.teacher_attention = teacher_attention
        self.student_decode_step = student_decode_step
        self.out_dir = Path(out_dir)
        self.settings = {"teacher": teacher, "student": student, "hybrid": hybrid.to_dict(), "dtype": dtype,
                         "device": str(self.device), "threads": torch.get_num_threads(),
                         "prompt_lengths": self.prompt_lengths, "batch_sizes": self.batch_sizes,
                         "max_batch_tokens": max_batch_tokens, "student_decode_step": student_decode_step,
                         "seed": seed}
        self._models = None

    # -- shared plumbing ---------------------------------------------------------------------------

    def _attention_implementation(self) -> str:
        if self.teacher_attention != "auto":
            return self.teacher_attention
        if self.device.type == "cuda" and self.dtype != torch.float32:
            import importlib.util

            if importlib.util.find_spec("flash_attn") is not None:
                return "flash_attention_2"
        return "sdpa"

    def _loaded(self):
        """(teacher, student), loaded once, in eval mode on the device."""
        if self._models is None:
            teacher = load_teacher(self.teacher_name, self.dtype, attn_implementation=self._attention_implementation())
            if self.student_path:
                student = load_student(self.student_path, dtype=self.dtype)
            else:
                student = convert_to_hybrid(teacher, self.hybrid)
            self._decode_step_of(student)
            self._models = (teacher.to(self.device).eval(), student.to(self.device).eval())
            self.settings["teacher_attention"] = teacher.config._attn_implementation
            self.settings["student_description"] = student.describe()
            # what was measured: a saved student's own configuration, not the conversion default
            self.settings["hybrid"] = student.family_config.to_dict() if isinstance(student, HybridStudent) else None
            self.settings["teacher_parameter_bytes"] = parameter_bytes(teacher)
            self.settings["student_parameter_bytes"] = parameter_bytes(student)
        return self._models

    def _decode_step_of(self, student):
        """Set a hybrid student's decoding step to the ``student_decode_step`` setting."""
        if isinstance(student, HybridStudent):
            student.compile_decode_step(self.student_decode_step == "compiled")
        return student

    def _prompt(self, length: int, vocab: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed + length)
        low = min(100, vocab // 2)  # past the special tokens of real vocabularies
        return torch.randint(low, vocab, (1, length), generator=gen).to(self.device)

    def _cells(self):
        """(batch, prompt) pairs to measure, and those skipped by ``max_batch_tokens``."""
        cells, skipped = [], []
        for batch in self.batch_sizes:
            for prompt in self.prompt_lengths:
                too_big = self.max_batch_tokens is not None and batch * prompt > self.max_batch_tokens
                (skipped if too_big else cells).append((batch, prompt))
        return cells, skipped

    def _side_by_side(self, what: str, measure, extra: dict) -> list[dict]:
        """Rows of both models in every (batch, prompt) cell: ``measure(runners, batch, prompt, ids)``
        measures both models together (taking turns, in the order given, which alternates from cell
        to cell so that a drifting machine does not favour one side) and returns a row per model
        kind, with an ``error`` where one ran out of memory; the JSON is rewritten after each cell,
        so an interrupted run keeps what it measured."""
        teacher, student = self._loaded()
        runners = [TeacherRunner(teacher), StudentRunner(student)]
        rows = []
        for n, (batch, prompt) in enumerate(self._cells()[0]):
            ids = self._prompt(prompt, teacher.config.vocab_size)
            cells = measure(runners if n % 2 == 0 else runners[::-1], batch, prompt, ids)
            rows += [{"model": runner.kind, "batch": batch, "prompt": prompt, **cells[runner.kind]}
                     for runner in runners]
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            write_json(self.out_dir / f"{what}.json", self._payload(what, rows, extra))
        return rows

    def _model_series(self, rows, key: str, scale: float = 1.0, names: dict | None = None) -> list:
        """Plot series of teacher (dashed) and student (solid) per batch size, labelled by ``names``."""
        names = names or {"teacher": "teacher", "student": "student"}
        return [(f"{names[model]}, batch {batch}", *series_of(rows, model, batch, key, scale), style)
                for batch in self.batch_sizes for model, style in (("teacher", "o--"), ("student", "s-"))]

    def _title(self, what: str) -> str:
        return (f"{what}: {self.settings['student_description']} vs teacher {self.teacher_name} "
                f"({self.settings['dtype']}, teacher attention {self.settings['teacher_attention']})")

    def _skipped(self) -> list[dict]:
        return [{"batch": b, "prompt": p} for b, p in self._cells()[1]]

    def _payload(self, what: str, rows: list[dict], extra: dict) -> dict:
        return {"benchmark": what, "machine": self._machine_info, "settings": self.settings, "rows": rows, **extra}

    def _finish(self, what: str, payload: dict, table: str, title: str, panels) -> dict:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        write_json(self.out_dir / f"{what}.json", payload)
        header = f"{title}\n\nMachine: {describe_machine(self._machine_info)}\n\n"
        atomic_file_write(self.out_dir / f"{what}.md", lambda tmp: tmp.write_text(header + table + "\n"))
        figure(self.out_dir / f"{what}.png", f"{title}\n{describe_machine(self._machine_info)}", panels)
        print(header + table)
        print(f"\nwrote {self.out_dir / what}.json, .md, .png")
        return payload

    @functools.cached_property
    def _machine_info(self) -> dict:
        return machine_description(self.device)

    @property
    def _hybrid_config(self) -> HybridConfig | None:
        """The hybrid student's own configuration; None for another student family."""
        _, student = self._loaded()
        return student.family_config if isinstance(student, HybridStudent) else None
