"""Score a student and its teacher on lm-eval tasks and write the Win-and-Tie report.

    python -m experiments.evaluate --teacher smollm2-135m-instruct --student runs/merged/student --out runs/eval/merged
    python -m experiments.evaluate --teacher smollm2-135m-instruct --out runs/eval/untrained   # a fresh conversion

Writes scores.json, win_tie.csv and win_tie.png to --out (several runs overlaid with --compare).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from jsonargparse import CLI

from callbacks.win_tie import CURVE_ALPHAS
from callbacks.scoring import EMBEDDED_SUITE, comparison_table, evaluate_model, item_scores, preset_table, write_report
from datamodules.eval_suite import SuiteSize
from models import HybridConfig, convert_to_hybrid, load_student, load_teacher, load_tokenizer


def evaluate(teacher: str = "smollm2-135m-instruct", student: str | None = None, out: str = "runs/eval/untrained",
             tasks: list[str] = [EMBEDDED_SUITE], include_path: list[str] | None = None,
             num_fewshot: int | None = None, limit: int | None = None, batch_size: int = 8,
             hybrid: HybridConfig = HybridConfig(), compare: dict[str, str] | None = None,
             target: float = 1.0, relative: bool = False, offline: bool = True, suite: SuiteSize = SuiteSize()) -> dict:
    """
    Args:
        teacher: the teacher (hub id, folder, or the embedded default).
        student: a saved student folder; None converts the teacher with ``hybrid`` (untrained).
        out: report folder.
        tasks: lm-eval task names (``xdistill-suite``: the embedded offline suite).
        include_path: folders of local task YAMLs.
        num_fewshot: few-shot examples (None: task default).
        limit: items per task (None: all).
        batch_size: requests per forward.
        hybrid: conversion settings when no student is given.
        compare: other runs' scores.json to overlay, {label: path}.
        target: C_alpha that defines alpha*.
        relative: relative tolerance instead of absolute.
        offline: refuse tasks that need the network, at once.
        suite: items per task of the embedded suite, and its needle lengths.
    """
    if offline:
        os.environ["HF_DATASETS_OFFLINE"] = os.environ["HF_HUB_OFFLINE"] = "1"
    teacher_model = load_teacher(teacher)
    tokenizer = load_tokenizer(teacher)
    student_model = load_student(student) if student else convert_to_hybrid(teacher_model, hybrid).eval()
    timings, scores, items = {}, {}, {}
    for name, model in (("teacher", teacher_model), ("student", student_model)):
        started = time.perf_counter()
        scores[name], results = evaluate_model(model, tokenizer, tasks, include_path, num_fewshot, limit, batch_size,
                                               suite=suite)
        items[name] = item_scores(results)
        timings[name] = time.perf_counter() - started
    alphas = list(CURVE_ALPHAS)
    others = {label: json.loads(Path(p).read_text())["student"] for label, p in (compare or {}).items()}
    report = write_report(out, scores["student"], scores["teacher"], alphas, target, relative, others=others,
                          items={"student": items["student"]}, teacher_items=items["teacher"])
    comparison = {"student": report["comparisons"]["student"]}
    print(comparison_table(comparison, scores["teacher"]))
    print()
    print(preset_table(comparison))
    print(f"seconds: teacher {timings['teacher']:.0f}, student {timings['student']:.0f}")
    return {"scores": scores, "alpha_star": report["alpha_star"], "seconds": timings}


if __name__ == "__main__":
    CLI(evaluate, as_positional=False)
