"""The decode benchmarks: time per decoding step and decode memory, student against teacher
(``decode``), and two hybrid layers against each other (``decode_layers``).

One module per benchmark keeps ``experiments.bench`` an entry point; this one holds the decode
cell (prefill once, repeat the state over the batch, time greedy steps), the shared floor (the
student with its attention reduced to the q/k/v/o products) and the table's summary rows.
"""

from __future__ import annotations

import gc
import statistics

import torch

from experiments.bench_base import BenchBase
from experiments.bench_report import interval_series, interval_text, markdown_table, mib, pair, ratio, round_ratio
from experiments.bench_runners import StudentRunner, projections_only
from experiments.measure import OUT_OF_MEMORY, MiB, PeakMemory, out_of_memory, timed
from models import HybridConfig, HybridStudent, convert_to_hybrid
from models.config import PREVIOUS_LAYER

# Steps each model takes alone after the timed ones, for its peak memory.
PEAK_STEPS = 2


class DecodeBenchmarks(BenchBase):
    """``decode`` and ``decode_layers``."""

    @torch.no_grad()
    def _paired_decode(self, runners, ids, batch: int, steps: int, warmup: int) -> dict[str, dict]:
        """Both models prefill ``ids`` (timed once), repeat their cache or state over the batch and
        take greedy steps in turns, one step each per round (who goes first alternating), ``warmup``
        untimed (a compiled step compiles there) then ``steps`` timed: this machine drifts by 10-30 %
        within a run, and taking turns puts the same drift on both. Then each model's peak memory over
        a few steps of its own, the teacher first and its cache freed before the student's, so that
        neither peak holds the other's cache. A model that runs out of memory gets an error and the
        other goes on alone. Returns a row per model kind, with every timed step (``times_s``, round
        by round, so that the summary can pair them)."""
        rows = {runner.kind: {} for runner in runners}
        states, tokens, times = {}, {}, {runner.kind: [] for runner in runners}

        def attempt(runner, work):
            try:
                return work()
            except OUT_OF_MEMORY as err:
                rows[runner.kind]["error"] = out_of_memory(err)
                states.pop(runner.kind, None)
                gc.collect()

        for runner in runners:
            def prefill(runner=runner):
                (logits, state), rows[runner.kind]["prefill_s"] = timed(lambda: runner.prefill(ids), self.device)
                if batch > 1:  # rows of one prefilled prompt: decoding costs the same whatever the rows hold
                    state, logits = runner.repeat(state, batch), logits.expand(batch, -1)
                states[runner.kind], tokens[runner.kind] = state, logits.argmax(-1)
            attempt(runner, prefill)
        for i in range(warmup + steps):
            for runner in runners if i % 2 == 0 else runners[::-1]:
                kind = runner.kind
                if kind not in states:
                    continue

                def step(runner=runner, kind=kind):
                    (logits, states[kind]), seconds = timed(lambda: runner.step(tokens[kind], states[kind]),
                                                            self.device)
                    tokens[kind] = logits.argmax(-1)
                    if i >= warmup:
                        times[kind].append(seconds)
                attempt(runner, step)
        for runner in sorted(runners, key=lambda r: r.kind != "teacher"):
            kind = runner.kind
            if kind not in states:
                continue
            values = times[kind]
            q1, median, q3 = statistics.quantiles(values, n=4) if len(values) > 1 else (values[0],) * 3
            rows[kind].update(ms_per_step=1e3 * median, ms_p25=1e3 * q1, ms_p75=1e3 * q3, tokens_per_s=batch / median,
                              state_bytes=runner.state_bytes(states[kind]), times_s=values)

            def peak_steps(runner=runner, kind=kind):
                with PeakMemory(self.device) as peak:
                    for _ in range(PEAK_STEPS):
                        logits, states[kind] = runner.step(tokens[kind], states[kind])
                        tokens[kind] = logits.argmax(-1)
                rows[kind].update(peak_bytes=peak.bytes, peak_kind=peak.kind)
            attempt(runner, peak_steps)
            states.pop(kind, None)
            gc.collect()
        return rows

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
        other = self._decode_step_of(convert_to_hybrid(teacher, baseline).to(device=self.device, dtype=self.dtype).eval())
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
                            f"{name}_state_mib": mib(runners[name].state_bytes(states[name]))})
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
        takes medians), repeats its cache/state over the batch, runs ``warmup`` untimed greedy steps
        and reports the median (and quartiles) of ``steps`` timed ones, teacher and student taking
        turns step by step; the peak memory comes from two more steps of each model alone. The floor
        row is the shared part alone (q/k/v/o, MLPs, norms, head): the student's and the teacher's
        distance from it is what their attention costs per token.

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

        def measure(runners, batch, prompt, ids):
            return self._paired_decode(runners, ids, batch, steps, warmup)

        rows = self._side_by_side("decode", measure, extra)
        summary = decode_summary(rows, floors)
        payload = self._payload("decode", rows, {**extra, "summary": summary})
        columns = [("batch", "batch", "d"), ("prompt", "prompt", "d"), ("teacher_ms", "teacher ms/step", ".1f"),
                   ("student_ms", "student ms/step", ".1f"), ("floor_ms", "shared floor ms", ".1f"),
                   ("speedup", "student speed-up", ".2f"),
                   ("paired_speedup_text", "speed-up per round: median [interval] coverage", ""),
                   ("student_over_floor_ms", "student − floor ms", ".1f"),
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
                  ("student speed-up per round (median, interval)", interval_series(summary, "paired_speedup"),
                   False, 1.0),
                  ("decode state (MiB)", memory_series, True)]
        return self._finish("decode", payload, markdown_table(summary, columns), self._title("Decode"), panels)


def decode_summary(rows: list[dict], floors: list[dict]) -> list[dict]:
    """One line per (batch, prompt): both models' step times, the floor, the speed-up (ratio of the
    medians, and the median of the per-round ratios with its interval: ``paired_ratio``), state sizes."""
    out = []
    for batch, prompt in dict.fromkeys((r["batch"], r["prompt"]) for r in rows):
        teacher, student = pair(rows, batch, prompt)
        floor = next((f["ms_per_step"] for f in floors if f["batch"] == batch), None)
        t_ms, s_ms = teacher.get("ms_per_step"), student.get("ms_per_step")
        rounds = round_ratio(teacher, student, "times_s")  # teacher / student, step by step
        out.append({
            "batch": batch, "prompt": prompt, "teacher_ms": t_ms, "student_ms": s_ms, "floor_ms": floor,
            "speedup": ratio(t_ms, s_ms), "paired_speedup": rounds, "paired_speedup_text": interval_text(rounds),
            "student_over_floor_ms": None if s_ms is None or floor is None else s_ms - floor,
            "teacher_over_floor_ms": None if t_ms is None or floor is None else t_ms - floor,
            "teacher_kv_mib": mib(teacher.get("state_bytes")), "student_state_mib": mib(student.get("state_bytes")),
            "state_ratio": ratio(student.get("state_bytes"), teacher.get("state_bytes")),
            "teacher_peak_mib": mib(teacher.get("peak_bytes")), "student_peak_mib": mib(student.get("peak_bytes")),
            "errors": [r["error"] for r in (teacher, student) if "error" in r] or None,
        })
    return out
