"""``EvalCallback``: scores the student every N validations, at fit end, or in ``validate`` runs,
scores the teacher once (cached on disk), and writes scores.json, win_tie.csv and win_tie.png
(the scoring itself: ``callbacks.scoring``)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import lightning as L

from datamodules.eval_suite import SuiteSize

from .scoring import EMBEDDED_SUITE, cached_teacher_evaluation, evaluate_model, item_scores, write_report
from .win_tie import CURVE_ALPHAS, win_and_tie


class EvalCallback(L.Callback):
    """Scores student and teacher on the same lm-eval tasks and draws the Win-and-Tie curve."""

    def __init__(self, tasks: list[str] = [EMBEDDED_SUITE], include_path: list[str] | None = None,
                 num_fewshot: int | None = None, limit: int | float | None = None, batch_size: int = 8,
                 max_length: int = 2048, every_n_validations: int = 0, at_fit_end: bool = True,
                 alphas: list[float] | None = None, target: float = 1.0, relative: bool = False,
                 out_dir: str | None = None, offline: bool = True, compare: dict[str, str] | None = None,
                 cache_dir: str | None = None, suite: SuiteSize | None = None):
        """
        Args:
            tasks: lm-eval task names; ``xdistill-suite`` is the embedded offline suite.
            include_path: folders of local task YAMLs.
            num_fewshot: few-shot examples (None: each task's default).
            limit: items per task (None: all).
            batch_size: requests per forward.
            max_length: longest context scored (tokens).
            every_n_validations: also score after every N-th validation (0: never).
            at_fit_end: score when fit ends.
            alphas: tolerance grid (default 0, 0.005, ..., 0.5).
            target: C_alpha that defines alpha*.
            relative: compare s_S >= (1 - alpha) s_T instead of s_S >= s_T - alpha.
            out_dir: report folder (default <log_dir>/eval).
            offline: set HF_DATASETS_OFFLINE/HF_HUB_OFFLINE, so hub tasks fail at once with a clear error.
            compare: other runs to overlay on the curve: {label: path to their scores.json}.
            cache_dir: where teacher scores and the built suite are cached (default $XDISTILL_CACHE).
            suite: items per task of the embedded suite and its needle lengths (default ``SuiteSize()``).
        """
        self.tasks, self.include_path, self.num_fewshot, self.limit = list(tasks), include_path, num_fewshot, limit
        self.batch_size, self.max_length = batch_size, max_length
        self.every_n, self.at_fit_end = every_n_validations, at_fit_end
        self.alphas = alphas or list(CURVE_ALPHAS)
        self.target, self.relative, self.out_dir, self.offline = target, relative, out_dir, offline
        self.compare, self.cache_dir, self.suite = compare or {}, cache_dir, suite
        self.validations = 0
        self.last_report: dict | None = None

    def _cache_root(self) -> Path:
        from models.storage import cache_dir

        return Path(self.cache_dir) if self.cache_dir else cache_dir()

    def teacher_evaluation(self, pl_module, tokenizer) -> dict:
        return cached_teacher_evaluation(pl_module.teacher, tokenizer, self.tasks, self.include_path, self.num_fewshot,
                                         self.limit, self.batch_size, self.max_length, self._cache_root(), self.suite)

    def run(self, trainer, pl_module) -> dict | None:
        if self.offline:
            os.environ["HF_DATASETS_OFFLINE"] = os.environ["HF_HUB_OFFLINE"] = "1"
        student = pl_module.export_student()  # every rank (gathers under FSDP)
        if not trainer.is_global_zero or student is None:
            return None
        tokenizer = getattr(trainer.datamodule, "tokenizer", None) if trainer.datamodule else None
        if tokenizer is None:
            from models import load_tokenizer

            tokenizer = load_tokenizer(pl_module.hparams.teacher)
        was_training = student.training
        teacher = self.teacher_evaluation(pl_module, tokenizer)
        started = time.perf_counter()
        student_scores, results = evaluate_model(student, tokenizer, self.tasks, self.include_path, self.num_fewshot,
                                                 self.limit, self.batch_size, self.max_length, self._cache_root(),
                                                 self.suite)
        student.train(was_training)
        others = {label: json.loads(Path(p).read_text())["student"] for label, p in self.compare.items()}
        out = Path(self.out_dir) if self.out_dir else Path(trainer.log_dir or trainer.default_root_dir) / "eval"
        report = write_report(out, student_scores, teacher["scores"], self.alphas, self.target, self.relative,
                              others=others, items={"student": item_scores(results)}, teacher_items=teacher["items"])
        report["student_seconds"] = time.perf_counter() - started
        self._log(trainer, report)
        self.last_report = report
        return report

    def _log(self, trainer, report) -> None:
        step = trainer.global_step
        scalars = {"eval/alpha_star": report["alpha_star"]}
        for a in (0.0, 0.01, 0.05, 0.1):
            scalars[f"eval/win_tie@{a:g}"] = win_and_tie(report["student"], report["teacher"], [a], self.relative)[0]
        for task, value in report["student"].items():
            scalars[f"eval/student/{task}"] = value
            scalars[f"eval/teacher/{task}"] = report["teacher"][task]
        comparison = report.get("comparisons", {}).get("student")
        if comparison:
            for task, row in comparison["tasks"].items():
                scalars.update({f"eval/gap/{task}": row["gap"], f"eval/gap_low/{task}": row["low"],
                                f"eval/gap_high/{task}": row["high"]})
            for name, preset in comparison["presets"].items():
                star = preset["alpha_star"]
                scalars.update({f"eval/{name}/alpha_star": star["value"], f"eval/{name}/alpha_star_low": star["low"],
                                f"eval/{name}/alpha_star_high": star["high"]})
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=step)
            experiment = getattr(logger, "experiment", None)
            if hasattr(experiment, "add_figure"):
                experiment.add_figure("eval/win_tie", report["figure"], global_step=step)

    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        fn = trainer.state.fn
        if fn == "validate":
            self.run(trainer, pl_module)
            return
        self.validations += 1
        if self.every_n and self.validations % self.every_n == 0:
            self.run(trainer, pl_module)

    def on_fit_end(self, trainer, pl_module) -> None:
        if self.at_fit_end:
            self.run(trainer, pl_module)
