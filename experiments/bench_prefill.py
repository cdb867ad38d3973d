"""The prefill benchmark: time to first token and prefill throughput, student against teacher,
with the FLOPs each side must compute (``experiments.flops``) and the rate it achieved.

One module per benchmark keeps ``experiments.bench`` an entry point; this one holds the prefill
cell (median of whole prompt forwards under a time budget, the two models taking turns) and the
table's summary rows.
"""

from __future__ import annotations

import gc
import statistics

import torch

from experiments.bench_base import BenchBase
from experiments.bench_report import interval_series, interval_text, markdown_table, mib, pair, ratio, round_ratio
from experiments.bench_runners import StudentRunner, TeacherRunner
from experiments.flops import prefill_flops
from experiments.measure import OUT_OF_MEMORY, MiB, PeakMemory, out_of_memory, timed
from models import HybridConfig


class PrefillBenchmark(BenchBase):
    """``prefill``."""

    @torch.no_grad()
    def _paired_prefill(self, runners, ids, repeats: int, max_seconds: float) -> dict[str, dict]:
        """Both models' prompt forwards (and first token), taking turns: each round runs each model
        once, who goes first alternating, until each has ``repeats`` or one has spent ``max_seconds``
        (at least one round). This machine drifts by 10-30 % within a run; a model's repeats run back
        to back would catch another drift than its rival's (1.03x and 1.44x at 256 tokens in two runs
        of the same commit), taking turns puts the same drift on both. Returns a row per model kind:
        median TTFT, tokens/s, repeats, every repeat's time (``times_s``, round by round, so that the
        summary can pair them), the highest peak of its forwards, or the error that stopped it."""
        cells = {runner.kind: {"times": [], "peak_bytes": 0, "peak_kind": None} for runner in runners}
        for round_ in range(repeats):
            live = [runner for runner in runners if "error" not in cells[runner.kind]]
            if not live or (round_ and max(sum(cells[r.kind]["times"]) for r in live) >= max_seconds):
                break
            for runner in live if round_ % 2 == 0 else live[::-1]:
                cell = cells[runner.kind]
                try:
                    with PeakMemory(self.device) as peak:
                        (logits, state), seconds = timed(lambda: runner.prefill(ids), self.device)
                        logits.argmax(-1)  # the first token
                        del logits, state
                except OUT_OF_MEMORY as err:
                    cell["error"] = out_of_memory(err)
                    continue
                cell["times"].append(seconds)
                cell["peak_bytes"], cell["peak_kind"] = max(cell["peak_bytes"], peak.bytes or 0), peak.kind
                gc.collect()
        rows = {}
        for kind, cell in cells.items():
            times = cell.pop("times")
            if times:  # every repeat, in round order: a model that stops drops out of the later rounds only
                median = statistics.median(times)
                cell.update(ttft_s=median, prefill_tokens_per_s=ids.numel() / median, repeats=len(times),
                            times_s=times)
            rows[kind] = cell
        return rows

    def prefill(self, repeats: int = 3, max_seconds: float = 60.0, warmup_tokens: int = 128) -> dict:
        """Time to first token (prompt forward plus the first greedy token) and prefill tokens/s.

        Args:
            repeats: prompt forwards per model and cell (the median is reported); the two models
                take turns, one forward each.
            max_seconds: stop a cell once one model has spent this long (at least one forward each).
            warmup_tokens: length of one untimed prompt per model and batch before the cells.
        """
        if repeats < 1:
            raise ValueError(f"repeats={repeats} must be >= 1")
        teacher, student = self._loaded()
        runners = [TeacherRunner(teacher), StudentRunner(student)]
        for batch in self.batch_sizes:
            warm = self._prompt(warmup_tokens, teacher.config.vocab_size).expand(batch, -1)
            self._paired_prefill(runners, warm, 1, 0.0)
        hybrid = self._hybrid_config  # None: a student the FLOPs model does not cover
        extra = {"repeats": repeats, "max_seconds": max_seconds, "skipped": self._skipped(), "paired": True}

        compiles = hybrid is not None and hybrid.backend == "compiled"

        def measure(runners, batch, prompt, ids):
            ids = ids.expand(batch, -1).contiguous()
            if compiles:  # the op compiles a graph for each new prompt shape: on an untimed forward
                self._paired_prefill([r for r in runners if r.kind == "student"], ids, 1, 0.0)
            cells = self._paired_prefill(runners, ids, repeats, max_seconds)
            for kind, row in cells.items():
                row["flops"] = None
                if kind == "teacher" or hybrid is not None:
                    row["flops"] = batch * prefill_flops(teacher.config, hybrid or self.hybrid, prompt)[f"{kind}_flops"]
                    if "ttft_s" in row:
                        row["achieved_gflops_per_s"] = row["flops"] / row["ttft_s"] / 1e9
            return cells

        rows = self._side_by_side("prefill", measure, extra)
        summary = prefill_summary(rows, teacher.config, hybrid)
        payload = self._payload("prefill", rows, {**extra, "summary": summary})
        columns = [("batch", "batch", "d"), ("prompt", "prompt", "d"), ("teacher_ttft_s", "teacher TTFT s", ".2f"),
                   ("student_ttft_s", "student TTFT s", ".2f"), ("ttft_ratio", "student / teacher", ".2f"),
                   ("paired_ratio_text", "student / teacher per round: median [interval] coverage", ""),
                   ("flops_ratio", "FLOPs student / teacher", ".2f"),
                   ("least_flops_ratio", "least FLOPs of any implementation / teacher's", ".3f"),
                   ("teacher_attention_share", "teacher attention share of FLOPs", ".2f"),
                   ("teacher_tokens_per_s", "teacher tok/s", ".0f"), ("student_tokens_per_s", "student tok/s", ".0f"),
                   ("teacher_peak_mib", "teacher peak MiB", ".0f"), ("student_peak_mib", "student peak MiB", ".0f")]
        panels = [("time to first token (s, median)", self._model_series(rows, "ttft_s"), True),
                  ("student / teacher time per round (median, interval)", interval_series(summary, "paired_ratio"),
                   False, 1.0),
                  ("peak process memory during prefill (MiB)",
                   self._model_series(rows, "peak_bytes", 1 / MiB,
                                      {"teacher": "teacher peak", "student": "student peak"}), True)]
        return self._finish("prefill", payload, markdown_table(summary, columns), self._title("Prefill"), panels)


