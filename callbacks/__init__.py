"""Callbacks: I/O and orchestration around training — saving students, throughput, merging
experts, and evaluation with Win-and-Tie curves (DESIGN §4-§6)."""

from .eval import EvalCallback
from .scoring import evaluate_model, primary_scores, write_report
from .harness import HarnessLM
from .merge import ModelMergeCallback, merge_students
from .student_export import StudentExportCallback, TokensPerSecond
from .win_tie import critical_tolerance, win_and_tie

__all__ = [
    "EvalCallback", "HarnessLM", "ModelMergeCallback", "StudentExportCallback", "TokensPerSecond",
    "critical_tolerance", "evaluate_model", "merge_students", "primary_scores", "win_and_tie", "write_report",
]
