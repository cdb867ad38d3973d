"""The training benchmark: tokens per second and peak memory of one optimizer step of each stage
(alignment, KD with the teacher online, KD from a top-k cache, the Distil-xLSTM student's KD),
each under the memory plan the stages train with (``lean``: the loss over the vocabulary in
chunks, the hybrid op and the MLP's SiLU and product recomputed in the backward) and, side by side in the same run, without it
(``plain``: the whole logits at once, every intermediate kept), with the step's FLOP floor.

Every (stage, plan) row runs in a fresh spawned process that builds only that stage's module: a
process that had trained another stage before would reuse its freed pages without growing its
resident set, and would hold the benchmark's own loaded models, both of which would blur the
peak. One module per benchmark keeps ``experiments.bench`` an entry point.

``allocators`` runs the rows again under other memory allocators, preloaded into the row's process
(``LD_PRELOAD``): glibc keeps freed blocks in its heaps, so the resident peak of a step sits well
above its live tensors, and tcmalloc or jemalloc return more of them. Each row records whether the
library was actually mapped into its process.

``backends`` runs the rows again with the hybrid op on other backends (``compiled``: the chunkwise
form through ``torch.compile``, its graphs compiled during the untimed warm-up steps).

``rounds`` runs every row that many times, a stage's rows next to each other and in reverse order
every other round, and reads each comparison (lean against plain, an allocator or a backend against
the first, a row against the teacher's own step) round by round: the median of the rounds' ratios
with a distribution-free interval for it (``experiments.bench_report.paired_ratio``). Rows run in
processes of their own, one after another, so a comparison from one round carries whatever the
machine did between them; several rounds say how far that moves it.
"""

from __future__ import annotations

import gc
import itertools
import os
import statistics

import torch

from experiments.bench_base import BenchBase
from experiments.bench_report import against_first, against_teachers_own_step, lean_against_plain, markdown_table
from experiments.flops import training_step_flops
from experiments.measure import MiB, OUT_OF_MEMORY, PeakMemory, out_of_memory, timed
from kernels import BACKENDS
from models.head_loss import DEFAULT_CHUNK_TOKENS
from models.storage import write_json


TRAIN_STAGES = ("align", "kd", "kd_cached", "distil_xlstm_kd", "teacher_lm")
# The stages' settings of each plan (``lean`` is what they train with by default).
MEMORY_PLANS = {
    "lean": {"recompute_activations": True, "loss_chunk_tokens": DEFAULT_CHUNK_TOKENS},
    "plain": {"recompute_activations": False, "loss_chunk_tokens": None},
}


def _train_steps(module, batch: dict, steps: int, warmup: int, device: torch.device, rate_probe=None) -> dict:
    """Median time of ``steps`` optimizer steps (after ``warmup``) and the peak memory over them.

    ``rate_probe`` (a no-argument callable returning FLOP/s), when given, runs before the first
    timed step and after each one: the matrix-product rate the step's FLOP floor assumes, measured
    in this process around the steps it is compared with, so that this machine's drift (its rate
    moved from 121 to 194 GFLOP/s within one row's minutes) falls on both (``step_floor_ratios``).
    Its tensors are freed between probes and stay far below a step's peak."""
    from lightning_modules.base import adamw

    module.train()
    module.log = module.log_dict = lambda *args, **kwargs: None  # no Trainer here: nothing to log to
    optimizer = adamw(module.trainable_parameters(), lr=1e-6)  # as the stages build theirs

    def closure():
        loss = module.training_step(batch, 0)
        optimizer.zero_grad(set_to_none=True)  # where Lightning zeroes them: after the forward
        loss.backward()
        return loss

    def one_step():  # in Lightning's order, through the module's own optimizer_step hook
        module.optimizer_step(0, 0, optimizer, closure)

    for _ in range(warmup):
        one_step()
    rates, times = [], []
    with PeakMemory(device) as peak:
        for _ in range(steps):
            if rate_probe is not None:
                rates.append(rate_probe())
            times.append(timed(one_step, device)[1])
        if rate_probe is not None:
            rates.append(rate_probe())
    median = statistics.median(times)
    out = {"ms_per_step": 1e3 * median, "tokens_per_s": batch["input_ids"].numel() / median,
           "step_ms": [1e3 * t for t in times], "peak_bytes": peak.bytes, "peak_kind": peak.kind}
    if rates:
        out.update(matmul_gflop_per_s=statistics.median(rates) / 1e9, probe_gflop_per_s=[r / 1e9 for r in rates])
    return out