def prefill_summary(rows: list[dict], config, hybrid: HybridConfig | None) -> list[dict]:
    """One line per (batch, prompt): both models' TTFT and throughput, the ratio of their medians and
    the median of their per-round ratios with its interval (``paired_ratio``: the figure a target is
    read from, since each round's pair shares the machine's drift), the FLOPs ratio and the least
    FLOPs any implementation of the layer computes against the teacher's (``hybrid`` None: a
    student the FLOPs model does not cover)."""
    out = []
    for batch, prompt in dict.fromkeys((r["batch"], r["prompt"]) for r in rows):
        teacher, student = pair(rows, batch, prompt)
        flops = prefill_flops(config, hybrid or HybridConfig(), prompt)
        rounds = round_ratio(student, teacher, "times_s")  # student / teacher, round by round
        out.append({
            "batch": batch, "prompt": prompt, "teacher_ttft_s": teacher.get("ttft_s"),
            "student_ttft_s": student.get("ttft_s"), "ttft_ratio": ratio(student.get("ttft_s"), teacher.get("ttft_s")),
            "paired_ratio": rounds, "paired_ratio_text": interval_text(rounds),
            "flops_ratio": flops["student_flops"] / flops["teacher_flops"] if hybrid is not None else None,
            "least_flops_ratio": flops["student_least_flops"] / flops["teacher_flops"] if hybrid is not None else None,
            "teacher_attention_share": flops["teacher_attention_flops"] / flops["teacher_flops"],
            "teacher_tokens_per_s": teacher.get("prefill_tokens_per_s"),
            "student_tokens_per_s": student.get("prefill_tokens_per_s"),
            "teacher_peak_mib": mib(teacher.get("peak_bytes")), "student_peak_mib": mib(student.get("peak_bytes")),
            "errors": [r["error"] for r in (teacher, student) if "error" in r] or None,
        })
    return out
