"""What every long job here runs on: named stages that skip when done and refuse changed settings,
child processes that die with their parent, command lines built from a function's signature, and
the provenance stamped on every published number."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from jsonargparse import ActionConfigFile, ArgumentParser

from models.storage import write_json

PROJECT = Path(__file__).resolve().parents[1]


def plain_json(value):
    return json.loads(json.dumps(value, default=str, sort_keys=True))


def link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)  # finished stages are never written again, so sharing their files is safe
    except OSError:
        shutil.copy2(src, dst)


def moved_paths(value, old: Path, new: Path):
    """``value`` with every string that is a path inside the folder ``old`` (absolute) pointing to the same
    place inside ``new``."""
    if isinstance(value, dict):
        return {k: moved_paths(v, old, new) for k, v in value.items()}
    if isinstance(value, list):
        return [moved_paths(v, old, new) for v in value]
    if isinstance(value, str) and os.sep in value:
        try:
            return str(new / Path(value).resolve().relative_to(old))
        except (ValueError, OSError):
            pass
    return value


class StageRunner:
    """Runs named stages in order inside ``out``; each records ``<out>/<stage>/stage.json`` when done.

    ``reuse``: other run folders; a stage finished there with the same settings is copied (files
    hard-linked where possible, paths in its result moved to ``out``) instead of being run again, so
    sweep points that differ only in late stages share their early ones.
    """

    def __init__(self, out: Path, total: int, reuse: list[Path] | None = None):
        self.out, self.total, self.index = Path(out), total, 0
        self.reuse = [Path(r).resolve() for r in reuse or [] if Path(r).resolve() != self.out.resolve()]
        self.timings: dict[str, float] = {}

    def _copy_finished(self, name: str, settings: dict) -> dict | None:
        for other in self.reuse:
            marker = other / name / "stage.json"
            if not marker.is_file():
                continue
            record = json.loads(marker.read_text())
            if record["settings"] != settings:
                continue
            folder = self.out / name
            shutil.rmtree(folder, ignore_errors=True)  # a half-done attempt here is superseded
            shutil.copytree(other / name, folder, copy_function=link_or_copy,
                            ignore=shutil.ignore_patterns("stage.json", "checkpoints"))
            logs = other / "tensorboard" / name
            if logs.is_dir() and not (self.out / "tensorboard" / name).exists():
                shutil.copytree(logs, self.out / "tensorboard" / name, copy_function=link_or_copy)
            record["result"] = moved_paths(record["result"], other, self.out)
            record["reused_from"] = str(other / name)
            write_json(folder / "stage.json", record)
            return record
        return None

    def __call__(self, name: str, settings: dict, fn):
        self.index += 1
        folder = self.out / name
        marker = folder / "stage.json"
        settings = plain_json(settings)
        if marker.is_file():
            record = json.loads(marker.read_text())
            if record["settings"] != settings:
                changed = sorted(k for k in set(settings) | set(record["settings"])
                                 if settings.get(k) != record["settings"].get(k))
                raise ValueError(f"stage {name!r} in {self.out} was finished with other settings (changed: "
                                 f"{', '.join(changed)}); use another --out, or delete {folder} to redo it")
            print(f"[{self.index}/{self.total}] {name}: finished earlier ({record['seconds']:.0f} s), skipped", flush=True)
            self.timings[name] = record["seconds"]
            return record["result"]
        record = self._copy_finished(name, settings)
        if record is not None:
            print(f"[{self.index}/{self.total}] {name}: same settings finished in {record['reused_from']}, copied",
                  flush=True)
            self.timings[name] = record["seconds"]
            return record["result"]
        print(f"[{self.index}/{self.total}] {name} ...", flush=True)
        folder.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        result = plain_json(fn(folder))
        seconds = time.perf_counter() - started
        write_json(marker, {"settings": settings, "result": result, "seconds": seconds})
        self.timings[name] = seconds
        print(f"[{self.index}/{self.total}] {name}: done in {seconds:.0f} s", flush=True)
        return result


def die_with_parent() -> None:
    """``preexec_fn`` of child processes: Linux sends the child SIGTERM when its parent dies, even by
    SIGKILL (a preempted job), so no orphan keeps writing into a run that a restart resumes."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except (AttributeError, OSError):
        pass  # not Linux: the job's scheduler kills the process group instead


def function_parser(fn, description: str, config_help: str, **kwargs) -> ArgumentParser:
    """A command line for ``fn``'s arguments, with ``--config`` YAML files (omegaconf interpolation);
    the pipeline's and the sweep's."""
    parser = ArgumentParser(description=description, parser_mode="omegaconf", **kwargs)
    parser.add_argument("--config", action=ActionConfigFile, help=config_help)
    parser.add_function_arguments(fn)
    return parser


def function_arguments(parser: ArgumentParser, args: list[str] | None) -> tuple[dict, Any]:
    """``fn``'s keyword arguments parsed from ``args`` (objects instantiated), and the parsed namespace."""
    cfg = parser.parse_args(args)
    return {k: v for k, v in parser.instantiate(cfg).items() if k != "config"}, cfg


def provenance() -> dict:
    """What produced the numbers: code version, interpreter, machine."""
    import platform

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=PROJECT,
                                    capture_output=True, text=True, timeout=10).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    return {"git_commit": commit, "git_dirty": dirty, "python": platform.python_version(),
            "machine": platform.machine(), "cores": os.cpu_count(), "time": time.strftime("%Y-%m-%d %H:%M:%S")}
