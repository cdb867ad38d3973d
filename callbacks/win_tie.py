"""Win-and-Tie (DESIGN §5): on which tasks does the student match its teacher, at what tolerance.

Scores are per task on a 0-1 scale, higher is better. For a tolerance alpha,
    C_alpha = |{t : s_S(t) >= s_T(t) - alpha}| / |tasks|        (absolute)
    C_alpha = |{t : s_S(t) >= (1 - alpha) * s_T(t)}| / |tasks|  (relative)
and the critical tolerance alpha* is the smallest alpha with C_alpha >= target.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

from models.checkpoint import atomic_file_write

# Scores that differ only by float rounding (0.1 + 0.2 vs 0.3) count as equal.
TIE_EPS = 1e-12


def _tasks(student_scores: dict, teacher_scores: dict) -> list[str]:
    missing = sorted(set(student_scores) ^ set(teacher_scores))
    if missing:
        raise ValueError(f"student and teacher were scored on different tasks; not in both: {', '.join(missing)}")
    if not student_scores:
        raise ValueError("no task scores to compare")
    return sorted(student_scores)


def required_tolerance(student: float, teacher: float, relative: bool = False) -> float:
    """The smallest alpha at which this task counts as a win or tie."""
    if relative:
        if teacher <= 0:
            return 0.0
        return max(0.0, 1.0 - student / teacher)
    return max(0.0, teacher - student)


def win_and_tie(student_scores: dict, teacher_scores: dict, alphas, relative: bool = False) -> list[float]:
    """C_alpha for each alpha in ``alphas``."""
    tasks = _tasks(student_scores, teacher_scores)
    needs = [required_tolerance(student_scores[t], teacher_scores[t], relative) for t in tasks]
    return [sum(need <= a + TIE_EPS for need in needs) / len(tasks) for a in alphas]


def critical_tolerance(student_scores: dict, teacher_scores: dict, target: float = 1.0, relative: bool = False) -> float:
    """alpha*: the smallest alpha with C_alpha >= target (computed exactly, not on a grid)."""
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target={target} is invalid; allowed values: 0 < target <= 1")
    tasks = _tasks(student_scores, teacher_scores)
    needs = sorted(required_tolerance(student_scores[t], teacher_scores[t], relative) for t in tasks)
    count = math.ceil(target * len(tasks) - TIE_EPS)
    return needs[max(count, 1) - 1]


def write_curve_csv(path, alphas, curves: dict[str, list[float]]) -> None:
    """alpha, then one C_alpha column per run."""
    def write(tmp: Path):
        with tmp.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["alpha", *curves])
            for i, a in enumerate(alphas):
                writer.writerow([f"{a:.6g}", *(f"{c[i]:.6g}" for c in curves.values())])

    atomic_file_write(path, write)


def plot_curves(path, alphas, curves: dict[str, list[float]], alpha_stars: dict[str, float], target: float = 1.0,
                relative: bool = False):
    """C_alpha over alpha for one or more runs, alpha* marked; returns the matplotlib figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    n = len(curves)
    for i, (label, values) in enumerate(curves.items()):
        # earlier curves are drawn wider, so a curve that coincides with a later one still shows around it
        width = 1.5 + 3.0 * (n - 1 - i) / max(n - 1, 1)
        line, = ax.step(alphas, values, where="post", linewidth=width, alpha=0.85,
                        label=f"{label} (α*={alpha_stars[label]:.3f})")
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
