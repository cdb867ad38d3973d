"""Scoring a model with the lm-evaluation-harness, as plain functions the entry points and
``EvalCallback`` share: task resolution (the embedded offline suite included), scores on a 0-1 scale,
on-disk caches keyed by weights, the teacher's pass test, student-vs-teacher comparisons and reports.

``evaluate_model`` runs ``lm_eval.simple_evaluate`` through ``HarnessLM`` and returns each task's
primary metric on a 0-1 scale (higher is better): the first metric of the task's ``metric_list``;
lower-is-better metrics are converted, perplexity p -> 1 / p and bits per byte b -> 2^-b.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import torch

from datamodules.eval_suite import SuiteSize
from models.storage import write_json

from .harness import HarnessLM
from .win_tie import critical_tolerance, plot_curves, win_and_tie, write_curve_csv

LOCAL_BUILDERS = {"json", "csv", "parquet", "text", "arrow", "pandas"}
EMBEDDED_SUITE = "xdistill-suite"


def to_unit_scale(metric: str, value: float, higher_is_better: bool) -> float:
    """A task score on the 0-1, higher-is-better scale that Win-and-Tie compares."""
    if higher_is_better:
        if not -1e-9 <= value <= 1 + 1e-9:
            raise ValueError(f"metric {metric!r} = {value} is not on a 0-1 scale; give a task whose primary "
                             "metric is a rate (accuracy, exact match) or convert it in the task")
        return float(value)
    if "perplexity" in metric:
        return 1.0 / float(value)
    if metric in ("bits_per_byte", "bpb"):
        return 2.0 ** -float(value)
    raise ValueError(f"metric {metric!r} is lower-is-better and has no documented 0-1 conversion "
                     "(known: *perplexity -> 1/p, bits_per_byte -> 2^-b)")


def primary_scores(results: dict) -> dict[str, float]:
    """Each task's primary metric (the first of its metric_list) from ``simple_evaluate`` results."""
    scores = {}
    for task, metrics in results["results"].items():
        config = results.get("configs", {}).get(task)
        if not config or not config.get("metric_list"):
            continue  # a group's aggregate row
        metric = config["metric_list"][0]["metric"]
        keys = [k for k in metrics if k.split(",")[0] == metric and "_stderr" not in k]
        if not keys:
            raise ValueError(f"task {task!r}: metric {metric!r} missing from the results ({sorted(metrics)})")
        higher = results.get("higher_is_better", {}).get(task, {}).get(metric, True)
        scores[task] = to_unit_scale(metric, metrics[keys[0]], higher)
    return scores


@functools.lru_cache(maxsize=8)
def _task_manager(include: tuple[str, ...], include_defaults: bool):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(include) or None, include_defaults=include_defaults)


def task_manager(tasks: list[str], include: list[str]):
    """An lm-eval TaskManager that knows ``tasks``. Indexing lm-eval's ~15k built-in task YAMLs
    takes seconds, so when every task is in the local ``include`` folders only those are indexed;
    managers are reused across calls of one process."""
    if include:
        local = _task_manager(tuple(include), False)
        if all(task in local.task_index for task in tasks):
            return local
    return _task_manager(tuple(include), True)


def resolve_tasks(tasks: list[str], include_path: list[str] | None, cache_dir: Path | None = None,
                  tokenizer=None, suite=None):
    """Expand ``xdistill-suite`` into the embedded offline suite at ``suite`` size (its tasks can
    also be named one by one; the needle tasks need the teacher's ``tokenizer``) and check, when
    offline, that no task needs the network; returns (tasks, include_path)."""
    from datamodules.eval_suite import build_suite, is_suite_task

    from models.storage import cache_dir as default_cache

    suite = suite or SuiteSize()
    include = [str(p) for p in (include_path or [])]
    resolved = []
    for task in tasks:
        resolved.extend(suite.tasks() if task == EMBEDDED_SUITE else [task])
    embedded = [t for t in resolved if is_suite_task(t)]
    if embedded:  # the embedded suite's tasks, alone or all together
        needles = [t for t in embedded if t.startswith("xd_needle_")]
        if needles and tokenizer is None:
            raise ValueError(f"tasks {needles} are built in the teacher's tokens: pass its tokenizer")
        wanted = sorted({int(t.rsplit("_", 1)[1]) for t in needles})
        if wanted and wanted != sorted(suite.needle_lengths):
            suite = SuiteSize(**{**asdict(suite), "needle_lengths": wanted})
        include.append(str(build_suite((cache_dir or default_cache()) / "eval_suite", suite,
                                       tokenizer if needles else None)))
    offline = os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1"
    if offline:
        index = task_manager(resolved, include).task_index
        for task in resolved:
            entry = index.get(task)
            if entry is None:
                raise ValueError(f"unknown lm-eval task {task!r}; give a task name or a local task YAML folder "
                                 "in include_path")
            path = (entry.cfg or {}).get("dataset_path")
            if path is not None and path not in LOCAL_BUILDERS and not Path(str(path)).exists():
                raise ValueError(f"task {task!r} needs the Hugging Face dataset {path!r}, but this run is offline "
                                 "(HF_DATASETS_OFFLINE/HF_HUB_OFFLINE); use a local task YAML instead")
    return resolved, include


