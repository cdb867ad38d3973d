"""Benchmarks: what a student costs against its teacher at inference and in training.

    python -m experiments.bench --config configs/bench/smollm2-cpu.yaml decode    # ms/token, state vs KV cache
    python -m experiments.bench --config configs/bench/smollm2-cpu.yaml prefill   # time to first token
    python -m experiments.bench --config configs/bench/smollm2-cpu.yaml train     # tokens/s, peak memory per stage
    python -m experiments.bench --config configs/bench/smollm2-cpu.yaml kernels   # the hybrid op's forms
    python -m experiments.bench --config configs/bench/smollm2-cpu.yaml kd_memory # top-k vs dense KD loss
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
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from jsonargparse import CLI
from torch import nn

from models import HybridConfig, HybridStudent, StudentLM, convert_to_hybrid, load_student, load_teacher, prefill
from models.adapters import project_qkv
from models.checkpoint import atomic_file_write
from models.config import PREVIOUS_LAYER

DTYPES = ("float32", "bfloat16", "float16")
MiB = 2**20


# ---- the machine and its clocks ---------------------------------------------------------------------

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_description(device: torch.device) -> dict:
    """What the numbers were measured on: CPU, threads, GPU, library versions, code version."""
    import transformers

    from experiments.sweep import provenance

    info = {"cpu": cpu_model(), "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "device": str(device), "torch": torch.__version__, "transformers": transformers.__version__,
            "platform": platform.platform(), **provenance()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_bytes=props.total_memory, cuda=torch.version.cuda)
    return info


def describe_machine(info: dict) -> str:
    gpu = f", GPU {info['gpu']} ({info['gpu_memory_bytes'] / 2**30:.0f} GiB)" if info.get("gpu") else ""
    return (f"{info['cpu']} ({info['logical_cpus']} logical CPUs, torch threads {info['torch_threads']}){gpu}; "
            f"torch {info['torch']}, transformers {info['transformers']}, triton {info['triton']}")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device):
    """(result, seconds) of one call, the device drained before and after."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - start


# What running out of memory raises: CUDA's own error, and the CPU allocator's RuntimeError
# ("DefaultCPUAllocator: can't allocate memory"); out_of_memory() tells the latter from other errors.
OUT_OF_MEMORY = (torch.OutOfMemoryError, RuntimeError)


def out_of_memory(err: BaseException) -> str:
    """The row's error text for an allocation failure; any other error is raised again."""
    text = str(err)
    if isinstance(err, torch.OutOfMemoryError) or "can't allocate memory" in text:
        return f"out of memory: {text.splitlines()[0][:200]}"
    raise err


_CLEAR_REFS = Path("/proc/self/clear_refs")


class PeakMemory:
    """Peak memory of the process while the block runs (``.bytes``; ``.kind`` says what was read).

    CUDA: the allocator's peak (``max_memory_allocated``). CPU on Linux: the resident-set high-water
    mark ``VmHWM``, reset to the current resident set on entry by writing 5 to ``clear_refs``; the
    peak therefore includes what was resident before (weights, caches) and any transient of the block.
    """

    def __init__(self, device: torch.device):
        self.device, self.bytes, self.kind = device, None, None

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.kind = "cuda max_memory_allocated"
        else:
            self.kind = ("resident set high-water mark" if _reset_vm_hwm()
                         else "process lifetime peak resident set")
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            self.bytes = _vm_hwm_bytes()
        return False


def _proc_status_bytes(field: str) -> int | None:
    """A memory field of /proc/self/status (``VmHWM``, ``VmRSS``) in bytes; None where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# Pages the resident set may shrink by between the reset and the read (allocator trimming).
_RESET_SLACK_BYTES = 8 * 2**20


def _reset_vm_hwm() -> bool:
    """Reset the resident-set high-water mark to the current resident set; True if it took effect.

    Some kernels and sandboxes (gVisor, seen on CI) accept the write to ``clear_refs`` and leave
    ``VmHWM`` where it was, so the reset is checked: right after it the mark must not stand above
    the resident set. Where it does, callers get the lifetime peak and must say so.
    """
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    peak, resident = _proc_status_bytes("VmHWM"), _proc_status_bytes("VmRSS")
    return peak is not None and resident is not None and peak <= resident + _RESET_SLACK_BYTES


def _vm_hwm_bytes() -> int:
    peak = _proc_status_bytes("VmHWM")
    if peak is not None:
        return peak
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if platform.system() == "Darwin" else peak * 1024  # macOS reports bytes, Linux KiB


def parameter_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


# ---- the teacher's and the student's decoding -----------------------------------------------------

def kv_cache_bytes(cache) -> int:
    """Bytes of a Hugging Face cache's keys and values (every layer)."""
    total = 0
    for layer in cache.layers:
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


def _teacher_forward(teacher, ids, cache=None):
    # transformers 5 names the cache argument ``cache`` (``past_key_values`` is deprecated)
    out = teacher(ids, cache=cache, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1], out.cache


class TeacherRunner:
    """Prefill and greedy steps of a Hugging Face teacher with its own (dynamic) KV cache."""

    kind = "teacher"

    def __init__(self, model):
        self.model = model

    def prefill(self, ids):
        return _teacher_forward(self.model, ids)

    def step(self, token, cache):
        logits, cache = _teacher_forward(self.model, token[:, None], cache)
        return logits, cache

    @staticmethod
    def repeat(cache, batch: int):
        cache.batch_repeat_interleave(batch)
        return cache

    @staticmethod
    def state_bytes(cache) -> int:
        return kv_cache_bytes(cache)


class StudentRunner:
    """Prefill (chunkwise form) and recurrent greedy steps of a student from its decode state."""

    kind = "student"

    def __init__(self, model: StudentLM):
        self.model = model

    def prefill(self, ids):
        return prefill(self.model, ids)

    def step(self, token, state):
        return self.model(token[:, None], decode_state=state).logits[:, -1], state

    @staticmethod
    def repeat(state, batch: int):
        return state.index_select(torch.zeros(batch, dtype=torch.long, device=state.positions.device))

    @staticmethod
    def state_bytes(state) -> int:
        return state.nbytes()


