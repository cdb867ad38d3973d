"""One LightningModule per stage; losses and schedules as plain, tested functions."""

from .alignment import AlignmentModule
from .base import DistillationModule, NonFiniteLossError
from .kd import ExpertFinetuneModule, SparseKDModule
from .schedules import Schedule

__all__ = ["AlignmentModule", "DistillationModule", "ExpertFinetuneModule", "NonFiniteLossError", "Schedule", "SparseKDModule"]