def step_floor_ratios(step_ms: list[float], probe_gflop_per_s: list[float], step_gflop: float) -> list[float]:
    """Each timed step's time over its FLOP floor at the rate probed around it (the mean of the probe
    before it and the one after it): ``len(probe_gflop_per_s) == len(step_ms) + 1``."""
    if len(probe_gflop_per_s) != len(step_ms) + 1:
        raise ValueError(f"{len(step_ms)} steps need {len(step_ms) + 1} rate probes around them; got "
                         f"{len(probe_gflop_per_s)}")
    return [ms / (1e3 * step_gflop / ((before + after) / 2))
            for ms, before, after in zip(step_ms, probe_gflop_per_s, probe_gflop_per_s[1:])]


class TeacherLanguageModelStep:
    """The teacher's own training step, every parameter, on its Hugging Face next-token loss (whole
    logits, every intermediate kept): not a stage of xdistill but the reference for the KD rows'
    ``ms / floor``, the ratio the transformer the student was converted from reaches on this machine
    with its own code. It offers what ``_train_steps`` calls on a stage's module."""

    def __init__(self, spec: dict):
        from models import load_teacher

        # loaded as the KD rows' modules load their teacher (the attention Hugging Face picks)
        self.teacher = load_teacher(spec["teacher"], getattr(torch, spec["dtype"]))
        self.teacher.requires_grad_(True)

    def train(self):
        self.teacher.train()

    def trainable_parameters(self):
        return [p for p in self.teacher.parameters() if p.requires_grad]

    def training_step(self, batch, batch_idx):
        return self.teacher(batch["input_ids"], labels=batch["labels"]).loss

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure):
        optimizer.step(closure=optimizer_closure)


def stage_module(spec: dict, stage: str, plan: str, ids: torch.Tensor):
    """The stage's Lightning module under ``plan`` and one batch for it (``teacher_lm``: the teacher's
    own step, whatever the plan)."""
    from lightning_modules import AlignmentModule, SparseKDModule
    from lightning_modules.losses import teacher_topk
    from models import HybridConfig

    if stage == "teacher_lm":
        module = TeacherLanguageModelStep(spec)
        module.teacher.to(spec["device"])
        return module, {"input_ids": ids, "labels": ids.clone()}

    common = dict(teacher=spec["teacher"], teacher_dtype=spec["dtype"], hybrid=HybridConfig.from_dict(spec["hybrid"]),
                  recompute_activations=MEMORY_PLANS[plan]["recompute_activations"])
    kd = dict(top_k=spec["top_k"], loss_chunk_tokens=MEMORY_PLANS[plan]["loss_chunk_tokens"], **common)
    if stage == "align":
        module = AlignmentModule(**common)
    elif stage == "distil_xlstm_kd":
        module = SparseKDModule(student_family="distil_xlstm", **kd)
    else:
        module = SparseKDModule(student_ckpt=spec["student"], **kd)
    module.configure_model()
    module.to(spec["device"])
    batch = {"input_ids": ids, "labels": ids.clone()}
    if stage == "kd_cached":
        with torch.no_grad():
            top_ids, top_logprobs = teacher_topk(module.teacher(ids).logits, spec["top_k"])
        batch.update(topk_ids=top_ids, topk_logprobs=top_logprobs)
        gc.collect()
    return module, batch


# allocator -> (the library preloaded for it, the Debian package that ships it); glibc: nothing preloaded
ALLOCATORS = {"glibc": (None, None), "tcmalloc": ("libtcmalloc_minimal.so.4", "libgoogle-perftools4"),
              "jemalloc": ("libjemalloc.so.2", "libjemalloc2"),
              "tcmalloc_no_release": ("libtcmalloc_minimal.so.4", "libgoogle-perftools4")}