def item_scores(results: dict) -> dict[str, list[float]]:
    """Each task's per-item primary metric (in document order) from ``simple_evaluate`` results run
    with ``log_samples=True``: what the paired bootstrap resamples."""
    items = {}
    for task, samples in (results.get("samples") or {}).items():
        config = results.get("configs", {}).get(task) or {}
        if not config.get("metric_list"):
            continue
        metric = config["metric_list"][0]["metric"]
        higher = results.get("higher_is_better", {}).get(task, {}).get(metric, True)
        ordered = sorted(samples, key=lambda s: s["doc_id"])
        items[task] = [to_unit_scale(metric, float(s[metric]), higher) for s in ordered]
    return items


def chance_scores(tasks) -> dict[str, float]:
    """The guessing score of each embedded-suite task (tasks from elsewhere: 0)."""
    from datamodules.eval_suite import is_suite_task, task_info

    return {t: task_info(t)["chance"] if is_suite_task(t) else 0.0 for t in tasks}


def evaluate_model(model, tokenizer, tasks: list[str], include_path=None, num_fewshot: int | None = None,
                   limit: int | float | None = None, batch_size: int = 8, max_length: int = 2048,
                   cache_dir: Path | None = None, suite=None) -> tuple[dict[str, float], dict]:
    """Score one model; returns (primary score per task, the harness's results dict, whose
    ``samples`` give the per-item scores: ``item_scores``)."""
    import lm_eval

    tasks, include = resolve_tasks(tasks, include_path, cache_dir, tokenizer, suite)
    lm = HarnessLM(model, tokenizer, batch_size=batch_size, max_length=max_length)
    results = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit,
                                      task_manager=task_manager(tasks, include), log_samples=True,
                                      bootstrap_iters=0, random_seed=0, numpy_random_seed=0, torch_random_seed=0,
                                      fewshot_random_seed=0)
    return primary_scores(results), results


