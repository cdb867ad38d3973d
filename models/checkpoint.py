"""Saving and loading students: a folder with model.safetensors, config.json and the tokenizer.

The folder reloads without the teacher and without ``trust_remote_code``: config.json holds the
teacher's model config (to rebuild the skeleton with ``transformers``), the student family
(``hybrid`` or ``distil_xlstm``; folders without one are hybrid) and that family's config.
Writes are atomic: everything goes to a temporary sibling folder that is renamed into place, with a
manifest (each file's size and SHA-256) written last; readers check config.json against it before
reading a field and every file before loading weights (format version 2: the manifest is required;
version 1 folders predate it and load unverified).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_model

from .config import HybridConfig
from .storage import (
    MANIFEST_NAME, atomic_directory_write, json_text, previous_versions, read_manifest, recover_directory,
    verify_directory,
)

FORMAT = "xdistill-hybrid-student"
FORMAT_VERSION = 2  # 2: the folder carries a manifest (models.storage.MANIFEST_NAME); 1: before manifests
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
# student family -> the config.json field holding its configuration
FAMILY_SECTIONS = {"hybrid": "hybrid_config", "distil_xlstm": "distil_xlstm_config"}
STUDENT_FAMILIES = tuple(FAMILY_SECTIONS)


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
            FAMILY_SECTIONS[student.family]: _saved_family_config(student.family_config),
            "teacher_config": student.config.to_dict(),
        }
        if getattr(student, "teacher_fingerprint", None):
            config["teacher_fingerprint"] = student.teacher_fingerprint
        (tmp / CONFIG_NAME).write_text(json_text(config))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))

    return atomic_directory_write(Path(path), write)


def read_config_json(path) -> dict:
    """A saved student's config.json, checked field by field (a missing, foreign or corrupt folder is
    named with the fix); ``read_student_settings`` gives it typed."""
    path = Path(path)
    recover_directory(path)
    cfg_file = path / CONFIG_NAME
    if not path.is_dir():
        leftovers = previous_versions(path)
        found = (f"; {', '.join(p.name for p in leftovers)} beside it "
                 f"{'is a previous version' if len(leftovers) == 1 else 'are previous versions'} whose replacement "
                 "was killed and which did not verify against its manifest (half-deleted): rerun the stage that "
                 "writes it") if leftovers else ""
        raise FileNotFoundError(f"student folder {path} does not exist (expected a folder written by "
                                f"models.save_student){found}")
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file} is missing: {path} is not a student folder written by models.save_student")
    manifest = read_manifest(path)
    if manifest is not None:  # an edited config.json would build another model from the same weights
        verify_directory(path, _CHANGED_ADVICE, only={CONFIG_NAME})
    try:
        config = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{cfg_file} is not valid JSON ({err}); the folder is corrupt, save the student again") from err
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise ValueError(
            f"{cfg_file}: field 'format' is {config.get('format') if isinstance(config, dict) else None!r}, "
            f"expected {FORMAT!r} (is this a plain Hugging Face model? load it with models.load_teacher)"
        )
    version = config.get("format_version", 1)
    if type(version) is not int or not 1 <= version <= FORMAT_VERSION:
        raise ValueError(f"{cfg_file}: field 'format_version' is {version!r}; this xdistill reads versions "
                         f"1..{FORMAT_VERSION} (a newer xdistill wrote the folder: upgrade xdistill; otherwise the "
                         "file was edited: save the student again)")
    if version >= 2 and manifest is None:
        raise ValueError(f"{path / MANIFEST_NAME} is missing: {path} (format_version {version}) cannot be verified, "
                         f"files were removed or the folder was copied in part. {_CHANGED_ADVICE}")
    family = config.get("family", "hybrid")
    if family not in FAMILY_SECTIONS:
        raise ValueError(f"{cfg_file}: field 'family' is {family!r}; allowed values: {', '.join(FAMILY_SECTIONS)}")
    for key in ("teacher_config", FAMILY_SECTIONS[family]):
        if not isinstance(config.get(key), dict):
            raise ValueError(f"{cfg_file}: field {key!r} is missing or not an object")
    if "model_type" not in config["teacher_config"]:
        raise ValueError(f"{cfg_file}: field 'teacher_config.model_type' is missing")
    return config


_CHANGED_ADVICE = ("The folder was changed after models.save_student wrote it: copy it again from where it came "
                   "from, or rerun the stage (or merge) that writes it")


def _saved_family_config(family_config) -> dict:
    """The family configuration as a student folder keeps it. ``backend: compiled`` is the training
    run's choice, not the student's: it compiles a graph per input shape, which pays at a fixed
    training length and costs a compile per request length in evaluation and serving, so the folder
    records ``auto`` (a run that wants the compiled op again sets it on its own configuration)."""
    section = family_config.to_dict()
    if section.get("backend") == "compiled":
        section["backend"] = "auto"
    return section


def verify_student_folder(path) -> dict | None:
    """Check every file of a saved student against its manifest (config.json, weights, tokenizer),
    naming the first that differs; returns the manifest (None for a version-1 folder, which has none).
    Reads every byte once: about 0.8 s per GB on one core."""
    path = Path(path)
    config = read_config_json(path)
    return verify_directory(path, _CHANGED_ADVICE, required=config.get("format_version", 1) >= 2)


@dataclass(frozen=True)
class StudentSettings:
    """What a saved student folder says about the student: its family, that family's configuration
    (a ``HybridConfig`` or ``DistilXLSTMConfig``, fields older folders predate filled as
    ``load_student`` fills them), the teacher's model config, the saved dtype and teacher fingerprint."""

    family: str
    family_config: Any
    teacher_config: dict
    dtype: str
    teacher_fingerprint: str | None
    config: dict  # config.json as saved


def read_student_settings(path) -> StudentSettings:
    """The one reader of a saved student's settings: every entry point (loading, merging, stage
    checks, reports) asks this rather than parsing config.json itself."""
    path = Path(path)
    config = read_config_json(path)
    family = config.get("family", "hybrid")
    section, source = config[FAMILY_SECTIONS[family]], str(path / CONFIG_NAME)
    if family == "distil_xlstm":
        from .distil_xlstm import DistilXLSTMConfig

        family_config = DistilXLSTMConfig.from_dict(section, source=source)
    else:
        family_config = HybridConfig.from_saved(section, source=source)
    return StudentSettings(family=family, family_config=family_config, teacher_config=dict(config["teacher_config"]),
                           dtype=config.get("dtype", "float32"), teacher_fingerprint=config.get("teacher_fingerprint"),
                           config=config)


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
    settings = read_student_settings(path)
    cfg_file = path / CONFIG_NAME
    teacher_cfg = dict(settings.teacher_config)
    model_type = teacher_cfg.pop("model_type")
    try:
        hf_config = AutoConfig.for_model(model_type, **teacher_cfg)
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{cfg_file}: field 'teacher_config' cannot be read by transformers: {err}") from err
    get_adapter(hf_config)
    saved_dtype = getattr(torch, settings.dtype, None)
    if not isinstance(saved_dtype, torch.dtype):
        raise ValueError(f"{cfg_file}: field 'dtype'={settings.dtype!r} is not a torch dtype")
    if settings.family == "distil_xlstm":
        from .distil_xlstm import DistilXLSTMStudent as student_class
    else:
        student_class = HybridStudent
    family_cfg, config = settings.family_config, settings.config
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
    verify_student_folder(path)
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