# environment an allocator row runs with. tcmalloc hands freed memory back to the system a little at
# a time by default, and a step that frees and reallocates as much as the lean plan's then touches
# fresh pages again (about 490,000 page faults a KD step against 12,000 for the plain plan, which
# keeps its activations); a release rate of 0 keeps them in its heap, without raising the peak.
ALLOCATOR_ENVIRONMENT = {"tcmalloc_no_release": {"TCMALLOC_RELEASE_RATE": "0"}}


def allocator_library(name: str) -> str | None:
    """The path of the library ``LD_PRELOAD`` needs for allocator ``name`` (None for glibc); a missing
    one is refused naming the package that ships it."""
    import ctypes.util

    if name not in ALLOCATORS:
        raise ValueError(f"unknown allocator {name!r}; allowed values: {', '.join(ALLOCATORS)}")
    library, package = ALLOCATORS[name]
    if library is None:
        return None
    # found by the dynamic linker's cache, not loaded: jemalloc cannot be dlopen'ed into a running
    # process (static TLS), only preloaded into a new one
    if ctypes.util.find_library(library.removeprefix("lib").split(".so")[0]) != library:
        raise ValueError(f"allocator {name!r} needs {library}, which is not installed here (Debian/Ubuntu: apt "
                         f"install {package})")
    return library


def _mapped_libraries() -> str:
    try:
        with open("/proc/self/maps") as maps:
            return maps.read()
    except OSError:
        return ""


