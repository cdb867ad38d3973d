"""Crash-safe files: atomic file and folder writes, one JSON format, the cache root, a write probe.

A leaf: the standard library only, no project imports, so data, stages, callbacks and entry points
all write through the same code without importing each other. Every artifact a run leaves behind
goes through here: a crash at any moment leaves the old complete file (or folder) or the new one,
never half of one.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

_RENAME_EXCHANGE = 2  # linux/fs.h


def cache_dir() -> Path:
    """Where xdistill keeps derived artifacts (teachers, corpora, tokenised data, top-k targets,
    teacher scores): $XDISTILL_CACHE, else ~/.cache/xdistill."""
    return Path(os.environ.get("XDISTILL_CACHE", Path.home() / ".cache" / "xdistill"))


def fsync_tree(root: Path) -> None:
    """Flush every file under ``root`` (or ``root`` itself, a file) to disk, so a rename that
    survives a power cut never points at data that did not."""
    root = Path(root)
    for file in [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()):
        with open(file, "rb") as f:
            os.fsync(f.fileno())


def exchange_paths(a: Path, b: Path) -> bool:
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


def atomic_directory_write(path, write) -> Path:
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
        fsync_tree(tmp)
        if not path.exists():
            os.replace(tmp, path)
        elif exchange_paths(tmp, path):
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
        fsync_tree(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def json_text(payload) -> str:
    """The one JSON format of xdistill's artifacts: indented, keys sorted (files diff cleanly and the
    same content is the same bytes), anything else (paths, dtypes) as its string, newline-terminated."""
    return json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n"


def write_json(path, payload) -> Path:
    """Write ``payload`` to ``path`` atomically in the format of ``json_text``."""
    text = json_text(payload)
    return atomic_file_write(path, lambda tmp: Path(tmp).write_text(text))


def write_text(path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    return atomic_file_write(path, lambda tmp: Path(tmp).write_text(text))


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
