"""Guards around training I/O: checkpoints written atomically in their own folder and read only
with ``weights_only=True``, and output folders checked (writable, enough free space) before the
first training step, so a wrong path or a full disk costs seconds, not a run."""

from __future__ import annotations

import errno
import pickle
import shutil
import zipfile
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from models.storage import ArtifactMismatch, atomic_file_write, sidecar_of, unwritable_reason, verify_file

from .student_export import StudentExportCallback

_VERIFIED: dict[tuple, bool] = {}  # (path, size, mtime_ns) of checkpoints already checked in this process
LIGHTNING_KEYS = ("pytorch-lightning_version", "state_dict")


def _other_checkpoints(path: Path) -> str:
    kept = sorted(p.name for p in path.parent.glob("*.ckpt") if p != path) if path.parent.is_dir() else []
    where = f"another checkpoint in {path.parent} ({', '.join(kept)})" if kept else "an earlier checkpoint"
    return f"resume from {where}, or start the stage over without --ckpt_path"


def check_checkpoint_file(path, *, again: bool = False) -> Path:
    """Refuse, by name and before any model loads, a checkpoint ``--ckpt_path`` cannot resume: missing,
    empty, truncated (a torch checkpoint is a zip archive whose directory sits at its end), damaged
    (its bytes differ from the manifest saved beside it, or, for one saved without, a zip member's CRC
    fails: torch itself checks neither), holding pickled objects (refused rather than run: it is read
    with ``weights_only=True``), or a torch file that is not a Lightning checkpoint. A file already
    checked by this process and unchanged since (size, modification time) is not read twice unless
    ``again``."""
    path = Path(path)
    if path.is_dir():
        return path  # a distributed (FSDP) checkpoint folder: its own loader checks it
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist; check --ckpt_path (or pass --ckpt_path last to "
                                "resume from the newest checkpoint of this run, or start from scratch)")
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key in _VERIFIED and not again:
        return path
    if stat.st_size == 0:
        raise ValueError(f"checkpoint {path} is empty (0 bytes): a write that never started or a copy that "
                         f"failed; {_other_checkpoints(path)}")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"checkpoint {path} is truncated or not a torch checkpoint ({stat.st_size} bytes, no "
                         f"zip directory at its end); {_other_checkpoints(path)}")
    try:
        advice = _other_checkpoints(path)
        verified = verify_file(path, advice[:1].upper() + advice[1:])
    except ArtifactMismatch as err:
        raise ValueError(f"checkpoint {err}") from None
    with zipfile.ZipFile(path) as archive:
        members = archive.namelist()
        if not any(name.endswith("data.pkl") for name in members):
            raise ValueError(f"checkpoint {path} is a zip archive without a torch payload (no data.pkl among its "
                             f"{len(members)} members): not a checkpoint; {_other_checkpoints(path)}")
        broken = None if verified else archive.testzip()  # CRCs: what a manifest would have caught
    if broken is not None:
        raise ValueError(f"checkpoint {path} is damaged: member {broken!r} fails its CRC check (bytes changed after "
                         f"it was written); {_other_checkpoints(path)}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        first = str(err).splitlines()[-1] if str(err) else type(err).__name__
        raise ValueError(f"checkpoint {path} holds pickled Python objects that a weights-only load refuses "
                         f"({first.strip()[:200]}); xdistill never unpickles code from a checkpoint, and its own "
                         f"checkpoints hold tensors and plain data only, so this file was not written by "
                         f"experiments.run: {_other_checkpoints(path)}") from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise ValueError(f"checkpoint {path} cannot be read ({type(err).__name__}: {str(err)[:200]}); it is "
                         f"truncated or damaged; {_other_checkpoints(path)}") from None
    missing = [k for k in LIGHTNING_KEYS if not isinstance(payload, dict) or k not in payload]
    if missing:
        kind = f"a dict with keys {sorted(payload)[:6]}" if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(f"{path} is a torch file but not a Lightning training checkpoint (it holds {kind}; missing "
                         f"{', '.join(repr(k) for k in missing)}). --ckpt_path resumes a run from the last.ckpt "
                         "experiments.run wrote; to start a stage from a saved student use "
                         "--model.init_args.student_ckpt <student folder>")
    _VERIFIED[key] = True
    return path


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's torch checkpoint I/O with two guarantees of its own:

    - **save**: written to a temporary file in the checkpoint's own folder, flushed, then renamed.
      (Lightning's default writes through fsspec's temporary file in ``/tmp`` and *moves* it, which
      across file systems is a copy: a kill or a full disk during that copy leaves a truncated
      checkpoint under the real name.) A failed write leaves the previous checkpoint untouched and
      says so.
      The file's size and SHA-256 go to a sidecar ``<name>.sha256.json`` (removed with the checkpoint),
      unless ``manifest`` is off (``--checkpoint_manifest false``: multi-GB checkpoints saved often,
      where hashing costs about 1 s per GB; ``docs/results/integrity``): resuming then checks the zip CRCs.
    - **load**: checked first (``check_checkpoint_file``: the sidecar, or the zip CRCs of a checkpoint
      saved without one, the payload, the Lightning keys); always ``weights_only=True``.
    """

    def __init__(self, manifest: bool = True):
        super().__init__()
        self.manifest = manifest

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        if "://" in str(path):  # object stores have their own atomic uploads
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options for local paths")
        try:
            atomic_file_write(path, lambda tmp: torch.save(checkpoint, tmp), manifest=self.manifest)
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

    def remove_checkpoint(self, path) -> None:
        super().remove_checkpoint(path)
        if "://" not in str(path):
            sidecar_of(path).unlink(missing_ok=True)

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