class _ProjectionsOnly(nn.Module):
    """A layer's q/k/v/o products and nothing else: the part of attention that teacher and student
    share, so that a student running these in place of its attention decodes at the shared floor."""

    def __init__(self, attention):
        super().__init__()
        self.inner = attention

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, decode_state=None, **kwargs):
        inner = self.inner
        q, _, _ = project_qkv(inner.adapter, inner, inner.shape, hidden_states)
        B, H, T, D = q.shape
        return inner.o_proj(q.transpose(1, 2).reshape(B, T, H * D)), None


@contextlib.contextmanager
def projections_only(student: HybridStudent):
    """Temporarily replace every attention module of ``student`` by its q/k/v/o products alone."""
    layers = student.lm.model.layers
    originals = [layer.self_attn for layer in layers]
    try:
        for layer in layers:
            layer.self_attn = _ProjectionsOnly(layer.self_attn)
        yield student
    finally:
        for layer, attention in zip(layers, originals):
            layer.self_attn = attention


# ---- tables, JSON, figures --------------------------------------------------------------------------

def _cell(value, fmt: str) -> str:
    if value is None:
        return "—"
    if isinstance(value, str):
        return value
    return format(value, fmt)


def markdown_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """columns: (key, header, format spec); missing values print as a dash."""
    lines = ["| " + " | ".join(header for _, header, _ in columns) + " |",
             "|" + "|".join("---:" if fmt else "---" for _, _, fmt in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(key), fmt) for key, _, fmt in columns) + " |")
    return "\n".join(lines)


def write_json(path: Path, payload: dict) -> None:
    atomic_file_write(path, lambda tmp: tmp.write_text(json.dumps(payload, indent=2) + "\n"))


