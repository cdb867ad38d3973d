"""Crash-safe files: atomic file and folder writes, one JSON format, the cache root, a write probe.

A leaf: the standard library only, no project imports, so data, stages, callbacks and entry points
all write through the same code without importing each other. Every artifact a run leaves behind
goes through here: a crash at any moment leaves the old complete file (or folder) or the new one,
never half of one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import time
import uuid
from pathlib import Path

_RENAME_EXCHANGE = 2  # linux/fs.h
# Written last into every folder artifact: each file's size and SHA-256 (and config.json's hash on
# its own line). A single-file artifact carries the same record in a sidecar "<name>.sha256.json".
MANIFEST_NAME = "xdistill-manifest.json"
MANIFEST_FORMAT = "xdistill-manifest"
SIDECAR_SUFFIX = ".sha256.json"
# Temporary names carry the writer's host and pid, so the next writer can tell a dead writer's
# leftovers (removed) from a live one's (kept).
_TEMP = re.compile(r"\.(?P<name>.+)\.tmp-(?:(?P<host>.+)-(?P<pid>\d+)-)?(?P<tag>[0-9a-f]{8})(?P<suffix>.*)$")
_LEGACY_TEMP_AGE_S = 3600.0  # temporaries named before host/pid were recorded: stale after an hour


class ArtifactMismatch(ValueError):
    """A file of an artifact differs from the manifest written with it (changed or damaged since)."""


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


def file_digest(path) -> dict:
    """{"bytes": size, "sha256": hex digest} of one file, read in a stream (about 0.7 GB/s per core)."""
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    return {"bytes": Path(path).stat().st_size, "sha256": digest}


def _manifest_payload(files: dict) -> dict:
    payload = {"format": MANIFEST_FORMAT, "version": 1, "files": files}
    if "config.json" in files:
        payload["config_sha256"] = files["config.json"]["sha256"]
    return payload


def write_manifest(folder) -> Path:
    """Record every file under ``folder`` (size and SHA-256) in ``folder/MANIFEST_NAME``, written last
    (into a folder not yet in place: ``atomic_directory_write`` renames the whole folder after it)."""
    folder = Path(folder)
    files = {p.relative_to(folder).as_posix(): file_digest(p)
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST_NAME}
    path = folder / MANIFEST_NAME
    path.write_text(json_text(_manifest_payload(files)))
    return path


def read_manifest(folder_or_file) -> dict | None:
    """The manifest of a folder artifact (or the sidecar of a file artifact), None when there is none;
    an unreadable one is refused by name."""
    target = Path(folder_or_file)
    path = target / MANIFEST_NAME if target.is_dir() else sidecar_of(target)
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ArtifactMismatch(f"{path} is not valid JSON ({err}): the artifact's manifest is damaged") from err
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT or not isinstance(
            manifest.get("files"), dict):
        raise ArtifactMismatch(f"{path} is not an xdistill manifest (field 'format' must be {MANIFEST_FORMAT!r} "
                               "with a 'files' object)")
    return manifest


def check_file(path, recorded: dict, manifest_path, advice: str) -> None:
    """Refuse ``path`` unless its size and SHA-256 are those recorded for it, naming what differs."""
    path = Path(path)
    what = f"{path} does not match {manifest_path}"
    if not path.is_file():
        raise ArtifactMismatch(f"{what}: the file is missing. {advice}")
    size = path.stat().st_size
    if size != recorded.get("bytes"):
        raise ArtifactMismatch(f"{what}: it has {size} bytes, the manifest recorded {recorded.get('bytes')} "
                               f"(truncated or rewritten after it was saved). {advice}")
    digest = file_digest(path)["sha256"]
    if digest != recorded.get("sha256"):
        raise ArtifactMismatch(f"{what}: its SHA-256 is {digest[:16]}..., the manifest recorded "
                               f"{str(recorded.get('sha256'))[:16]}... (same size, different bytes: damaged or "
                               f"edited after it was saved). {advice}")


def verify_directory(folder, advice: str, *, required: bool = False, only=None) -> dict | None:
    """Check every file the folder's manifest lists (or those named in ``only``) against it. Returns
    the manifest, or None for a folder without one (refused when ``required``)."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is None:
        if required:
            raise ArtifactMismatch(f"{folder / MANIFEST_NAME} is missing, so {folder} cannot be verified (it was "
                                   f"cut short or edited by hand). {advice}")
        return None
    for name, recorded in manifest["files"].items():
        if only is None or name in only:
            check_file(folder / name, recorded, folder / MANIFEST_NAME, advice)
    return manifest


def directory_verifies(folder) -> bool:
    """True when ``folder`` has a manifest and every file it lists matches it."""
    try:
        return verify_directory(folder, "", required=True) is not None
    except (ArtifactMismatch, OSError):
        return False


def sidecar_of(path) -> Path:
    """Where a single-file artifact's manifest lives: ``<name>.sha256.json`` beside it."""
    path = Path(path)
    return path.with_name(path.name + SIDECAR_SUFFIX)


def verify_file(path, advice: str, *, required: bool = False) -> bool:
    """Check a single-file artifact against its sidecar manifest: True when verified, False when it has
    none (refused when ``required``); a mismatch raises ``ArtifactMismatch`` naming what differs."""
    path = Path(path)
    manifest = read_manifest(path)
    if manifest is None:
        if required:
            raise ArtifactMismatch(f"{sidecar_of(path)} is missing, so {path} cannot be verified. {advice}")
        return False
    recorded = manifest["files"].get(path.name)
    if recorded is None:
        raise ArtifactMismatch(f"{sidecar_of(path)} does not list {path.name}: it belongs to another file. {advice}")
    check_file(path, recorded, sidecar_of(path), advice)
    return True


