"""Guards around training I/O: checkpoints written atomically in their own folder and read only
with ``weights_only=True``, and output folders checked (writable, enough free space) before the
first training step, so a wrong path or a full disk costs seconds, not a run."""

from __future__ import annotations

import errno
import shutil
import zipfile
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from models.storage import atomic_file_write, unwritable_reason

from .student_export import StudentExportCallback

def check_checkpoint_file(path) -> Path:
    """Refuse a missing, truncated or foreign checkpoint by name before anything loads it (a torch
    checkpoint is a zip archive whose directory sits at its end, so a truncated one has none)."""
    path = Path(path)
    if path.is_dir():
        return path  # a distributed (FSDP) checkpoint folder: its own loader checks it
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; check --ckpt_path (or pass --ckpt_path last to "
                                "resume from the newest checkpoint of this run, or start from scratch)")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"checkpoint {path} is truncated or not a torch checkpoint ({path.stat().st_size} bytes, no "
                         "zip directory at its end); resume from an earlier checkpoint in "
                         f"{path.parent} or start over without --ckpt_path")
    return path


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint I/O with two guarantees of its own:

    - **save**: written to a temporary file in the checkpoint's own folder, flushed, then renamed.
      (Lightning's default writes through fsspec's temporary file in ``/tmp`` and *moves* it, which
      across file systems is a copy: a kill or a full disk during that copy leaves a truncated
      checkpoint under the real name.) A failed write leaves the previous checkpoint untouched and
      says so.
    - **load**: always ``weights_only=True``; an unreadable file is refused by name.
    """

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        if "://" in str(path):  # object stores have their own atomic uploads
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options for local paths")
        try:
            atomic_file_write(path, lambda tmp: torch.save(checkpoint, tmp))
        except (OSError, RuntimeError) as err:  # torch.save reports a failed write as RuntimeError
            kept = sorted(p.name for p in Path(path).parent.glob("*.ckpt"))
            cause = err.strerror if isinstance(err, OSError) and err.strerror else f"{type(err).__name__}: {err}"
            free = shutil.disk_usage(_existing(Path(path).parent)).free
            raise OSError(getattr(err, "errno", None) or errno.EIO,
                          f"could not write checkpoint {path} ({cause}; {_size(free)} free there, or a file-size "
                          f"limit). Nothing was "
                          f"half-written; the checkpoints already in {Path(path).parent} are intact "
                          f"({', '.join(kept) or 'none yet'}). Free space (or choose another --checkpoint.dirpath) "
                          "and rerun the same command with --ckpt_path last to resume") from err

    def load_checkpoint(self, path, map_location=None, weights_only=None):
        if "://" not in str(path):
            check_checkpoint_file(path)
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=True)
        except Exception as err:  # torch reports corruption as RuntimeError, EOFError or UnpicklingError
            raise ValueError(f"checkpoint {path} cannot be read with weights_only=True ({type(err).__name__}: {err}); "
                             "it is corrupt, or was not written by xdistill") from err


def _folders(trainer) -> dict[str, Path]:
    """Folders this fit will write, keyed by the setting that chooses them."""
    folders = {}
    for cb in trainer.callbacks:
        if isinstance(cb, ModelCheckpoint):
            folders["checkpoint.dirpath"] = Path(cb.dirpath) if cb.dirpath else Path(
                trainer.log_dir or trainer.default_root_dir) / "checkpoints"
        elif isinstance(cb, StudentExportCallback):
            folders["student_export.dirpath"] = cb.target(trainer).parent
    if trainer.logger is not None and getattr(trainer.logger, "log_dir", None):
        folders["trainer.logger.init_args.save_dir"] = Path(trainer.logger.log_dir)
    return folders


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of the module's weights (tied tensors once)."""
    return sum(p.numel() * p.element_size() for p in module.parameters())


def checkpoint_bytes(module: torch.nn.Module) -> int:
    """Bytes of one training checkpoint: every weight plus AdamW's two fp32 moments per trainable one."""
    return weight_bytes(module) + sum(2 * p.numel() * 4 for p in module.parameters() if p.requires_grad)


class OutputCheck(L.Callback):
    """Before the first step: every output folder is writable, and its disk has room for the
    checkpoints and the saved student this fit will keep (``margin`` times the estimate)."""

    def __init__(self, margin: float = 1.2):
        """
        Args:
            margin: required free space as a multiple of the estimate (checkpoint sizes vary a little).
        """
        self.margin = margin

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit" or not trainer.is_global_zero:
            return
        for key, folder in _folders(trainer).items():
            reason = unwritable_reason(folder)
            if reason:
                raise OSError(errno.EACCES, f"cannot write to {folder} ({key}): {reason}. Nothing has been trained "
                              f"yet; choose a writable folder with --{key}")

    def on_fit_start(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero or getattr(pl_module, "student", None) is None:
            return
        per_checkpoint = checkpoint_bytes(pl_module.student)
        need: dict[Path, float] = {}
        folders = _folders(trainer)
        for cb in trainer.callbacks:
            if isinstance(cb, ModelCheckpoint):
                # top-k (all of them: counted as 3) and last, plus one being written beside them
                kept = (3 if cb.save_top_k == -1 else max(cb.save_top_k, 0)) + int(bool(cb.save_last))
                if kept:
                    folder = folders["checkpoint.dirpath"]
                    need[folder] = need.get(folder, 0) + per_checkpoint * (kept + 1)
            elif isinstance(cb, StudentExportCallback):
                folder = folders["student_export.dirpath"]
                need[folder] = need.get(folder, 0) + 2 * weight_bytes(pl_module.student)  # new beside old
        for folder, nbytes in need.items():
            free = shutil.disk_usage(_existing(folder)).free
            if free < self.margin * nbytes:
                raise OSError(errno.ENOSPC, f"not enough free space in {folder}: this fit keeps about "
                              f"{_size(nbytes)} there (checkpoints of {_size(per_checkpoint)} each and the saved "
                              f"student) but only {_size(free)} are free. Nothing has been "
                              "trained yet; free space, choose another folder, or keep fewer checkpoints "
                              "(--checkpoint.save_top_k 0)")


def _size(nbytes: float) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"


def _existing(folder: Path) -> Path:
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder
