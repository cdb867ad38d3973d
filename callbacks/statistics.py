"""Bootstrap uncertainty for student-vs-teacher comparisons (DESIGN §5).

Task scores are means over a finite set of items, so a gap of a point or two, a Win-and-Tie curve and
alpha* all move when the items are redrawn. The bootstrap here is *paired*: student and teacher were
scored on the same items, so each replicate resamples item indices once and uses them for both sides;
the item-to-item difficulty they share then cancels instead of widening the interval.

Intervals are percentile intervals whose ends are values some replicate actually produced (numpy's
``lower``/``higher`` percentile methods): C_alpha stays on its grid of k / |tasks|, and an infinite
alpha* (see ``win_tie_bands``) is not averaged with a finite one into NaN.
"""

from __future__ import annotations

import numpy as np

from .win_tie import TIE_EPS, critical_tolerance, relative_floor, shared_tasks, tasks_needed, win_and_tie


def bootstrap_indices(n_items: int, iters: int, seed: int) -> np.ndarray:
    """[iters, n_items] item indices drawn with replacement; the same seed gives the same draws."""
    if n_items < 1 or iters < 1:
        raise ValueError(f"bootstrap needs at least one item and one replicate; got n_items={n_items}, iters={iters}")
    return np.random.Generator(np.random.PCG64(seed)).integers(0, n_items, size=(iters, n_items))


def _check_level(level: float) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level={level} is invalid; allowed values: 0 < level < 1")


def _percentile_interval(replicates: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper ends over the first axis (the replicates)."""
    tail = 100.0 * (1.0 - level) / 2.0
    return (np.percentile(replicates, tail, axis=0, method="lower"),
            np.percentile(replicates, 100.0 - tail, axis=0, method="higher"))


def _paired_items(student_items, teacher_items, task: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    where = f"task {task!r}: " if task is not None else ""
    student, teacher = np.asarray(student_items, dtype=float), np.asarray(teacher_items, dtype=float)
    if student.ndim != 1 or teacher.ndim != 1:
        raise ValueError(f"{where}per-item scores must be flat sequences; got shapes {student.shape} and "
                         f"{teacher.shape}")
    if len(student) != len(teacher) or len(student) == 0:
        raise ValueError(f"{where}paired scores need the same items on both sides, at least one; got "
                         f"{len(student)} student and {len(teacher)} teacher items")
    for side, scores in (("student", student), ("teacher", teacher)):
        bad = np.flatnonzero(~np.isfinite(scores))
        if len(bad):
            raise ValueError(f"{where}the {side} score of item {bad[0]} is {scores[bad[0]]}; scores must be finite")
    return student, teacher


def paired_gap(student_items, teacher_items, iters: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """Mean student-minus-teacher score over items scored by both (same items, same order), with a paired
    bootstrap percentile interval: {"gap", "low", "high", "items", "student", "teacher"}."""
    _check_level(level)
    student, teacher = _paired_items(student_items, teacher_items)
    differences = student - teacher
    replicate_gaps = differences[bootstrap_indices(len(differences), iters, seed)].mean(axis=1)
    low, high = _percentile_interval(replicate_gaps, level)
    return {"gap": float(differences.mean()), "low": float(low), "high": float(high), "items": len(differences),
            "student": float(student.mean()), "teacher": float(teacher.mean())}


def curve_replicates(student_means: np.ndarray, teacher_means: np.ndarray, alphas, relative: bool = False,
                     target: float = 1.0, floors: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """C_alpha and alpha* of many score tables at once, as ``win_and_tie`` and ``critical_tolerance`` define
    them: ``student_means`` and ``teacher_means`` are [replicates, tasks], ``floors`` (relative mode, default
    0) the per-task score a teacher must exceed (``win_tie.relative_floor``). Returns C [replicates, alphas]
    and alpha* [replicates].

    Where the scalar functions refuse a teacher at or below its floor, a replicate cannot be refused
    alone: that task counts as not tied there (infinite required tolerance), so the band is pulled
    towards "not matched" and alpha* may be infinite."""
    student_means, teacher_means = np.asarray(student_means, dtype=float), np.asarray(teacher_means, dtype=float)
    if relative:
        floors = np.zeros(teacher_means.shape[1]) if floors is None else np.asarray(floors, dtype=float)
        above_floor = teacher_means > floors
        # the division is only used where the teacher is above its floor (> 0); elsewhere it may be x / 0
        with np.errstate(divide="ignore", invalid="ignore"):
            relative_gap = np.maximum(0.0, 1.0 - student_means / teacher_means)
        needs = np.where(above_floor, relative_gap, np.inf)
    else:
        needs = np.maximum(0.0, teacher_means - student_means)
    alphas = np.asarray(alphas, dtype=float)
    curves = (needs[:, :, None] <= alphas[None, None, :] + TIE_EPS).mean(axis=1)
    stars = np.sort(needs, axis=1)[:, tasks_needed(target, needs.shape[1]) - 1]
    return curves, stars


def win_tie_bands(student_items: dict, teacher_items: dict, alphas, relative: bool = False, target: float = 1.0,
                  chance: dict[str, float] | None = None, iters: int = 1000, seed: int = 0,
                  level: float = 0.90) -> dict:
    """Bootstrap bands around the Win-and-Tie curve and alpha*.

    ``student_items`` and ``teacher_items`` map each task to its per-item scores (the same items in the same
    order on both sides). Each replicate resamples the items of every task independently (paired within
    the task), takes each task's mean scores and computes C_alpha and alpha* from them.

    Returns {"curve": point C_alpha, "low", "high": band per alpha, "alpha_star": {"value", "low", "high"},
    "iters", "level"}. The point estimates come from all items through ``win_and_tie`` and
    ``critical_tolerance``, so a relative-mode task whose teacher is at or below chance is refused. A
    replicate in which a teacher's resampled mean falls to its chance score (or 0) instead counts that task
    as not tied (see ``curve_replicates``): ``low`` drops and ``alpha_star["high"]`` may be ``inf``.
    """
    _check_level(level)
    tasks = shared_tasks(student_items, teacher_items)
    paired = {task: _paired_items(student_items[task], teacher_items[task], task) for task in tasks}
    student_means = {task: float(student.mean()) for task, (student, _) in paired.items()}
    teacher_means = {task: float(teacher.mean()) for task, (_, teacher) in paired.items()}
    curve = win_and_tie(student_means, teacher_means, alphas, relative, chance=chance)
    alpha_star = critical_tolerance(student_means, teacher_means, target, relative, chance=chance)

    # one independent stream per task, fixed by ``seed`` and the task's place in the sorted task list
    task_seeds = np.random.SeedSequence(seed).generate_state(len(tasks))
    student_columns, teacher_columns = [], []
    for task, task_seed in zip(tasks, task_seeds):
        student, teacher = paired[task]
        indices = bootstrap_indices(len(student), iters, int(task_seed))
        student_columns.append(student[indices].mean(axis=1))
        teacher_columns.append(teacher[indices].mean(axis=1))
    replicate_student, replicate_teacher = np.stack(student_columns, axis=1), np.stack(teacher_columns, axis=1)
    floors = np.array([relative_floor(task, None if chance is None else chance.get(task)) for task in tasks])
    curves, stars = curve_replicates(replicate_student, replicate_teacher, alphas, relative, target, floors)

    low, high = _percentile_interval(curves, level)
    star_low, star_high = _percentile_interval(stars, level)
    return {"curve": curve, "low": low.tolist(), "high": high.tolist(),
            "alpha_star": {"value": alpha_star, "low": float(star_low), "high": float(star_high)},
            "iters": iters, "level": level}
