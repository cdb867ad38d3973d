"""Callbacks: I/O and orchestration around training (saving students, throughput; merging and
evaluation come with their own issues)."""

from .student_export import StudentExportCallback, TokensPerSecond

__all__ = ["StudentExportCallback", "TokensPerSecond"]