def _temp_name(name: str, suffix: str = "") -> str:
    return f".{name}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}{suffix}"


def _is_temporary_of(temp: Path, path: Path) -> bool:
    match = _TEMP.match(temp.name)
    return match is not None and ((match["name"], match["suffix"]) in ((path.name, ""), (path.stem, path.suffix)))


def _writer_is_dead(temp: Path) -> bool:
    """A temporary left by a writer that no longer runs: same host and its pid gone, or a name from before
    pids were recorded and older than an hour."""
    match = _TEMP.match(temp.name)
    if match is None:
        return False
    if match["pid"] is None:
        return time.time() - temp.stat().st_mtime > _LEGACY_TEMP_AGE_S
    if match["host"] != socket.gethostname():
        return False  # another machine's writer (a shared file system): its liveness is unknown here
    try:
        os.kill(int(match["pid"]), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, another user's
    return False


def remove_stale_temporaries(path) -> list[Path]:
    """Remove what killed writers of ``path`` left beside it: their temporary files or folders, and (when
    ``path`` is there) previous versions a killed replacement did not finish deleting. Returns them."""
    path = Path(path)
    removed = []
    if not path.parent.is_dir():
        return removed
    candidates = set(path.parent.glob(f".{path.name}.tmp-*")) | set(path.parent.glob(f".{path.stem}.tmp-*{path.suffix}"))
    stale = [p for p in sorted(candidates) if _is_temporary_of(p, path) and _writer_is_dead(p)]
    if path.is_dir():
        stale += list(path.parent.glob(f".{path.name}.old-*"))
    for p in stale:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def previous_versions(path) -> list[Path]:
    """``.<name>.old-*`` folders beside ``path`` (a replacement was interrupted), newest first."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    return sorted(path.parent.glob(f".{path.name}.old-*"), key=lambda p: p.stat().st_mtime, reverse=True)


def recover_directory(path) -> Path:
    """Finish a directory replacement that was interrupted between its two renames (only possible
    where the atomic exchange is unavailable): if ``path`` is missing, the previous complete folder
    (a ``.<name>.old-*`` whose manifest verifies) is put back. Deleting a folder touches it, so the
    newest ``.old-*`` may be one a kill left half-deleted: only a verified one is restored, and none
    when none verifies (the reader then names them). Readers call this before opening ``path``."""
    path = Path(path)
    if not path.exists():
        for old in previous_versions(path):
            if directory_verifies(old):
                os.replace(old, path)
                break
    return path


def atomic_directory_write(path, write) -> Path:
    """Call ``write(tmp_dir)``, record its files in a manifest written last, then move tmp_dir to
    ``path``; an existing ``path`` is replaced only once the new folder is complete and on disk, in
    one atomic exchange where the system offers it, so a crash at any moment leaves the old or the
    new folder, never half of one. Leftovers of killed earlier writers of ``path`` are removed first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_directory(path)
    remove_stale_temporaries(path)
    tmp = path.parent / _temp_name(path.name)
    tmp.mkdir()
    try:
        write(tmp)
        write_manifest(tmp)
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


def atomic_file_write(path, write, *, manifest: bool = False) -> Path:
    """Call ``write(tmp_file)``, flush it to disk, then rename it to ``path``: readers (and a crash at
    any moment) see the old complete file or the new complete file, never half of one. The temporary
    name keeps the suffix (formats that infer the type from it, like matplotlib, still work) and is
    removed if ``write`` fails. ``manifest``: also record the new file's size and SHA-256 in its
    sidecar (``verify_file``); the old sidecar goes before the rename and the new one comes after it,
    so a crash in between leaves a file without a sidecar (unverifiable), never one that contradicts it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    tmp = path.parent / _temp_name(path.stem, path.suffix)
    try:
        write(tmp)
        fsync_tree(tmp)
        digest = file_digest(tmp) if manifest else None
        sidecar_of(path).unlink(missing_ok=True)  # any sidecar describes the old content
        os.replace(tmp, path)
        if manifest:
            write_json(sidecar_of(path), _manifest_payload({path.name: digest}))
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
        return _write_failure(folder, err)
    finally:
        try:
            probe.unlink()
        except OSError:
            pass
    return None


def _write_failure(folder: Path, err: OSError) -> str:
    """Why a write under ``folder`` failed, in words that say what to change."""
    import errno

    blocking = next((p for p in [folder, *folder.parents] if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        return f"{blocking} is a file where a folder is needed (move or rename it, or choose another folder)"
    if err.errno in (errno.EACCES, errno.EPERM):
        existing = next((p for p in [folder, *folder.parents] if p.exists()), folder)
        return (f"permission denied: {existing} is not writable by this user (a read-only folder or one owned by "
                "someone else; fix its permissions or choose another folder)")
    if err.errno == errno.EROFS:
        return f"{folder} is on a read-only file system (choose a folder on a writable disk)"
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left for {folder} (the disk or the user's quota is full; free space or choose another disk)"
    return f"{err.strerror or err} ({type(err).__name__}, errno {err.errno})"