def _figure(path: Path, title: str, panels):
    """panels: [(y label, [(label, xs, ys, style)], log-y)] against context length (log2 x), or a
    callable that draws two axes itself."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if callable(panels):  # a figure of its own kind (bars), two panels
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
        panels(list(axes))
        panels = []
    else:
        fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2))
        axes = [axes] if len(panels) == 1 else list(axes)
    for ax, (ylabel, series, log_y) in zip(axes, panels):
        for label, xs, ys, style in series:
            points = [(x, y) for x, y in zip(xs, ys) if y is not None]
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], style, label=label, markersize=4)
        ax.set_xscale("log", base=2)
        if log_y:
            ax.set_yscale("log")
        ax.set_xlabel("prompt length (tokens)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    atomic_file_write(path, lambda tmp: fig.savefig(tmp, dpi=110))
    plt.close(fig)


def _train_figure(rows):
    """Bars per stage: tokens/s and peak memory (a figure-drawing callback for ``_figure``)."""
    measured = [r for r in rows if "tokens_per_s" in r]

    def draw(axes):
        names = [r["stage"] for r in measured]
        for ax, key, label in zip(axes, ("tokens_per_s", "peak_mib"), ("tokens per second", "peak memory (MiB)")):
            ax.bar(names, [r[key] for r in measured], color="tab:blue")
            ax.set_ylabel(label)
            ax.tick_params(axis="x", labelrotation=20)
    return draw


def _series(rows, model, batch, key, scale=1.0):
    picked = sorted((r for r in rows if r["model"] == model and r["batch"] == batch), key=lambda r: r["prompt"])
    return [r["prompt"] for r in picked], [None if r.get(key) is None else r[key] * scale for r in picked]


# ---- FLOPs of a prefill ----------------------------------------------------------------------------

def prefill_flops(config, hybrid: HybridConfig, prompt: int) -> dict:
    """Multiply-add FLOPs (x2) of one prompt's forward, teacher vs hybrid student, and where they go.

    Shared: every linear layer over all tokens (q/k/v/o, MLP; the gates for the student) and the
    head for the last token only. Teacher attention: causal q.k and p.v, T(T+1)/2 pairs per head.
    Student, as the chunkwise form computes it: each chunk of L queries against its band of
    L + W - 1 keys plus the sinks (window branch), and the mLSTM's intra-chunk L x L products plus
    one state read and one state update per token (memory branch); the gates and, with
    ``feature_map: softmax``, one d x d product per query and key head and token.
    """
    d, L_layers = config.hidden_size, config.num_hidden_layers
    H = config.num_attention_heads
    Hkv = getattr(config, "num_key_value_heads", None) or H
    D = getattr(config, "head_dim", None) or d // H
    ff = config.intermediate_size
    per_token_linear = L_layers * (d * H * D * 2 + d * Hkv * D * 2 + 3 * d * ff)
    shared = 2 * prompt * per_token_linear + 2 * d * config.vocab_size
    teacher_attention = L_layers * H * 4 * D * prompt * (prompt + 1) / 2
    full = set(hybrid.full_attention_layers)
    hybrid_layers = L_layers - len([i for i in full if i < L_layers])
    chunk = min(hybrid.chunk_size, prompt)
    window_keys = min(prompt, chunk + hybrid.window - 1) + hybrid.sink_tokens
    student_window = 4 * H * D * prompt * window_keys if hybrid.mode != "mlstm" else 0
    student_memory = (4 * H * D * prompt * chunk + 4 * H * D * D * prompt) if hybrid.mode != "swa" else 0
    if hybrid.gate_input == "qkv":  # i, f from x; o from each head's [q; k; v]
        gates = 2 * prompt * d * 2 * H + (2 * prompt * H * 3 * D if hybrid.mode == "hybrid" else 0)
    else:
        gates = 2 * prompt * d * 3 * H
    feature_maps = 2 * prompt * (H + Hkv) * D * D if hybrid.feature_map == "softmax" and hybrid.mode != "swa" else 0
    student_attention = hybrid_layers * (student_window + student_memory + gates + feature_maps) \
        + (L_layers - hybrid_layers) * H * 4 * D * prompt * (prompt + 1) / 2
    return {"shared_flops": shared, "teacher_attention_flops": teacher_attention,
            "student_attention_flops": student_attention, "teacher_flops": shared + teacher_attention,
            "student_flops": shared + student_attention}


# ---- the command ----------------------------------------------------------------------------------

class Bench:
    """Student against teacher: decode, prefill, training steps and the hybrid op's kernels."""

    def __init__(self, teacher: str = "smollm2-135m-instruct", student: str | None = None,
                 hybrid: HybridConfig = HybridConfig(), dtype: str = "float32", device: str = "auto",
                 threads: int | None = None, prompt_lengths: list[int] = [256, 1024, 4096],
                 batch_sizes: list[int] = [1, 8], max_batch_tokens: int | None = None,
                 teacher_attention: str = "auto", seed: int = 0, out_dir: str = "runs/bench"):
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
            seed: seed of the random prompts.
            out_dir: folder for ``<what>.json``, ``<what>.md`` and ``<what>.png``.
        """
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r} is not supported; allowed values: {', '.join(DTYPES)}")
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
        self.out_dir = Path(out_dir)
        self.settings = {"teacher": teacher, "student": student, "hybrid": hybrid.to_dict(), "dtype": dtype,
                         "device": str(self.device), "threads": torch.get_num_threads(),
                         "prompt_lengths": self.prompt_lengths, "batch_sizes": self.batch_sizes,
                         "max_batch_tokens": max_batch_tokens, "seed": seed}
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
            self._models = (teacher.to(self.device).eval(), student.to(self.device).eval())
            self.settings["teacher_attention"] = teacher.config._attn_implementation
            self.settings["student_description"] = student.describe()
            # what was measured: a saved student's own configuration, not the conversion default
            self.settings["hybrid"] = student.family_config.to_dict() if isinstance(student, HybridStudent) else None
            self.settings["teacher_parameter_bytes"] = parameter_bytes(teacher)
            self.settings["student_parameter_bytes"] = parameter_bytes(student)
        return self._models

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
        """Rows of both models in every (batch, prompt) cell: ``measure(runner, batch, prompt, ids)``
        returns a row's numbers. Who goes first alternates, so a drifting machine does not favour
        one side; an allocation failure becomes the row's error; the JSON is rewritten after each
        cell, so an interrupted run keeps what it measured."""
        teacher, student = self._loaded()
        runners = [TeacherRunner(teacher), StudentRunner(student)]
        rows = []
        for n, (batch, prompt) in enumerate(self._cells()[0]):
            ids = self._prompt(prompt, teacher.config.vocab_size)
            for runner in runners if n % 2 == 0 else runners[::-1]:
                row = {"model": runner.kind, "batch": batch, "prompt": prompt}
                try:
                    row.update(measure(runner, batch, prompt, ids))
                except OUT_OF_MEMORY as err:
                    row["error"] = out_of_memory(err)
                rows.append(row)
                gc.collect()
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
            write_json(self.out_dir / f"{what}.json", self._payload(what, rows, extra))
        return rows

    def _model_series(self, rows, key: str, scale: float = 1.0, names: dict | None = None) -> list:
        """Plot series of teacher (dashed) and student (solid) per batch size, labelled by ``names``."""
        names = names or {"teacher": "teacher", "student": "student"}
        return [(f"{names[model]}, batch {batch}", *_series(rows, model, batch, key, scale), style)
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
        _figure(self.out_dir / f"{what}.png", f"{title}\n{describe_machine(self._machine_info)}", panels)
        print(header + table)
        print(f"\nwrote {self.out_dir / what}.json, .md, .png")
        return payload

    @functools.cached_property
    def _machine_info(self) -> dict:
        return machine_description(self.device)

    # -- decode ------------------------------------------------------------------------------------

    @torch.no_grad()
    def _decode_cell(self, runner, ids, batch: int, steps: int, warmup: int) -> dict:
        (logits, state), prefill_seconds = timed(lambda: runner.prefill(ids), self.device)
        if batch > 1:  # rows of one prefilled prompt: decoding costs the same whatever the rows hold
            state = runner.repeat(state, batch)
            logits = logits.expand(batch, -1)
        token = logits.argmax(-1)
        times = []
        with PeakMemory(self.device) as peak:
            for i in range(warmup + steps):
                (logits, state), seconds = timed(lambda: runner.step(token, state), self.device)
                token = logits.argmax(-1)
                if i >= warmup:
                    times.append(seconds)
        q1, median, q3 = statistics.quantiles(times, n=4) if len(times) > 1 else (times[0],) * 3
        return {"ms_per_step": 1e3 * median, "ms_p25": 1e3 * q1, "ms_p75": 1e3 * q3,
                "tokens_per_s": batch / median, "state_bytes": runner.state_bytes(state),
                "peak_bytes": peak.bytes, "peak_kind": peak.kind, "prefill_s": prefill_seconds}

    @torch.no_grad()
    def decode_layers(self, baseline: dict | None = None, steps: int = 32, warmup: int = 4) -> dict:
        """Decode step time of two hybrid layers side by side: the student (``hybrid`` or the saved
        folder) against a conversion of the teacher with the student's HybridConfig changed by
        ``baseline`` (None: the layer before feature maps, the memory norm and the qkv gate). Both prefill the same prompt, then their steps alternate token
        by token (who goes first alternating too), so both see the same machine state; the ratio of
        medians is the cost of the layer change, with quartiles.

        Args:
            baseline: HybridConfig fields of the other layer, over the student's own.
            steps: timed steps per model and cell.
            warmup: untimed steps first.
        """
        if steps < 2 or warmup < 0:
            raise ValueError(f"steps={steps} must be >= 2 and warmup={warmup} >= 0")
        teacher, student = self._loaded()
        if not isinstance(student, HybridStudent):
            raise ValueError("decode_layers compares hybrid layers; the student is a "
                             f"{student.family} student")
        fields = PREVIOUS_LAYER if baseline is None else baseline
        baseline = HybridConfig.from_dict({**student.family_config.to_dict(), **fields})
        other = convert_to_hybrid(teacher, baseline).to(device=self.device, dtype=self.dtype).eval()
        runners = {"student": StudentRunner(student), "baseline": StudentRunner(other)}
        rows = []
        for batch, prompt in self._cells()[0]:
            ids = self._prompt(prompt, teacher.config.vocab_size)
            tokens, states, times = {}, {}, {name: [] for name in runners}
            for name, runner in runners.items():
                logits, state = runner.prefill(ids)
                states[name] = runner.repeat(state, batch) if batch > 1 else state
                tokens[name] = logits.expand(batch, -1).argmax(-1)
            for i in range(warmup + steps):
                for name in (list(runners) if i % 2 == 0 else list(runners)[::-1]):
                    (logits, states[name]), seconds = timed(
                        lambda name=name: runners[name].step(tokens[name], states[name]), self.device)
                    tokens[name] = logits.argmax(-1)
                    if i >= warmup:
                        times[name].append(seconds)
            row = {"batch": batch, "prompt": prompt}
            for name, values in times.items():
                q1, median, q3 = statistics.quantiles(values, n=4)
                row.update({f"{name}_ms": 1e3 * median, f"{name}_ms_p25": 1e3 * q1, f"{name}_ms_p75": 1e3 * q3,
                            f"{name}_state_mib": _mib(runners[name].state_bytes(states[name]))})
            row["ratio"] = row["student_ms"] / row["baseline_ms"]
            rows.append(row)
            gc.collect()
        payload = self._payload("decode_layers", rows, {"steps": steps, "warmup": warmup,
                                                        "baseline": baseline.to_dict(),
                                                        "baseline_description": other.describe()})
        columns = [("batch", "batch", "d"), ("prompt", "prompt", "d"), ("baseline_ms", "baseline ms/step", ".2f"),
                   ("student_ms", "student ms/step", ".2f"), ("ratio", "student / baseline", ".3f"),
                   ("baseline_ms_p25", "baseline p25", ".2f"), ("baseline_ms_p75", "baseline p75", ".2f"),
                   ("student_ms_p25", "student p25", ".2f"), ("student_ms_p75", "student p75", ".2f"),
                   ("baseline_state_mib", "baseline state MiB", ".2f"), ("student_state_mib", "student state MiB", ".2f")]
        title = f"Decode step, two layers side by side: {self.settings['student_description']} vs {other.describe()}"
        time_series = [(f"{name}, batch {b}", self.prompt_lengths,
                        [next((r[f"{name}_ms"] for r in rows if r["prompt"] == p and r["batch"] == b), float("nan"))
                         for p in self.prompt_lengths], style)
                       for b in self.batch_sizes for name, style in (("baseline", "o--"), ("student", "s-"))]
        return self._finish("decode_layers", payload, markdown_table(rows, columns), title,
                            [("ms per decoding step (median)", time_series, True)])

    @torch.no_grad()
    def _floor_cell(self, student, batch: int, steps: int, warmup: int) -> dict | None:
        """The shared floor: the student with q/k/v/o products and no attention, one token at a time."""
        if not isinstance(student, HybridStudent):
            return None
        token = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
        times = []
        with projections_only(student):
            for i in range(warmup + steps):
                _, seconds = timed(lambda: student(token, logits_to_keep=1), self.device)
                if i >= warmup:
                    times.append(seconds)
        median = statistics.median(times)
        return {"model": "floor", "batch": batch, "ms_per_step": 1e3 * median, "tokens_per_s": batch / median}

    def decode(self, steps: int = 32, warmup: int = 4) -> dict:
        """Time per decoding step and decode memory, student vs teacher, at every prompt length.

        Each cell prefills one random prompt (timed once: ``prefill_s``; the ``prefill`` command
        takes medians), repeats its cache/state over the batch, runs
        ``warmup`` untimed greedy steps and reports the median (and quartiles) of ``steps`` timed
        ones. The floor row is the shared part alone (q/k/v/o, MLPs, norms, head): the student's
        and the teacher's distance from it is what their attention costs per token.

        Args:
            steps: timed decoding steps per cell.
            warmup: untimed steps before them.
        """
        if steps < 1 or warmup < 0:
            raise ValueError(f"steps={steps} must be >= 1 and warmup={warmup} >= 0")
        _, student = self._loaded()
        floors = [floor for batch in self.batch_sizes
                  if (floor := self._floor_cell(student, batch, steps, warmup)) is not None]
        extra = {"steps": steps, "warmup": warmup, "skipped": self._skipped(), "floor": floors}

        def measure(runner, batch, prompt, ids):
            return self._decode_cell(runner, ids, batch, steps, warmup)

        rows = self._side_by_side("decode", measure, extra)
        summary = decode_summary(rows, floors)
        payload = self._payload("decode", rows, {**extra, "summary": summary})
        columns = [("batch", "batch", "d"), ("prompt", "prompt", "d"), ("teacher_ms", "teacher ms/step", ".1f"),
                   ("student_ms", "student ms/step", ".1f"), ("floor_ms", "shared floor ms", ".1f"),
                   ("speedup", "student speed-up", ".2f"), ("student_over_floor_ms", "student − floor ms", ".1f"),
                   ("teacher_over_floor_ms", "teacher − floor ms", ".1f"),
                   ("teacher_kv_mib", "teacher KV cache MiB", ".1f"), ("student_state_mib", "student state MiB", ".2f"),
                   ("state_ratio", "state / KV", ".3f"), ("teacher_peak_mib", "teacher peak MiB", ".0f"),
                   ("student_peak_mib", "student peak MiB", ".0f")]
        flat = len(self.prompt_lengths)
        time_series = self._model_series(rows, "ms_per_step") + [
            (f"shared floor, batch {f['batch']}", self.prompt_lengths, [f["ms_per_step"]] * flat, ":") for f in floors]
        memory_series = self._model_series(rows, "state_bytes", 1 / MiB,
                                           {"teacher": "teacher KV cache", "student": "student state"})
        panels = [("ms per decoding step (median)", time_series, True),
                  ("decode state (MiB)", memory_series, True)]
        return self._finish("decode", payload, markdown_table(summary, columns), self._title("Decode"), panels)

    # -- prefill -----------------------------------------------------------------------------------

    @torch.no_grad()
    def _prefill_cell(self, runner, ids, repeats: int, max_seconds: float) -> dict:
        times, spent = [], 0.0
        with PeakMemory(self.device) as peak:
            while len(times) < repeats and (not times or spent < max_seconds):
                (logits, state), seconds = timed(lambda: runner.prefill(ids), self.device)
                logits.argmax(-1)  # the first token
                times.append(seconds)
                spent += seconds
                del logits, state
        median = statistics.median(times)
        return {"ttft_s": median, "prefill_tokens_per_s": ids.numel() / median, "repeats": len(times),
                "peak_bytes": peak.bytes, "peak_kind": peak.kind}

    def prefill(self, repeats: int = 3, max_seconds: float = 60.0, warmup_tokens: int = 128) -> dict:
        """Time to first token (prompt forward plus the first greedy token) and prefill tokens/s.

        Args:
            repeats: prompt forwards per cell (the median is reported).
            max_seconds: stop repeating a cell once it has spent this long (at least one run).
            warmup_tokens: length of one untimed prompt per model and batch before the cells.
        """
        if repeats < 1:
            raise ValueError(f"repeats={repeats} must be >= 1")
        teacher, student = self._loaded()
        for batch in self.batch_sizes:
            warm = self._prompt(warmup_tokens, teacher.config.vocab_size).expand(batch, -1)
            for runner in (TeacherRunner(teacher), StudentRunner(student)):
                self._prefill_cell(runner, warm, 1, 0.0)
        hybrid = self._hybrid_config  # None: a student the FLOPs model does not cover

        def measure(runner, batch, prompt, ids):
            row = self._prefill_cell(runner, ids.expand(batch, -1).contiguous(), repeats, max_seconds)
            row["flops"] = None
            if runner.kind == "teacher" or hybrid is not None:
                flops = prefill_flops(teacher.config, hybrid or self.hybrid, prompt)[f"{runner.kind}_flops"]
                row.update(flops=batch * flops, achieved_gflops_per_s=batch * flops / row["ttft_s"] / 1e9)
            return row

        extra = {"repeats": repeats, "max_seconds": max_seconds, "skipped": self._skipped()}
        rows = self._side_by_side("prefill", measure, extra)
        summary = prefill_summary(rows, teacher.config, hybrid)
        payload = self._payload("prefill", rows, {**extra, "summary": summary})
        columns = [("batch", "batch", "d"), ("prompt", "prompt", "d"), ("teacher_ttft_s", "teacher TTFT s", ".2f"),
                   ("student_ttft_s", "student TTFT s", ".2f"), ("ttft_ratio", "student / teacher", ".2f"),
                   ("flops_ratio", "FLOPs student / teacher", ".2f"),
                   ("teacher_attention_share", "teacher attention share of FLOPs", ".2f"),
                   ("teacher_tokens_per_s", "teacher tok/s", ".0f"), ("student_tokens_per_s", "student tok/s", ".0f"),
                   ("teacher_peak_mib", "teacher peak MiB", ".0f"), ("student_peak_mib", "student peak MiB", ".0f")]
        panels = [("time to first token (s, median)", self._model_series(rows, "ttft_s"), True),
                  ("peak process memory during prefill (MiB)",
                   self._model_series(rows, "peak_bytes", 1 / MiB,
                                      {"teacher": "teacher peak", "student": "student peak"}), True)]
        return self._finish("prefill", payload, markdown_table(summary, columns), self._title("Prefill"), panels)

    @property
    def _hybrid_config(self) -> HybridConfig | None:
        """The hybrid student's own configuration; None for another student family."""
        _, student = self._loaded()
        return student.family_config if isinstance(student, HybridStudent) else None

    # -- training ----------------------------------------------------------------------------------

    def train(self, seq_len: int = 256, batch: int = 4, steps: int = 3, warmup: int = 1, top_k: int = 64,
              stages: list[str] = ["align", "kd", "kd_cached", "distil_xlstm_kd"]) -> dict:
        """Tokens per second and peak memory of one optimizer step (forward, backward, AdamW) of each stage.

        Stages: ``align`` (stage 1, new parameters, per-layer MSE against the frozen teacher),
        ``kd`` (stage 2/3: all parameters, the teacher's top-k computed online), ``kd_cached``
        (the same with the teacher's top-k read from a cache, so no teacher forward), and
        ``distil_xlstm_kd`` (the Distil-xLSTM student's KD step).

        Args:
            seq_len: tokens per sequence.
            batch: sequences per step.
            steps: timed optimizer steps per stage (the median is reported).
            warmup: untimed steps before them.
            top_k: teacher tokens kept per position.
            stages: which of the stages to measure.
        """
        unknown = sorted(set(stages) - set(TRAIN_STAGES))
        if unknown:
            raise ValueError(f"unknown stage(s) {', '.join(unknown)}; allowed values: {', '.join(TRAIN_STAGES)}")
        teacher, _ = self._loaded()
        vocab = teacher.config.vocab_size
        gen = torch.Generator().manual_seed(self.seed)
        ids = torch.randint(min(100, vocab // 2), vocab, (batch, seq_len), generator=gen).to(self.device)
        rows = []
        for stage in stages:
            module, inputs = self._stage_module(stage, ids, top_k)
            row = {"stage": stage, "seq_len": seq_len, "batch": batch,
                   "trainable_parameters": sum(p.numel() for p in module.trainable_parameters())}
            try:
                row.update(_train_steps(module, inputs, steps, warmup, self.device))
            except OUT_OF_MEMORY as err:
                row["error"] = out_of_memory(err)
            rows.append(row)
            del module, inputs
            gc.collect()
            write_json(self.out_dir / "train.json", self._payload("train", rows, {"steps": steps, "warmup": warmup}))
        for row in rows:
            if "peak_bytes" in row:
                row["peak_mib"] = row["peak_bytes"] / MiB
        payload = self._payload("train", rows, {"steps": steps, "warmup": warmup})
        columns = [("stage", "stage", ""), ("trainable_parameters", "trainable parameters", ",d"),
                   ("tokens_per_s", "tokens/s", ".0f"), ("ms_per_step", "ms/step", ".0f"),
                   ("peak_mib", "peak MiB", ".0f")]
        title = (f"Training step per stage: batch {batch} x {seq_len} tokens, {self.settings['dtype']}, "
                 f"top-{top_k}")
        return self._finish("train", payload, markdown_table(rows, columns), title, _train_figure(rows))

    def _stage_module(self, stage: str, ids, top_k: int):
        from lightning_modules import AlignmentModule, SparseKDModule
        from lightning_modules.losses import teacher_topk

        dtype = str(self.dtype).removeprefix("torch.")
        common = dict(teacher=self.teacher_name, teacher_dtype=dtype, hybrid=self.hybrid)
        if stage == "align":
            module = AlignmentModule(**common)
        elif stage == "distil_xlstm_kd":
            module = SparseKDModule(top_k=top_k, student_family="distil_xlstm", **common)
        else:
            module = SparseKDModule(top_k=top_k, student_ckpt=self.student_path, **common)
        module.configure_model()
        module.to(self.device)
        batch = {"input_ids": ids, "labels": ids.clone()}
        if stage == "kd_cached":
            with torch.no_grad():
                top_ids, top_logprobs = teacher_topk(module.teacher(ids).logits, top_k)
            batch.update(topk_ids=top_ids, topk_logprobs=top_logprobs)
        return module, batch

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

    # -- kernels -----------------------------------------------------------------------------------

    def kernels(self, lengths: list[int] = [512, 1024, 2048, 4096, 8192, 16384], batch: int = 1, repeats: int = 5,
                reference_max_length: int = 2048) -> dict:
        """The hybrid op against the teacher's attention at the teacher's head shapes, one layer.

        Rows, forward and forward + backward each: the hybrid op's Triton kernels (CUDA only; the
        interpreter on a CPU is for tests, not timing), its chunkwise torch form, its quadratic
        reference (up to ``reference_max_length``), the mlstm_kernels chunkwise mLSTM alone (its
        native torch form; on CUDA also its Triton kernel), causal SDPA (the teacher's
        attention); and per-token decoding: the hybrid recurrent step against SDPA over a KV cache
        of the same length. Every row carries the FLOPs and bytes its op must at least compute
        and move (``op_floor``) and the rates achieved.

        Args:
            lengths: sequence lengths.
            batch: sequences.
            repeats: timed calls per cell (median reported), after one untimed call.
            reference_max_length: longest length for the quadratic reference.
        """
        import torch.nn.functional as F
        from mlstm_kernels.torch import get_mlstm_kernel

        from kernels import hybrid_attention, hybrid_attention_step, triton_unavailable_reason

        teacher, _ = self._loaded()
        config, hybrid = teacher.config, self._hybrid_config or self.hybrid
        H = config.num_attention_heads
        Hkv = getattr(config, "num_key_value_heads", None) or H
        D = getattr(config, "head_dim", None) or config.hidden_size // H
        opts = dict(window=hybrid.window, sink_tokens=hybrid.sink_tokens, mode=hybrid.mode, combine=hybrid.combine,
                    chunk_size=hybrid.chunk_size, norm_weight=torch.ones(H, D, device=self.device))
        mlstm_names = ["chunkwise--native_autograd"]
        if self.device.type == "cuda" and _power_of_two(D):
            mlstm_names.append("chunkwise--triton_limit_chunk")
        triton_reason = ("the timed Triton rows need CUDA" if self.device.type != "cuda" else
                         triton_unavailable_reason(self.device, self.dtype, D, D, hybrid.chunk_size))
        element = torch.tensor([], dtype=self.dtype).element_size()
        rows = []

        def measure(name, kind, length, fn, per_token=False):
            row = {"op": name, "pass": kind.split()[1], "length": length,
                   "batch": batch}
            floor = op_floor(kind, batch, H, Hkv, length, D, D, hybrid, element)
            row.update(gflop=floor["flops"] / 1e9, floor_mb=floor["bytes"] / 1e6)
            try:
                fn()  # warm-up (and Triton compilation)
                times = [timed(fn, self.device)[1] for _ in range(repeats)]
                median = statistics.median(times)
                row.update(ms=1e3 * median, tokens_per_s=(batch if per_token else batch * length) / median,
                           gflop_per_s=floor["flops"] / median / 1e9, gb_per_s=floor["bytes"] / median / 1e9)
            except OUT_OF_MEMORY as err:
                row["error"] = out_of_memory(err)
            rows.append(row)
            gc.collect()

        gen = torch.Generator().manual_seed(self.seed)
        for T in sorted(lengths):
            def rand(*shape, shift=0.0):
                return (torch.randn(*shape, generator=gen) + shift).to(self.device, self.dtype)

            q, k, v = rand(batch, H, T, D), rand(batch, Hkv, T, D), rand(batch, Hkv, T, D)
            i, f, g = (rand(batch, H, T).float(), rand(batch, H, T, shift=3.0).float(),
                       rand(batch, H, T, shift=-2.0).float())
            leaves = [x.detach().requires_grad_(True) for x in (q, k, v, i, f, g)]

            def forward_backward(op):
                def run():
                    for x in leaves:
                        x.grad = None
                    op(*leaves).float().square().sum().backward()
                return run

            qh, kh, vh = q, k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1)
            pad = (-T) % 64
            mlstm_inputs = [F.pad(x, (0, 0, 0, pad)).detach().requires_grad_(True) for x in (qh, kh, vh)] + [
                F.pad(i, (0, pad), value=-1e4).requires_grad_(True), F.pad(f, (0, pad), value=1e4).requires_grad_(True)]
            hybrid_backends = [("torch", "hybrid chunkwise torch")]
            if triton_reason is None:
                hybrid_backends.insert(0, ("triton", "hybrid Triton"))
            if T <= reference_max_length:
                hybrid_backends.append(("reference", "hybrid reference, quadratic"))
            for backend, label in hybrid_backends:
                def op(*x, backend=backend):
                    return hybrid_attention(*x, backend=backend, **opts)
                with torch.no_grad():
                    measure(f"{label} (forward)", "hybrid forward", T, lambda op=op: op(q, k, v, i, f, g))
                measure(f"{label} (forward + backward)", "hybrid backward", T, forward_backward(op))
            sdpa = lambda q_, k_, v_, *gates: F.scaled_dot_product_attention(  # noqa: E731
                q_, k_, v_, is_causal=True, enable_gqa=True)
            with torch.no_grad():
                measure("teacher causal SDPA (forward)", "sdpa forward", T, lambda: sdpa(q, k, v))
            measure("teacher causal SDPA (forward + backward)", "sdpa backward", T, forward_backward(sdpa))
            for name in mlstm_names:
                kernel = get_mlstm_kernel(name)

                def mlstm(kernel=kernel):
                    x = mlstm_inputs
                    return kernel(q=x[0], k=x[1], v=x[2], i=x[3], f=x[4], chunk_size=64)

                def mlstm_backward(mlstm=mlstm):
                    for x in mlstm_inputs:
                        x.grad = None
                    mlstm().float().square().sum().backward()

                with torch.no_grad():
                    measure(f"mlstm_kernels {name} (forward, memory branch only)", "mlstm forward", T, mlstm)
                measure(f"mlstm_kernels {name} (forward + backward)", "mlstm backward", T, mlstm_backward)
            with torch.no_grad():
                _, state = hybrid_attention(q, k, v, i, f, g, return_state=True, **opts)
                one = [x[:, :, -1:].contiguous() for x in (q, k, v, i, f, g)]
                step_opts = {key: opts[key] for key in ("norm_weight",)}
                measure("hybrid recurrent step (one token after T)", "hybrid step", T,
                        lambda: hybrid_attention_step(*one, state, **step_opts), per_token=True)
                measure("teacher SDPA step over a KV cache of T", "sdpa step", T, lambda: F.scaled_dot_product_attention(
                    one[0], k, v, enable_gqa=True), per_token=True)
        payload = self._payload("kernels", rows, {"heads": H, "kv_heads": Hkv, "head_dim": D, "repeats": repeats,
                                                  "triton": triton_reason or "timed"})
        ops = list(dict.fromkeys(r["op"] for r in rows))
        table_rows, floor_rows = [], []
        for op in ops:
            cells = {r["length"]: r for r in rows if r["op"] == op}
            table_rows.append({"op": op, **{f"T{T}": cells[T].get("ms", cells[T].get("error")) if T in cells else None
                                            for T in sorted(lengths)}})
            longest = cells[max(cells)]
            floor_rows.append({"op": op, "length": longest["length"], "gflop": longest["gflop"],
                               "floor_mb": longest["floor_mb"], "gflop_per_s": longest.get("gflop_per_s"),
                               "gb_per_s": longest.get("gb_per_s")})
        columns = [("op", "op (one layer)", "")] + [(f"T{T}", f"ms at T={T}", ".3f") for T in sorted(lengths)]
        floor_columns = [("op", "op (one layer)", ""), ("length", "T", "d"), ("gflop", "GFLOP floor", ".3f"),
                         ("floor_mb", "MB floor", ".1f"), ("gflop_per_s", "GFLOP/s achieved", ".1f"),
                         ("gb_per_s", "GB/s achieved", ".1f")]
        note = "" if triton_reason is None else f"\n\nTriton rows: not timed ({triton_reason}).\n"
        table = (markdown_table(table_rows, columns) + "\n\nWhat each op must at least compute and move, at the "
                 "longest length, and the rates achieved:\n\n" + markdown_table(floor_rows, floor_columns) + note)
        series = []
        for op in ops:
            picked = sorted((r for r in rows if r["op"] == op), key=lambda r: r["length"])
            series.append((op, [r["length"] for r in picked], [r.get("ms") for r in picked],
                           ("s-" if op.startswith("hybrid") else "o--")))
        title = (f"Hybrid op vs the teacher's attention, one layer: {H} heads ({Hkv} key/value), head dim {D}, "
                 f"batch {batch}, {self.settings['dtype']}, {hybrid.describe()}")
        return self._finish("kernels", payload, table, title, [("ms per call (median)", series, True)])


def op_floor(kind: str, B: int, H: int, Hkv: int, T: int, D: int, Dv: int, hybrid: HybridConfig,
             element_bytes: int) -> dict:
    """FLOPs (multiply-adds x 2) and bytes one layer's op must at least compute and move.

    kind: "<op> <pass>", op in hybrid | sdpa | mlstm, pass in forward | backward (forward + backward)
    | step (one token after T). Bytes: inputs read and outputs written once (q, k, v, gates in,
    the output out; the backward also reads the output gradient and writes every input's). FLOPs,
    per head and query: the hybrid op as its chunked form computes it, the window branch against
    min(T, window) + sinks keys and the memory branch a chunk of keys plus one state read and one
    state update; causal SDPA over (T + 1) / 2 keys on average; the mLSTM alone its memory branch.
    A backward costs about twice its forward (the recomputed forward plus two products per one).
    """
    op, phase = kind.split()
    L = hybrid.chunk_size
    qkv = (B * H * T * D + B * Hkv * T * (D + Dv)) * element_bytes
    gates = {"hybrid": 3, "mlstm": 2, "sdpa": 0}[op] * B * H * T * 4
    out = B * H * T * Dv * element_bytes
    if phase == "step":
        keys = {"hybrid": min(T, hybrid.window) + hybrid.sink_tokens, "sdpa": T}[op]
        state = (B * H * (D * Dv + D) * 4) if op == "hybrid" else 0
        flops = 2 * B * H * keys * (D + Dv) + (4 * B * H * D * Dv if op == "hybrid" else 0)
        cache = (B * Hkv * keys * (D + Dv) * element_bytes) + 2 * state
        return {"flops": flops, "bytes": cache + (B * H * D + B * Hkv * (D + Dv)) * element_bytes + B * H * Dv * 4}
    memory = 2 * B * H * T * (min(L, T) * (D + Dv) / 2 + 2 * D * Dv)
    window_keys = min(T, hybrid.window) + hybrid.sink_tokens
    if op == "sdpa":
        forward = 2 * B * H * (T * (T + 1) / 2) * (D + Dv)
    elif op == "mlstm":
        forward = memory
    else:
        forward = (memory if hybrid.mode != "swa" else 0) + (
            2 * B * H * T * window_keys * (D + Dv) if hybrid.mode != "mlstm" else 0)
    moved = qkv + gates + out
    if phase == "forward":
        return {"flops": forward, "bytes": moved}
    return {"flops": 3 * forward, "bytes": 2 * moved + out}


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
            before = _proc_status_bytes("VmRSS")
        else:
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if platform.system() == "Darwin" else 1024)
        if variant == "topk":
            loss = sparse_kd_loss(student, ids, logprobs, 2.0)
        else:  # the teacher's logits are part of what the dense loss needs in memory
            loss = dense_kd_loss(student, torch.randn(batch, seq_len, vocab), 2.0)
        loss.backward()
    return peak.bytes - before


