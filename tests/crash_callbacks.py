"""Callbacks that inject faults into a real training run (used through ``--trainer.callbacks`` by
the reliability tests): a SIGKILL, NaN weights, a file-size limit that makes the next write fail."""

from __future__ import annotations

import os
import resource
import signal

import lightning as L
import torch


class KillAtStep(L.Callback):
    """SIGKILL this process when ``step`` optimizer steps are done (mid-epoch, no cleanup)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class PoisonWeightsAtStep(L.Callback):
    """Set one student weight to NaN before the batch of ``step``: that step's losses become NaN."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                next(p for p in pl_module.student.parameters() if p.requires_grad).fill_(float("nan"))


class LimitFileSizeAtStep(L.Callback):
    """From ``step`` on, no file may grow past ``max_bytes`` (RLIMIT_FSIZE): the kernel fails the write
    with EFBIG, as a full disk fails it with ENOSPC."""

    def __init__(self, step: int, max_bytes: int):
        self.step, self.max_bytes = step, max_bytes

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get the error, not the signal
            resource.setrlimit(resource.RLIMIT_FSIZE, (self.max_bytes, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
