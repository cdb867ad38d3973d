"""Win-and-Tie (DESIGN §5): on which tasks does the student match its teacher, at what tolerance.

Scores are per task on a 0-1 scale, higher is better. For a tolerance alpha,
    C_alpha = |{t : s_S(t) >= s_T(t) - alpha}| / |tasks|        (absolute)
    C_alpha = |{t : s_S(t) >= (1 - alpha) * s_T(t)}| / |tasks|  (relative)
and the critical tolerance alpha* is the smallest alpha with C_alpha >= target.

Scores must be finite (a NaN would count as a win), and the relative form is refused on a task whose
teacher does no better than chance, where it means nothing. ``PRESETS`` names the paper's and the strict
setting; ``callbacks.statistics`` puts bootstrap intervals around C_alpha and alpha*.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from models.storage import atomic_file_write

# Scores that differ only by float rounding (0.1 + 0.2 vs 0.3) count as equal.
TIE_EPS = 1e-12
# the tolerances a Win-and-Tie curve is drawn at (0 to 0.5 in steps of 0.005), and the few a table shows
CURVE_ALPHAS = tuple(round(0.005 * i, 4) for i in range(101))
TABLE_ALPHAS = (0.0, 0.02, 0.05, 0.1)


PRESETS = {
    "paper": {"relative": True, "target": 0.5},
    "strict": {"relative": False, "target": 1.0},
}
"""Named settings of ``relative`` and ``target``, to pass as ``critical_tolerance(s, t, **preset(name))``:

- ``paper``: the seed paper's Win-and-Tie, relative tolerance A_S >= (1 - alpha) A_T and
  alpha* = inf{alpha : C_alpha >= 0.5}.
- ``strict``: absolute tolerance s_S >= s_T - alpha, and alpha* is reached only when every task is won or tied.
"""


def preset(name: str) -> dict:
    """The ``relative`` and ``target`` settings of a named preset (a copy: callers may change it)."""
    if name not in PRESETS:
        raise ValueError(f"unknown Win-and-Tie preset {name!r}; allowed: {', '.join(PRESETS)}")
    return dict(PRESETS[name])


def shared_tasks(student_scores: dict, teacher_scores: dict) -> list[str]:
    """The tasks of both sides, sorted; refuses sides scored on different tasks, or on none."""
    missing = sorted(set(student_scores) ^ set(teacher_scores))
    if missing:
        raise ValueError(f"student and teacher were scored on different tasks; not in both: {', '.join(missing)}")
    if not student_scores:
        raise ValueError("no task scores to compare")
    return sorted(student_scores)


def _check_finite(task: str, student: float, teacher: float) -> None:
    # NaN compares false with everything, so max(0, teacher - nan) is 0: a failed evaluation would count as a win
    for side, score in (("student", student), ("teacher", teacher)):
        if not math.isfinite(score):
            raise ValueError(f"task {task!r}: the {side} score is {score}; Win-and-Tie needs finite scores")


def _tasks(student_scores: dict, teacher_scores: dict) -> list[str]:
    tasks = shared_tasks(student_scores, teacher_scores)
    for task in tasks:
        _check_finite(task, student_scores[task], teacher_scores[task])
    return tasks


def relative_floor(task: str, chance: float | None = None) -> float:
    """The score a teacher must exceed on ``task`` for a relative tolerance to mean anything: its chance
    score, and never below 0 (the relative gap divides by the teacher score)."""
    if chance is None:
        return 0.0
    if not math.isfinite(chance):
        raise ValueError(f"task {task!r}: the chance score is {chance}; it must be a finite number")
    return max(0.0, chance)


def _chance_of(task: str, chance: dict[str, float] | None) -> float | None:
    return None if chance is None else chance.get(task)


def required_tolerance(student: float, teacher: float, relative: bool = False, *, chance: float | None = None,
                       task: str = "the task") -> float:
    """The smallest alpha at which this task counts as a win or tie.

    Relative mode refuses a teacher at or below ``chance`` (at or below 0 without one): the paper's
    A_S >= (1 - alpha) A_T then holds for a student at chance or worse, so the tolerance says nothing.
    ``chance`` is ignored in absolute mode; ``task`` names the task in error messages.
    """
    _check_finite(task, student, teacher)
    if relative:
        floor = relative_floor(task, chance)
        if teacher <= floor:
            if chance is None:
                at_or_below = "0 (no chance score given)"
            elif chance == floor:
                at_or_below = f"its chance score {chance:g}"
            else:
                at_or_below = f"0 (its chance score {chance:g} is below 0, and the relative gap divides by it)"
            raise ValueError(
                f"task {task!r}: the teacher score {teacher:g} is at or below {at_or_below}, where a relative "
                "tolerance s_S >= (1 - alpha) s_T is meaningless; drop the task or use the absolute tolerance "
                "(relative=False)")
        return max(0.0, 1.0 - student / teacher)
    return max(0.0, teacher - student)


def _needs(student_scores: dict, teacher_scores: dict, relative: bool, chance: dict[str, float] | None) -> list[float]:
    return [required_tolerance(student_scores[t], teacher_scores[t], relative, chance=_chance_of(t, chance), task=t)
            for t in _tasks(student_scores, teacher_scores)]


def win_and_tie(student_scores: dict, teacher_scores: dict, alphas, relative: bool = False, *,
                chance: dict[str, float] | None = None) -> list[float]:
    """C_alpha for each alpha in ``alphas``. ``chance``: per-task chance scores, used in relative mode to
    refuse tasks whose teacher does no better than chance (tasks missing from it are held to 0)."""
    needs = _needs(student_scores, teacher_scores, relative, chance)
    return [sum(need <= a + TIE_EPS for need in needs) / len(needs) for a in alphas]


def _check_target(target: float) -> None:
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target={target} is invalid; allowed values: 0 < target <= 1")


def tasks_needed(target: float, n_tasks: int) -> int:
    """How many tasks must be won or tied for C_alpha >= target (at least one)."""
    _check_target(target)
    # the epsilon keeps a target like 0.3 * 10 tasks (3.0000000000000004 in floats) at 3 tasks, not 4
    return max(math.ceil(target * n_tasks - TIE_EPS), 1)


def critical_tolerance(student_scores: dict, teacher_scores: dict, target: float = 1.0, relative: bool = False, *,
                       chance: dict[str, float] | None = None) -> float:
    """alpha*: the smallest alpha with C_alpha >= target (computed exactly, not on a grid). ``chance`` as in
    ``win_and_tie``."""
    _check_target(target)
    needs = sorted(_needs(student_scores, teacher_scores, relative, chance))
    return needs[tasks_needed(target, len(needs)) - 1]


def teacher_recovery(student_scores: dict, teacher_scores: dict) -> dict[str, float]:
    """Student score over teacher score per task (the paper's teacher-recovery rate)."""
    recovery = {}
    for task in _tasks(student_scores, teacher_scores):
        teacher = teacher_scores[task]
        if teacher <= 0:
            raise ValueError(f"task {task!r}: the teacher score is {teacher:g}; a recovery rate needs a positive "
                             "teacher score (the ratio is undefined at 0 and flips sign below)")
        recovery[task] = student_scores[task] / teacher
    return recovery


def _check_bands(bands: dict, curves: dict, alphas) -> None:
    unknown = sorted(set(bands) - set(curves))
    if unknown:
        raise ValueError(f"bands given for runs without a curve: {', '.join(unknown)}")
    for label, (low, high) in bands.items():
        if len(low) != len(alphas) or len(high) != len(alphas):
            raise ValueError(f"band of {label!r} has {len(low)} lower and {len(high)} upper values for "
                             f"{len(alphas)} alphas")


def write_curve_csv(path, alphas, curves: dict[str, list[float]], *,
                    bands: dict[str, tuple[list[float], list[float]]] | None = None) -> None:
    """alpha, then one C_alpha column per run; a run with a band in ``bands`` (lower, upper C_alpha per
    alpha) is followed by its ``<label>_low`` and ``<label>_high`` columns."""
    bands = bands or {}
    _check_bands(bands, curves, alphas)
    columns = {}
    for label, values in curves.items():
        columns[label] = values
        if label in bands:
            columns[f"{label}_low"], columns[f"{label}_high"] = bands[label]

    def write(tmp: Path):
        with tmp.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["alpha", *columns])
            for i, a in enumerate(alphas):
                writer.writerow([f"{a:.6g}", *(f"{c[i]:.6g}" for c in columns.values())])

    atomic_file_write(path, write)