def weights_fingerprint(folder) -> str:
    """Identity of a saved model folder: a digest of its config and of every tensor's name, dtype,
    shape and values (a student's embeddings are its teacher's, so ``teacher_fingerprint`` cannot
    tell students apart; the file bytes cannot either: safetensors writes its metadata in varying
    order, so equal weights saved twice differ as files)."""
    from safetensors import safe_open

    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder} has no .safetensors weights to fingerprint; pass a saved student folder")
    h = hashlib.sha256()
    config = folder / "config.json"
    if config.is_file():
        h.update(json.dumps(json.loads(config.read_text()), sort_keys=True).encode())
    for path in files:
        with safe_open(str(path), "pt") as weights:
            for name in sorted(weights.keys()):
                tensor = weights.get_tensor(name).contiguous()
                h.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
                h.update(tensor.flatten().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def cached_evaluation(model, tokenizer, tasks: list[str], include_path=None, num_fewshot: int | None = None,
                      limit: int | float | None = None, batch_size: int = 8, max_length: int = 2048,
                      cache_dir: Path | None = None, suite=None, *, fingerprint: str, role: str) -> dict:
    """A model's scores and per-item scores ({"scores", "items"}), computed once per (weights named by
    ``fingerprint``, tasks, suite size, few-shot, limit, context length) and kept under
    <cache>/eval/<role>-<key>.json: a baseline student (a fresh conversion, the same for every run of
    a config) or a rerun's student is not scored twice (``weights_fingerprint`` names a saved one)."""
    from datamodules.eval_suite import SUITE_VERSION
    from models.storage import cache_dir as default_cache

    # the suite's version and size too: a rebuilt suite (new items) must not reuse old scores
    payload = [fingerprint, list(tasks), include_path, num_fewshot, limit, max_length, SUITE_VERSION,
               asdict(suite or SuiteSize())]
    key = hashlib.sha256(json.dumps(payload, default=str).encode()).hexdigest()[:20]
    path = Path(cache_dir or default_cache()) / "eval" / f"{role}-{key}.json"
    if path.is_file():
        try:
            cached = json.loads(path.read_text())
            return {"scores": cached["scores"], "items": cached["items"]}
        except (json.JSONDecodeError, KeyError, TypeError) as err:  # a derived cache: score again
            warnings.warn(f"cached {role} scores {path} cannot be read ({err!r}); scoring the {role} again")
    started = time.perf_counter()
    scores, results = evaluate_model(model, tokenizer, tasks, include_path, num_fewshot, limit, batch_size, max_length,
                                     cache_dir, suite)
    evaluation = {"scores": scores, "items": item_scores(results)}
    write_json(path, {**evaluation, "seconds": time.perf_counter() - started})
    return evaluation


def cached_teacher_evaluation(teacher, tokenizer, tasks: list[str], include_path=None, num_fewshot: int | None = None,
                              limit: int | float | None = None, batch_size: int = 8, max_length: int = 2048,
                              cache_dir: Path | None = None, suite=None) -> dict:
    """The teacher's ``cached_evaluation``, keyed by ``teacher_fingerprint``: every student of that
    teacher is compared with the same scores."""
    from models.teacher import teacher_fingerprint

    return cached_evaluation(teacher, tokenizer, tasks, include_path, num_fewshot, limit, batch_size, max_length,
                             cache_dir, suite, fingerprint=teacher_fingerprint(teacher), role="teacher")


def cached_teacher_scores(teacher, tokenizer, tasks: list[str], include_path=None, num_fewshot: int | None = None,
                          limit: int | float | None = None, batch_size: int = 8, max_length: int = 2048,
                          cache_dir: Path | None = None, suite=None) -> dict[str, float]:
    """The teacher's scores per task (``cached_teacher_evaluation`` without the items)."""
    return cached_teacher_evaluation(teacher, tokenizer, tasks, include_path, num_fewshot, limit, batch_size,
                                     max_length, cache_dir, suite)["scores"]


def teacher_passes(task: str, teacher_score: float, chance: float) -> bool:
    """The suite's admission rule: a task can tell students apart only if the teacher scores at least
    chance + 0.2 on it (log-likelihood; 0.5 on generation tasks, whose chance is 0)."""
    from datamodules.eval_suite import PASS_MARGIN

    margin = PASS_MARGIN["generation" if task.endswith("_gen") else "loglikelihood"]
    return teacher_score >= chance + margin - 1e-12


def compare_with_teacher(student_items: dict[str, list[float]], teacher_items: dict[str, list[float]],
                         alphas: list[float], chance: dict[str, float] | None = None, iters: int = 1000,
                         seed: int = 0) -> dict:
    """Everything the report says about one student against its teacher, with intervals.

    Per task: the mean scores, the paired gap (student - teacher) with its 95 % bootstrap interval and
    the teacher-recovery rate (student / teacher). Win-and-Tie in both presets (``strict``: absolute,
    every task; ``paper``: relative, C_alpha >= 0.5), each with a 90 % band around its curve and an
    interval for alpha*, over the tasks the teacher passes (``teacher_passes``; the others are listed in
    ``excluded``: a task the teacher cannot do says nothing about the student).
    """
    from .statistics import paired_gap, win_tie_bands
    from .win_tie import PRESETS

    chance = chance if chance is not None else chance_scores(teacher_items)
    tasks = sorted(teacher_items)
    per_task = {}
    for task in tasks:
        gap = paired_gap(student_items[task], teacher_items[task], iters=2 * iters, seed=seed)
        per_task[task] = {**gap, "recovery": gap["student"] / gap["teacher"] if gap["teacher"] > 0 else None,
                          "teacher_passes": teacher_passes(task, gap["teacher"], chance.get(task, 0.0))}
    kept = [t for t in tasks if per_task[t]["teacher_passes"]]
    presets = {}
    if kept:
        for name, settings in PRESETS.items():
            presets[name] = {**settings, **win_tie_bands({t: student_items[t] for t in kept},
                                                         {t: teacher_items[t] for t in kept}, alphas,
                                                         chance=chance, iters=iters, seed=seed, **settings)}
    return {"tasks": per_task, "kept": kept, "excluded": [t for t in tasks if t not in kept], "presets": presets}


def write_report(out_dir, student_scores: dict, teacher_scores: dict, alphas: list[float], target: float = 1.0,
                 relative: bool = False, label: str = "student", others: dict[str, dict] | None = None, *,
                 items: dict[str, dict] | None = None, teacher_items: dict | None = None) -> dict:
    """scores.json, win_tie.csv and win_tie.png for one student (plus other runs' scores overlaid).

    With per-item scores (``items``: {run label: {task: items}}, ``teacher_items``) the report adds each
    task's paired gap and recovery, both Win-and-Tie presets with bands and alpha* intervals
    (``compare_with_teacher``), draws the bands and writes them to the CSV; the curve drawn is then
    the ``paper`` preset's when ``relative``, else the ``strict`` one's, over the tasks the teacher passes."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = {label: student_scores, **(others or {})}
    comparisons = {name: compare_with_teacher(items[name], teacher_items, alphas)
                   for name in runs if items and teacher_items and name in items}
    if comparisons and comparisons[next(iter(comparisons))]["kept"]:
        preset_name = "paper" if relative else "strict"
        target = comparisons[label]["presets"][preset_name]["target"] if label in comparisons else target
        kept = comparisons[next(iter(comparisons))]["kept"]
        curves = {name: c["presets"][preset_name]["curve"] for name, c in comparisons.items()}
        stars = {name: c["presets"][preset_name]["alpha_star"]["value"] for name, c in comparisons.items()}
        bands = {name: (c["presets"][preset_name]["low"], c["presets"][preset_name]["high"])
                 for name, c in comparisons.items()}
        star_intervals = {name: (c["presets"][preset_name]["alpha_star"]["low"],
                                 c["presets"][preset_name]["alpha_star"]["high"]) for name, c in comparisons.items()}
        for name, s in runs.items():  # runs without items: their point curve only
            if name not in comparisons:
                kept_scores = {t: s[t] for t in kept}
                curves[name] = win_and_tie(kept_scores, {t: teacher_scores[t] for t in kept}, alphas, relative)
                stars[name] = critical_tolerance(kept_scores, {t: teacher_scores[t] for t in kept}, target, relative)
    else:  # no per-item scores, or no task the teacher passes: the point curves over every task
        curves = {name: win_and_tie(s, teacher_scores, alphas, relative) for name, s in runs.items()}
        stars = {name: critical_tolerance(s, teacher_scores, target, relative) for name, s in runs.items()}
        bands = star_intervals = None
    summary = {"student": student_scores, "teacher": teacher_scores, "alpha_star": stars[label], "target": target,
               "relative": relative, "win_tie": dict(zip((f"{a:.4g}" for a in alphas), curves[label]))}
    if comparisons:
        summary["comparisons"] = comparisons
        summary["items"] = {"teacher": teacher_items, **items}
    write_json(out_dir / "scores.json", summary)
    write_curve_csv(out_dir / "win_tie.csv", alphas, curves, bands=bands)
    summary["figure"] = plot_curves(out_dir / "win_tie.png", alphas, curves, stars, target, relative, bands=bands,
                                    star_intervals=star_intervals)
    return summary


def comparison_table(comparisons: dict[str, dict], teacher_scores: dict) -> str:
    """Markdown: per task the teacher's score, then each run's score, paired gap [95 % interval] and
    teacher recovery; tasks the teacher does not pass are marked and left out of Win-and-Tie."""
    names = list(comparisons)
    first = comparisons[names[0]]
    head = "| task | teacher | " + " | ".join(f"{n} (gap [95 % CI], recovery)" for n in names) + " |"
    lines = [head, "|---|---:|" + "---:|" * len(names)]
    for task in sorted(first["tasks"]):
        row = first["tasks"][task]
        mark = "" if row["teacher_passes"] else " (teacher below chance + margin: excluded)"
        cells = []
        for n in names:
            t = comparisons[n]["tasks"][task]
            recovery = f"{t['recovery']:.2f}" if t["recovery"] is not None else "n/a"
            cells.append(f"{t['student']:.3f} ({t['gap']:+.3f} [{t['low']:+.3f}, {t['high']:+.3f}], {recovery})")
        lines.append(f"| {task}{mark} | {teacher_scores[task]:.3f} ({row['items']} items) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def preset_table(comparisons: dict[str, dict]) -> str:
    """Markdown: alpha* [90 % interval] of each run in both Win-and-Tie presets."""
    lines = ["| student | strict alpha* (absolute, all tasks) | paper alpha* (relative, C_alpha >= 0.5) |",
             "|---|---:|---:|"]
    for name, c in comparisons.items():
        cells = []
        for preset in ("strict", "paper"):
            star = c["presets"].get(preset, {}).get("alpha_star")
            cells.append("n/a" if star is None else f"{star['value']:.3f} [{star['low']:.3f}, {star['high']:.3f}]")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