def train_row(spec: dict, stage: str, plan: str, allocator: str = "glibc") -> dict:
    """One (stage, plan) row: build, warm up, time, measure. Meant for a fresh process. The hybrid
    op's backend is ``spec["hybrid"]["backend"]``."""
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    gen = torch.Generator().manual_seed(spec["seed"])
    shape = (spec["batch"], spec["seq_len"])
    ids = torch.randint(min(100, spec["vocab"] // 2), spec["vocab"], shape, generator=gen).to(device)
    module, batch = stage_module(spec, stage, plan, ids)
    library = ALLOCATORS[allocator][0]
    row = {"stage": stage, "plan": plan, "allocator": allocator,
           "backend": None if stage == "teacher_lm" else spec["hybrid"]["backend"],  # no hybrid op in it
           "seq_len": spec["seq_len"], "batch": spec["batch"],
           "trainable_parameters": sum(p.numel() for p in module.trainable_parameters()),
           "allocator_loaded": library is None or library.split(".so")[0] in _mapped_libraries()}
    if allocator in ALLOCATOR_ENVIRONMENT:  # as this process received it
        row["allocator_environment"] = {name: os.environ.get(name) for name in ALLOCATOR_ENVIRONMENT[allocator]}
    shapes = spec.get("matmul_shapes")
    dtype = getattr(torch, spec["dtype"])
    probe = (lambda: matmul_rate(device, dtype, shapes, repeats=3)) if shapes else None
    try:
        row.update(_train_steps(module, batch, spec["steps"], spec["warmup"], device, probe))
    except OUT_OF_MEMORY as err:
        row["error"] = out_of_memory(err)
    # graphs torch.compile made in this process (the compiled op's, forward and backward count as
    # one each time a new shape is traced): proof that the ``compiled`` rows ran compiled
    row["compiled_graphs"] = int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    return row


def train_row_in_fresh_process(spec: dict, stage: str, plan: str, allocator: str = "glibc") -> dict:
    """``train_row`` in a new interpreter, with ``allocator`` preloaded into it."""
    import multiprocessing

    library = allocator_library(allocator)
    settings = dict(ALLOCATOR_ENVIRONMENT.get(allocator, {}))
    if library is not None:
        before = os.environ.get("LD_PRELOAD")
        settings["LD_PRELOAD"] = library if not before else f"{library}:{before}"
    saved = {name: os.environ.get(name) for name in settings}
    os.environ.update(settings)  # the spawned interpreter is started with this environment
    try:
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            row = pool.apply(train_row, (spec, stage, plan, allocator))
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    return row


def matmul_rate(device: torch.device, dtype: torch.dtype, shapes, repeats: int = 5) -> float:
    """The best FLOP/s this machine reaches on the step's matrix products (``shapes``: (m, k, n)):
    the rate the floor assumes for every FLOP of the step."""
    best = 0.0
    gen = torch.Generator().manual_seed(0)
    for m, k, n in shapes:
        a = torch.randn(m, k, generator=gen, dtype=torch.float32).to(device, dtype)
        b = torch.randn(k, n, generator=gen, dtype=torch.float32).to(device, dtype)
        a @ b
        seconds = min(timed(lambda: a @ b, device)[1] for _ in range(repeats))
        best = max(best, 2 * m * k * n / seconds)
    return best


def _train_figure(rows):
    """Bars per stage and plan: tokens/s and peak memory (a figure-drawing callback for ``figure``)."""
    measured = [r for r in rows if "tokens_per_s" in r]

    def draw(axes):
        several = any(r.get("round", 0) for r in measured)  # one bar per row: rounds get their own names
        names = [f"{r['stage']}\n{r['plan']}" + (f"\n{r['backend']}" if r.get("backend", "auto") not in ("auto", None) else "")
                 + (f"\nround {r['round']}" if several else "") for r in measured]
        for ax, key, label in zip(axes, ("tokens_per_s", "peak_mib"), ("tokens per second", "peak memory (MiB)")):
            ax.bar(names, [r[key] for r in measured], color=["tab:blue" if r["plan"] == "lean" else "tab:gray"
                                                             for r in measured])
            ax.set_ylabel(label)
            ax.tick_params(axis="x", labelrotation=20, labelsize=7)
    return draw


class TrainBenchmark(BenchBase):
    """``train``."""

    def train(self, seq_len: int = 256, batch: int = 4, steps: int = 3, warmup: int = 1, top_k: int = 64,
              stages: list[str] = ["align", "kd", "kd_cached", "distil_xlstm_kd", "teacher_lm"],
              plans: list[str] = ["lean", "plain"], allocators: list[str] = ["glibc"],
              backends: list[str] | None = None, rounds: int = 1) -> dict:
        """Tokens per second and peak memory of one optimizer step (forward, backward, AdamW) of each
        stage, under each memory plan, each row in a fresh process; the KD rows beside their FLOP
        floor (the step's FLOPs at this machine's best matrix-product rate, probed between the row's
        own steps).

        Stages: ``align`` (stage 1, new parameters, per-layer MSE against the frozen teacher),
        ``kd`` (stage 2/3: all parameters, the teacher's top-k computed online), ``kd_cached``
        (the same with the teacher's top-k read from a cache, so no teacher forward), and
        ``distil_xlstm_kd`` (the Distil-xLSTM student's KD step); ``teacher_lm``, not a stage but the
        reference for the KD rows' ``ms / floor``: the teacher's own step on its Hugging Face
        next-token loss, every parameter, one plain row per allocator whatever the plans. Plans: ``lean`` (the stages'
        default: KD loss over the vocabulary in chunks of 256 positions, the hybrid op and the
        gated MLP's SiLU and product recomputed in the backward) and ``plain`` (the whole logits, every intermediate kept).

        Args:
            seq_len: tokens per sequence.
            batch: sequences per step.
            steps: timed optimizer steps per row (the median is reported).
            warmup: untimed steps before them.
            top_k: teacher tokens kept per position.
            stages: which of the stages to measure.
            plans: which memory plans to measure (rows of one stage side by side).
            allocators: memory allocators each row runs under (``glibc``, ``tcmalloc``, ``jemalloc``,
                ``tcmalloc_no_release``: tcmalloc with ``TCMALLOC_RELEASE_RATE=0``; the others preloaded
                with ``LD_PRELOAD``), compared with the first one side by side.
            backends: the hybrid op's backends each row runs with (``kernels.BACKENDS``; None: the
                ``hybrid`` setting's own), compared with the first one side by side.
            rounds: times every row runs (each in a fresh process; a stage's rows in reverse order
                every other round); with more than one, each comparison is the median of its
                per-round ratios with an interval.
        """
        if not isinstance(rounds, int) or rounds < 1:
            raise ValueError(f"rounds={rounds} is invalid; allowed values: an integer >= 1")
        unknown = sorted(set(stages) - set(TRAIN_STAGES)) + sorted(set(plans) - set(MEMORY_PLANS))
        if unknown:
            raise ValueError(f"unknown stage(s) or plan(s) {', '.join(unknown)}; allowed values: stages "
                             f"{', '.join(TRAIN_STAGES)}; plans {', '.join(MEMORY_PLANS)}")
        for allocator in allocators:
            allocator_library(allocator)  # refused now, not after the first rows
        backends = list(backends or [self.hybrid.backend])
        unknown = [b for b in backends if b not in BACKENDS]
        if unknown:
            raise ValueError(f"unknown backend(s) {', '.join(unknown)}; allowed values: {', '.join(BACKENDS)}")
        teacher, student = self._loaded()
        config, hybrid = teacher.config, self._hybrid_config
        spec = {"teacher": self.teacher_name, "student": self.student_path, "hybrid": self.hybrid.to_dict(),
                "dtype": str(self.dtype).removeprefix("torch."), "device": str(self.device),
                "threads": self.settings["threads"], "seed": self.seed, "vocab": config.vocab_size,
                "seq_len": seq_len, "batch": batch, "steps": steps, "warmup": warmup, "top_k": top_k}
        tokens = batch * seq_len
        d, ff, V = config.hidden_size, config.intermediate_size, config.vocab_size
        shapes = [(tokens, d, ff), (min(tokens, 512), d, V)]
        spec["matmul_shapes"] = shapes  # each row probes the rate again between its own steps
        rate = matmul_rate(self.device, self.dtype, shapes)
        self._models = None  # the rows run in processes of their own: nothing of this one needs the models
        del teacher, student
        gc.collect()
        extra = {"steps": steps, "warmup": warmup, "top_k": top_k, "matmul_gflop_per_s": rate / 1e9}
        extra["rounds"] = rounds
        rows = []
        for round_, stage in itertools.product(range(rounds), stages):
            flops = training_step_flops(config, hybrid, stage, batch, seq_len) if hybrid is not None else None
            # the teacher's own step has neither memory plan nor op: one plain row per allocator
            axes = (["plain"], allocators, backends[:1]) if stage == "teacher_lm" else (plans, allocators, backends)
            combinations = list(itertools.product(*axes))
            for plan, allocator, backend in combinations[::-1] if round_ % 2 else combinations:
                row_spec = {**spec, "hybrid": {**spec["hybrid"], "backend": backend}}
                row = {"round": round_, **train_row_in_fresh_process(row_spec, stage, plan, allocator)}
                if "peak_bytes" in row:
                    row["peak_mib"] = row["peak_bytes"] / MiB
                if flops is not None and "ms_per_step" in row:
                    # each step against the floor at the rate probed around it (side by side);
                    # the run-start rate's floor beside it, as earlier runs reported
                    row.update(step_gflop=flops / 1e9, run_start_floor_ms=1e3 * flops / rate)
                    row["over_run_start_floor"] = row["ms_per_step"] / row["run_start_floor_ms"]
                    if "probe_gflop_per_s" in row:
                        row["floor_ms"] = flops / row["matmul_gflop_per_s"] / 1e6
                        row["step_floor_ratios"] = step_floor_ratios(row["step_ms"], row["probe_gflop_per_s"],
                                                                     flops / 1e9)
                        row["over_floor"] = statistics.median(row["step_floor_ratios"])
                rows.append(row)
                write_json(self.out_dir / "train.json", self._payload("train", rows, extra))
        side = lean_against_plain(rows)
        by_allocator = against_first(rows, "allocator", allocators)
        by_backend = against_first(rows, "backend", backends)
        by_teacher = against_teachers_own_step(rows)
        payload = self._payload("train", rows, {**extra, "lean_against_plain": side,
                                                "against_teachers_own_step": by_teacher,
                                                "against_first_allocator": by_allocator,
                                                "against_first_backend": by_backend})
        columns = [("round", "round", "d")] if rounds > 1 else []
        columns += [("stage", "stage", ""), ("plan", "plan", ""), ("allocator", "allocator", ""),
                   ("backend", "op backend", ""),
                   ("trainable_parameters", "trainable parameters", ",d"),
                   ("tokens_per_s", "tokens/s", ".0f"), ("ms_per_step", "ms/step", ".0f"),
                   ("peak_mib", "peak MiB", ".0f"), ("step_gflop", "step GFLOP", ".0f"),
                   ("matmul_gflop_per_s", "row GFLOP/s", ".1f"), ("floor_ms", "FLOP floor ms", ".0f"),
                   ("over_floor", "ms / floor", ".2f"), ("over_run_start_floor", "ms / run-start floor", ".2f")]
        side_columns = [("stage", "stage", ""), ("allocator", "allocator", ""), ("backend", "op backend", ""),
                        ("tokens_per_s_ratio", "lean / plain tokens/s", ".3f"),
                        ("peak_ratio", "lean / plain peak memory", ".3f")]
        if rounds > 1:
            side_columns.append(("tokens_per_s_ratio_text", "tokens/s per round: median [interval] coverage", ""))
        table = (markdown_table(rows, columns)
                 + "\n\nFLOP floor: the step's FLOPs at the rate this machine reaches on the step's matrix products "
                 "(the best of 3 tries of each shape), probed in the row's own process before the first timed step and "
                 "after each one; `row GFLOP/s` is the median probe and `FLOP floor ms` the floor at it; `ms / floor` is "
                 "the median over the timed steps of each step's time over its floor at the mean of the two probes "
                 "around it. `ms / run-start floor` uses the rate probed once at the start of the run instead "
                 f"({rate / 1e9:.1f} GFLOP/s), as runs before 2026-12-07 did.")
        if side:
            table += "\n\nEach stage's plans side by side (same run):\n\n" + markdown_table(side, side_columns)
        if by_allocator:
            table += (f"\n\nEach allocator against {allocators[0]} (same run, same stage and plan):\n\n"
                      + markdown_table(by_allocator, [("stage", "stage", ""), ("plan", "plan", ""),
                                                      ("allocator", "allocator", ""), ("backend", "op backend", ""),
                                                      ("tokens_per_s_ratio", f"tokens/s / {allocators[0]}", ".3f"),
                                                      ("peak_ratio", f"peak memory / {allocators[0]}", ".3f"),
                                                      *([("tokens_per_s_ratio_text", "per round", "")]
                                                        if rounds > 1 else [])]))
        if by_backend:
            table += (f"\n\nEach op backend against {backends[0]} (same run, same stage, plan and allocator):\n\n"
                      + markdown_table(by_backend, [("stage", "stage", ""), ("plan", "plan", ""),
                                                    ("allocator", "allocator", ""), ("backend", "op backend", ""),
                                                    ("tokens_per_s_ratio", f"tokens/s / {backends[0]}", ".3f"),
                                                    ("peak_ratio", f"peak memory / {backends[0]}", ".3f"),
                                                    ("over_floor_ratio", f"ms / floor / {backends[0]}'s", ".3f"),
                                                    *([("tokens_per_s_ratio_text", "tokens/s per round", "")]
                                                      if rounds > 1 else [])]))
        if by_teacher:
            table += ("\n\nEach row's `ms / floor` against the teacher's own training step's (same run, same allocator; "
                      "1.00: as close to its floor as the Hugging Face transformer it was converted from):\n\n"
                      + markdown_table(by_teacher, [("stage", "stage", ""), ("plan", "plan", ""),
                                                    ("allocator", "allocator", ""), ("backend", "op backend", ""),
                                                    ("over_floor", "ms / floor", ".2f"),
                                                    ("teacher_over_floor", "teacher's own ms / floor", ".2f"),
                                                    ("over_teacher_floor_ratio", "ratio", ".3f"),
                                                    *([("over_teacher_floor_ratio_text", "ratio per round", "")]
                                                      if rounds > 1 else [])]))
        title = (f"Training step per stage and memory plan: batch {batch} x {seq_len} tokens, {self.settings['dtype']}, "
                 f"top-{top_k}")
        return self._finish("train", payload, table, title, _train_figure(rows))