def kd_loss_peak_in_fresh_process(variant: str, batch: int, seq_len: int, vocab: int, k: int) -> int:
    """``kd_loss_peak`` in a new interpreter: a long-lived process reuses freed pages without
    growing its resident set, which would hide what the loss allocates."""
    import subprocess
    import sys

    call = f"kd_loss_peak({variant!r}, {batch}, {seq_len}, {vocab}, {k})"
    code = f"from experiments.bench import kd_loss_peak; print({call})"
    # Every block of 64 KiB or more gets its own mapping, returned to the system when freed: the
    # resident set then follows the live tensors, instead of whichever freed pages glibc reuses.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    return int(done.stdout.strip().splitlines()[-1])


def _power_of_two(n: int) -> bool:
    return n >= 16 and n & (n - 1) == 0


TRAIN_STAGES = ("align", "kd", "kd_cached", "distil_xlstm_kd")


def _train_steps(module, batch: dict, steps: int, warmup: int, device: torch.device) -> dict:
    """Median time of ``steps`` optimizer steps (after ``warmup``) and the peak memory over them."""
    module.train()
    module.log = module.log_dict = lambda *args, **kwargs: None  # no Trainer here: nothing to log to
    optimizer = torch.optim.AdamW(module.trainable_parameters(), lr=1e-6)

    def one_step():
        loss = module.training_step(batch, 0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(warmup):
        one_step()
    with PeakMemory(device) as peak:
        times = [timed(one_step, device)[1] for _ in range(steps)]
    median = statistics.median(times)
    return {"ms_per_step": 1e3 * median, "tokens_per_s": batch["input_ids"].numel() / median,
            "peak_bytes": peak.bytes, "peak_kind": peak.kind}


def _pair(rows, batch, prompt):
    found = {r["model"]: r for r in rows if r["batch"] == batch and r["prompt"] == prompt}
    return found.get("teacher", {}), found.get("student", {})


def _ratio(a, b):
    return a / b if a is not None and b else None


def _mib(value):
    return None if value is None else value / MiB


def decode_summary(rows: list[dict], floors: list[dict]) -> list[dict]:
    """One line per (batch, prompt): both models' step times, the floor, speed-up, state sizes."""
    out = []
    for batch, prompt in dict.fromkeys((r["batch"], r["prompt"]) for r in rows):
        teacher, student = _pair(rows, batch, prompt)
        floor = next((f["ms_per_step"] for f in floors if f["batch"] == batch), None)
        t_ms, s_ms = teacher.get("ms_per_step"), student.get("ms_per_step")
        out.append({
            "batch": batch, "prompt": prompt, "teacher_ms": t_ms, "student_ms": s_ms, "floor_ms": floor,
            "speedup": _ratio(t_ms, s_ms),
            "student_over_floor_ms": None if s_ms is None or floor is None else s_ms - floor,
            "teacher_over_floor_ms": None if t_ms is None or floor is None else t_ms - floor,
            "teacher_kv_mib": _mib(teacher.get("state_bytes")), "student_state_mib": _mib(student.get("state_bytes")),
            "state_ratio": _ratio(student.get("state_bytes"), teacher.get("state_bytes")),
            "teacher_peak_mib": _mib(teacher.get("peak_bytes")), "student_peak_mib": _mib(student.get("peak_bytes")),
            "errors": [r["error"] for r in (teacher, student) if "error" in r] or None,
        })
    return out


def prefill_summary(rows: list[dict], config, hybrid: HybridConfig | None) -> list[dict]:
    """One line per (batch, prompt): both models' TTFT and throughput, and the FLOPs ratio
    (``hybrid`` None: a student the FLOPs model does not cover)."""
    out = []
    for batch, prompt in dict.fromkeys((r["batch"], r["prompt"]) for r in rows):
        teacher, student = _pair(rows, batch, prompt)
        flops = prefill_flops(config, hybrid or HybridConfig(), prompt)
        out.append({
            "batch": batch, "prompt": prompt, "teacher_ttft_s": teacher.get("ttft_s"),
            "student_ttft_s": student.get("ttft_s"), "ttft_ratio": _ratio(student.get("ttft_s"), teacher.get("ttft_s")),
            "flops_ratio": flops["student_flops"] / flops["teacher_flops"] if hybrid is not None else None,
            "teacher_attention_share": flops["teacher_attention_flops"] / flops["teacher_flops"],
            "teacher_tokens_per_s": teacher.get("prefill_tokens_per_s"),
            "student_tokens_per_s": student.get("prefill_tokens_per_s"),
            "teacher_peak_mib": _mib(teacher.get("peak_bytes")), "student_peak_mib": _mib(student.get("peak_bytes")),
            "errors": [r["error"] for r in (teacher, student) if "error" in r] or None,
        })
    return out


def main(args: list[str] | None = None):
    return CLI(Bench, args=args, as_positional=False, allow_abbrev=False)


if __name__ == "__main__":
    main()
