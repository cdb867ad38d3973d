"""Schedules of the KD temperature, alpha and loss weights: pure functions of the optimizer step
(nanoGPT's get_lr habit), so a resumed run continues exactly where it stopped."""

from __future__ import annotations

import math
from dataclasses import dataclass

KINDS = ("constant", "linear", "cosine", "delta")


def linear(start: float, end: float, step: int, total_steps: int) -> float:
    frac = min(max(step / max(total_steps, 1), 0.0), 1.0)
    return start + (end - start) * frac


def cosine(start: float, end: float, step: int, total_steps: int) -> float:
    frac = min(max(step / max(total_steps, 1), 0.0), 1.0)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * frac))


def delta_distillation(v_init: float, v_final: float, step: int, steps_per_epoch: int, delta: float) -> float:
    """Distil-xLSTM's Δ-distillation: within epoch e at step k of that epoch
    v = v_final + (v_e - v_final) / (1 + ln(1 + k)), where v_e moves from v_init towards v_final by
    Δ per epoch (v_init <- max(v_init - Δ, v_final) for a decreasing value) and never passes it."""
    epoch, k = divmod(step, max(steps_per_epoch, 1))
    gap = v_init - v_final
    moved = min(epoch * delta, abs(gap))
    v_epoch = v_init - math.copysign(moved, gap) if gap else v_init
    return v_final + (v_epoch - v_final) / (1.0 + math.log1p(k))


@dataclass
class Schedule:
    """A scalar that follows a schedule over optimizer steps."""

    kind: str = "constant"
    """constant | linear | cosine | delta (Distil-xLSTM Δ-distillation)."""
    start: float = 1.0
    """Value at step 0 (v_init for delta)."""
    end: float | None = None
    """Value at ``total_steps`` (v_final for delta); None: same as start."""
    total_steps: int | None = None
    """Length of linear/cosine; None: the run's total number of optimizer steps."""
    delta: float = 0.05
    """delta: how far v_init moves towards ``end`` after each epoch."""
    steps_per_epoch: int | None = None
    """delta: optimizer steps in one epoch; None: taken from the trainer (refused when it cannot know,
    e.g. streaming data). The schedule reads the global step, so epochs count across resumes."""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Schedule.kind={self.kind!r} is not supported; allowed values: {', '.join(KINDS)}")
        if self.delta < 0:
            raise ValueError(f"Schedule.delta={self.delta} is invalid; allowed values: >= 0")

    def __call__(self, step: int, total_steps: int | None = None, steps_per_epoch: int | None = None) -> float:
        end = self.start if self.end is None else self.end
        if self.kind == "constant":
            return self.start
        if self.kind == "delta":
            per_epoch = self.steps_per_epoch or steps_per_epoch
            if not per_epoch:
                # a silent one-step "epoch" would anneal within a few steps: refuse instead
                raise ValueError(f"Schedule(kind='delta', start={self.start}, end={end}) moves once per epoch, but the "
                                 "epoch length is unknown here (streaming data, or no trainer): give the schedule "
                                 "steps_per_epoch (e.g. {kind: delta, ..., steps_per_epoch: 500}) or use kind "
                                 "linear / cosine")
            return delta_distillation(self.start, end, step, per_epoch, self.delta)
        total = self.total_steps or total_steps
        if not total:
            raise ValueError(f"Schedule(kind={self.kind!r}) needs total_steps (set it, or give the trainer max_steps)")
        return (linear if self.kind == "linear" else cosine)(self.start, end, step, total)