def plot_curves(path, alphas, curves: dict[str, list[float]], alpha_stars: dict[str, float], target: float = 1.0,
                relative: bool = False, *, bands: dict[str, tuple[list[float], list[float]]] | None = None,
                star_intervals: dict[str, tuple[float, float]] | None = None):
    """C_alpha over alpha for one or more runs, alpha* marked; returns the matplotlib figure.

    ``bands``: per run, (lower, upper) C_alpha per alpha, shaded in the run's colour; ``star_intervals``:
    per run, the (low, high) interval of alpha*, shown in the legend.
    """
    bands, star_intervals = bands or {}, star_intervals or {}
    _check_bands(bands, curves, alphas)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    n = len(curves)
    for i, (label, values) in enumerate(curves.items()):
        # earlier curves are drawn wider, so a curve that coincides with a later one still shows around it
        width = 1.5 + 3.0 * (n - 1 - i) / max(n - 1, 1)
        star = f"α*={alpha_stars[label]:.3f}"
        if label in star_intervals:
            low, high = star_intervals[label]
            star += f" [{low:.2f}, {high:.2f}]"
        line, = ax.step(alphas, values, where="post", linewidth=width, alpha=0.85, label=f"{label} ({star})")
        if label in bands:
            low, high = bands[label]
            ax.fill_between(alphas, low, high, step="post", color=line.get_color(), alpha=0.2, linewidth=0)
        ax.axvline(alpha_stars[label], color=line.get_color(), linestyle=":", linewidth=1)
    ax.axhline(target, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xlabel("tolerance α (relative)" if relative else "tolerance α (absolute score)")
    ax.set_ylabel("Win-and-Tie rate C_α")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("Student vs teacher: share of tasks won or tied")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    atomic_file_write(path, lambda tmp: fig.savefig(tmp, dpi=120))
    return fig
