"""The prefill benchmark: time to first token and prefill throughput, student against teacher,
with the FLOPs each side must compute (``experiments.flops``) and the rate it achieved.

One module per benchmark keeps ``experiments.bench`` an entry point; this one holds the prefill
cell (median of whole prompt forwards under a time budget) and the table's summary rows.
"""

from __future__ import annotations

import statistics

import torch

from experiments.bench_base import BenchBase
from experiments.bench_report import markdown_table, mib, pair, ratio
from experiments.bench_runners import StudentRunner, TeacherRunner
from experiments.flops import prefill_flops
from experiments.measure import MiB, PeakMemory, timed
from models import HybridConfig


class PrefillBenchmark(BenchBase):
    """``prefill``."""

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


def prefill_summary(rows: list[dict], config, hybrid: HybridConfig | None) -> list[dict]:
    """One line per (batch, prompt): both models' TTFT and throughput, and the FLOPs ratio
    (``hybrid`` None: a student the FLOPs model does not cover)."""
    out = []
    for batch, prompt in dict.fromkeys((r["batch"], r["prompt"]) for r in rows):
        teacher, student = pair(rows, batch, prompt)
        flops = prefill_flops(config, hybrid or HybridConfig(), prompt)
        out.append({
            "batch": batch, "prompt": prompt, "teacher_ttft_s": teacher.get("ttft_s"),
            "student_ttft_s": student.get("ttft_s"), "ttft_ratio": ratio(student.get("ttft_s"), teacher.get("ttft_s")),
            "flops_ratio": flops["student_flops"] / flops["teacher_flops"] if hybrid is not None else None,
            "teacher_attention_share": flops["teacher_attention_flops"] / flops["teacher_flops"],
            "teacher_tokens_per_s": teacher.get("prefill_tokens_per_s"),
            "student_tokens_per_s": student.get("prefill_tokens_per_s"),
            "teacher_peak_mib": mib(teacher.get("peak_bytes")), "student_peak_mib": mib(student.get("peak_bytes")),
            "errors": [r["error"] for r in (teacher, student) if "error" in r] or None,
        })
    return out
