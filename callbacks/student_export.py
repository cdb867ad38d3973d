"""I/O of the training stages: saving the student, measuring throughput."""

from __future__ import annotations

import time
from pathlib import Path

import lightning as L

from models import save_student


class StudentExportCallback(L.Callback):
    """Saves the trained student with ``models.save_student`` when fit ends (atomically), so the
    next stage can start from it with ``--model.student_ckpt``."""

    def __init__(self, dirpath: str | None = None):
        """
        Args:
            dirpath: output folder; default ``<log_dir>/student``.
        """
        self.dirpath = dirpath
        self.saved_to: Path | None = None

    def target(self, trainer) -> Path:
        return Path(self.dirpath) if self.dirpath else Path(trainer.log_dir or trainer.default_root_dir) / "student"

    def on_fit_end(self, trainer, pl_module) -> None:
        student = pl_module.export_student()  # every rank: under FSDP this gathers the weights
        if trainer.is_global_zero and student is not None:
            tokenizer = getattr(trainer.datamodule, "tokenizer", None) if trainer.datamodule else None
            self.saved_to = save_student(student, self.target(trainer), tokenizer=tokenizer)


class TokensPerSecond(L.Callback):
    """Logs ``train/tokens_per_s``: tokens of a batch over the wall time from one batch start to the next."""

    def __init__(self):
        self._start = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._start is None:
            return
        tokens = batch["input_ids"].numel() * trainer.world_size
        pl_module.log("train/tokens_per_s", tokens / max(time.perf_counter() - self._start, 1e-9), on_step=True)
