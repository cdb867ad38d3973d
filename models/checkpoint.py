"""Saving and loading students: a folder with model.safetensors, config.json and the tokenizer.

The folder reloads without the teacher and without ``trust_remote_code``: config.json holds the
teacher's model config (to rebuild the skeleton with ``transformers``), the student family
(``hybrid`` or ``distil_xlstm``; folders without one are hybrid) and that family's config.
Writes are atomic: everything goes to a temporary sibling folder that is renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_model

from .config import HybridConfig

FORMAT = "xdistill-hybrid-student"
FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
# student family -> the config.json field holding its configuration
FAMILY_SECTIONS = {"hybrid": "hybrid_config", "distil_xlstm": "distil_xlstm_config"}


def family_section(config: dict) -> str:
    """The config.json field that holds a saved student's family configuration."""
    return FAMILY_SECTIONS[config.get("family", "hybrid")]


def _fsync_tree(root: Path) -> None:
    """Flush every file under ``root`` to disk, so a rename that survives a power cut never points
    at data that did not."""
    for file in [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()):
        with open(file, "rb") as f:
            os.fsync(f.fileno())


_RENAME_EXCHANGE = 2  # linux/fs.h


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where the C
    library or the file system cannot (then the caller falls back to two renames)."""
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd = -100
    done = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    return done == 0


def recover_directory(path) -> Path:
    """Finish a directory replacement that was interrupted between its two renames (only possible
    where the atomic exchange is unavailable): if ``path`` is missing, the previous complete folder
    (``.<name>.old-*``) is put back. Readers call this before opening ``path``."""
    path = Path(path)
    if not path.exists() and path.parent.is_dir():
        olds = sorted(path.parent.glob(f".{path.name}.old-*"), key=lambda p: p.stat().st_mtime)
        if olds:
            os.replace(olds[-1], path)
    return path


def atomic_directory_write(path: Path, write) -> Path:
    """Call ``write(tmp_dir)`` then move tmp_dir to ``path``; an existing ``path`` is replaced only
    once the new folder is complete and on disk, in one atomic exchange where the system offers it,
    so a crash at any moment leaves the old or the new folder, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_directory(path)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        write(tmp)
        _fsync_tree(tmp)
        if not path.exists():
            os.replace(tmp, path)
        elif _exchange(tmp, path):
            shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old folder
        else:
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(path, old)  # a crash right here is repaired by recover_directory
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def atomic_file_write(path, write) -> Path:
    """Call ``write(tmp_file)``, flush it to disk, then rename it to ``path``: readers (and a crash at
    any moment) see the old complete file or the new complete file, never half of one. The temporary
    name keeps the suffix (formats that infer the type from it, like matplotlib, still work) and is
    removed if ``write`` fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.stem}.tmp-{uuid.uuid4().hex[:8]}{path.suffix}"
    try:
        write(tmp)
        _fsync_tree(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def save_student(student, path, tokenizer=None) -> Path:
    """Write ``student`` (a HybridStudent or DistilXLSTMStudent) to the folder ``path``; the tokenizer
    (argument, or ``student.tokenizer``) is saved beside it when there is one."""
    tokenizer = tokenizer if tokenizer is not None else getattr(student, "tokenizer", None)
    dtype = next(student.parameters()).dtype

    def write(tmp: Path):
        save_model(student, str(tmp / WEIGHTS_NAME), metadata={"format": FORMAT})
        config = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "family": student.family,
            "dtype": str(dtype).replace("torch.", ""),
            FAMILY_SECTIONS[student.family]: student.family_config.to_dict(),
            "teacher_config": student.config.to_dict(),
        }
        if getattr(student, "teacher_fingerprint", None):
            config["teacher_fingerprint"] = student.teacher_fingerprint
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True, default=str))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))

    return atomic_directory_write(Path(path), write)


def _read_config(path: Path) -> dict:
    recover_directory(path)
    cfg_file = path / CONFIG_NAME
    if not path.is_dir():
        raise FileNotFoundError(f"student folder {path} does not exist (expected a folder written by models.save_student)")
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file} is missing: {path} is not a student folder written by models.save_student")
    try:
        config = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{cfg_file} is not valid JSON ({err}); the folder is corrupt, save the student again") from err
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ValueError(
            f"{cfg_file}: field 'format' is {config.get('format') if isinstance(config, dict) else None!r}, "
            f"expected {FORMAT!r} (is this a plain Hugging Face model? load it with models.load_teacher)"
        )
    family = config.get("family", "hybrid")
    if family not in FAMILY_SECTIONS:
        raise ValueError(f"{cfg_file}: field 'family' is {family!r}; allowed values: {', '.join(FAMILY_SECTIONS)}")
    for key in ("teacher_config", FAMILY_SECTIONS[family]):
        if not isinstance(config.get(key), dict):
            raise ValueError(f"{cfg_file}: field {key!r} is missing or not an object")
    if "model_type" not in config["teacher_config"]:
        raise ValueError(f"{cfg_file}: field 'teacher_config.model_type' is missing")
    return config


def _check_shapes(student, weights: Path, cfg_file: Path):
    """Name the first tensor whose saved shape differs from what config.json builds."""
    try:
        with safe_open(str(weights), framework="pt") as f:
            saved = {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"{weights} cannot be read ({err}); the file is truncated or corrupt") from err
    for key, tensor in student.state_dict().items():
        if key in saved and saved[key] != tuple(tensor.shape):
            raise ValueError(
                f"{weights} does not match {cfg_file}: tensor {key!r} has shape {list(saved[key])} in the file "
                f"but the config builds {list(tensor.shape)}; check hidden_size, heads and head_dim in config.json"
            )


def skeleton_from_folder(path) -> tuple:
    """An untrained student built from ``path/config.json`` (checked field by field, carrying the saved
    teacher fingerprint), and that config."""
    from transformers import AutoConfig

    from .adapters import get_adapter
    from .student import HybridStudent

    path = Path(path)
    config = _read_config(path)
    cfg_file = path / CONFIG_NAME
    teacher_cfg = dict(config["teacher_config"])
    model_type = teacher_cfg.pop("model_type")
    try:
        hf_config = AutoConfig.for_model(model_type, **teacher_cfg)
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{cfg_file}: field 'teacher_config' cannot be read by transformers: {err}") from err
    get_adapter(hf_config)
    saved_dtype = getattr(torch, config.get("dtype", "float32"), None)
    if not isinstance(saved_dtype, torch.dtype):
        raise ValueError(f"{cfg_file}: field 'dtype'={config.get('dtype')!r} is not a torch dtype")
    family = config.get("family", "hybrid")
    if family == "distil_xlstm":
        from .distil_xlstm import DistilXLSTMConfig as family_config_class, DistilXLSTMStudent as student_class
    else:
        family_config_class, student_class = HybridConfig, HybridStudent
    read = family_config_class.from_saved if family_config_class is HybridConfig else family_config_class.from_dict
    family_cfg = read(config[FAMILY_SECTIONS[family]], source=str(cfg_file))
    student = student_class.skeleton(hf_config, family_cfg, saved_dtype)
    student.teacher_fingerprint = config.get("teacher_fingerprint")  # None: saved before fingerprints
    return student, config


def load_student(path, dtype: torch.dtype | None = None, device=None):
    """Rebuild a student saved by ``save_student`` (no teacher, no remote code needed)."""
    from transformers import AutoTokenizer

    path = Path(path)
    student, _ = skeleton_from_folder(path)
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} is missing; the student folder is incomplete")
    _check_shapes(student, weights, path / CONFIG_NAME)
    try:
        missing, unexpected = load_model(student, str(weights), strict=False, device="cpu")
    except (SafetensorError, OSError, RuntimeError) as err:
        raise ValueError(f"{weights} cannot be read ({err}); the file is truncated or corrupt") from err
    if missing or unexpected:
        raise ValueError(
            f"{weights} does not match {path / CONFIG_NAME}: missing tensors {sorted(missing)[:5]}, "
            f"unexpected tensors {sorted(unexpected)[:5]}"
        )
    student.eval()
    if dtype is not None or device is not None:
        student.to(device=device, dtype=dtype)
    if (path / "tokenizer_config.json").is_file():
        student.tokenizer = AutoTokenizer.from_pretrained(str(path))
    return student


def unwritable_reason(folder) -> str | None:
    """Why files cannot be written in ``folder`` (created if missing), or None when a probe file can
    be written, flushed and removed there. Run before hours of work depend on the folder."""
    folder = Path(folder)
    probe = folder / f".xdistill-write-probe-{uuid.uuid4().hex[:8]}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"0" * 4096)
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        return f"{err.strerror or err} ({type(err).__name__}, errno {err.errno})"
    finally:
        try:
            probe.unlink()
        except OSError:
            pass
    return None
