"""A sweep's points: expanding ``points`` and ``grid`` into named override sets, resolving each into a
full pipeline configuration, and running them as child processes (at most ``parallel`` at once, on
the devices given, each recorded in ``point.json`` with the end of its log when it fails)."""

from __future__ import annotations

import copy
import itertools
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


from experiments.runner import PROJECT, die_with_parent, provenance
from models.storage import write_json

# run-time knobs: they change how fast a point runs, not what it computes, so changing them does not
# make a finished point stale
RUNTIME_KEYS = ("reuse", "threads")


@dataclass
class SweepPoint:
    name: str
    overrides: dict[str, Any]
    """The point's own overrides (``common`` excluded), dotted keys."""
    folder: Path
    config: dict[str, Any] = field(default_factory=dict)
    """The resolved pipeline configuration the point runs with."""

    @property
    def record(self) -> dict | None:
        path = self.folder / "point.json"
        return json.loads(path.read_text()) if path.is_file() else None

    @property
    def finished(self) -> bool:
        record = self.record
        return bool(record and record["status"] == "done" and (self.folder / "summary.json").is_file())


# ---- overrides ----------------------------------------------------------------------------------

def _deep_merge(into: dict, value: dict) -> dict:
    for key, v in value.items():
        if isinstance(v, dict) and isinstance(into.get(key), dict):
            _deep_merge(into[key], v)
        else:
            into[key] = copy.deepcopy(v)
    return into


def _descend(config: dict, key: str) -> tuple[dict, str]:
    """The dict a dotted key lands in and its key there: the parts of ``a.b.c`` are followed while
    they name existing dicts, and the rest of the path, once a part is not there, is one key (so
    ``kd.overrides.model.init_args.top_k`` is the ``model.init_args.top_k`` entry of ``kd.overrides``)."""
    parts = key.split(".")
    node, i = config, 0
    while i < len(parts) - 1 and isinstance(node.get(parts[i]), dict):
        node, i = node[parts[i]], i + 1
    return node, ".".join(parts[i:])


def set_dotted(config: dict, key: str, value) -> None:
    """``config[a][b][c] = value`` for key ``a.b.c`` (see ``_descend``); a dict merges into a dict."""
    node, last = _descend(config, key)
    if isinstance(value, dict) and isinstance(node.get(last), dict):
        _deep_merge(node[last], value)
    else:
        node[last] = copy.deepcopy(value)


def get_dotted(config: dict, key: str, default=None):
    """The value ``set_dotted(config, key, ...)`` would replace (``default`` when absent)."""
    node, last = _descend(config, key)
    return node.get(last, default)


def value_name(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"), sort_keys=True)
    return str(value)


def _short_keys(keys: list[str]) -> dict[str, str]:
    """The shortest dotted suffix of each key that no other key shares (``kd.lr`` vs ``align.lr``)."""
    short = {}
    for key in keys:
        parts = key.split(".")
        for n in range(1, len(parts) + 1):
            suffix = ".".join(parts[-n:])
            if not any(other != key and other.split(".")[-n:] == parts[-n:] for other in keys):
                break
        short[key] = suffix
    return short


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=,+-]+", "-", name).strip("-") or "point"


def expand_points(points: list[dict] | None, grid: dict[str, list] | None) -> list[tuple[str, dict]]:
    """(name, overrides) for every point: ``points`` crossed with ``grid``, names from each point's
    ``name`` or from its values."""
    for key, values in (grid or {}).items():
        if not isinstance(values, list) or not values:
            raise ValueError(f"grid.{key} must be a non-empty list of values, got {values!r}")
    listed = [dict(p) for p in points] if points else [{}]
    for p in listed:
        if not isinstance(p, dict):
            raise ValueError(f"every entry of points must be a dict of overrides (with an optional name), got {p!r}")
    keys = sorted({k for p in listed for k in p if k != "name"} | set(grid or {}))
    short = _short_keys(keys)
    combos = [dict(zip(grid, values)) for values in itertools.product(*grid.values())] if grid else [{}]
    expanded = []
    for p in listed:
        own = {k: v for k, v in p.items() if k != "name"}
        for combo in combos:
            overrides = {**own, **combo}
            parts = ([str(p["name"])] if "name" in p else [f"{short[k]}={value_name(v)}" for k, v in own.items()])
            parts += [f"{short[k]}={value_name(v)}" for k, v in combo.items()]
            expanded.append((_safe(",".join(parts) or "base"), overrides))
    names = [n for n, _ in expanded]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"sweep points {twice} have the same name: give the points distinct 'name' entries")
    return expanded


# ---- resolving and running ------------------------------------------------------------------------

def _existing_path(path: str) -> Path:
    """A config path as given (from the working folder), else relative to the project."""
    p = Path(path)
    if p.is_file() or p.is_absolute():
        return p
    return PROJECT / p


def base_config(parser, base: str) -> dict:
    """The base pipeline YAML with every default filled in, as plain data (``parser``: the pipeline's)."""
    path = _existing_path(base)
    if not path.is_file():
        raise FileNotFoundError(f"base={base!r}: no such pipeline YAML (see configs/experiments/)")
    plain = parser.parse_args(["--config", str(path)]).as_dict()
    plain.pop("config", None)
    return json.loads(json.dumps(plain, default=str))


def resolve_point(parser, base: dict, common: dict, point: SweepPoint, threads: int | None, reuse: list[Path]) -> dict:
    """The point's full pipeline configuration, checked by the pipeline's own ``parser``."""
    config = copy.deepcopy(base)
    for key, value in [*common.items(), *point.overrides.items()]:
        set_dotted(config, key, value)
    config["out"] = str(point.folder)
    config["reuse"] = [str(r) for r in reuse]
    if threads:
        config["threads"] = threads
    try:
        parser.parse_object(config)
    except Exception as error:  # jsonargparse's message names the key and what it accepts
        raise ValueError(f"sweep point {point.name!r} (overrides {point.overrides}) is not a valid pipeline "
                         f"configuration: {error}") from None
    return config


def comparable_config(config: dict) -> dict:
    return {k: v for k, v in config.items() if k not in RUNTIME_KEYS}


def _log_tail(path: Path, lines: int = 60) -> str:
    if not path.is_file():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


EXCEPTION_LINE = re.compile(r"^([\w.]*(Error|Exception|Interrupt)|[\w.]*Exit)\b.*")


def _error_text(tail: str) -> str:
    """What a failed run's log says went wrong: its last exception, message lines included (the
    traceback above it stays in the log)."""
    lines = tail.splitlines()
    for i in range(len(lines) - 1, -1, -1):
        if EXCEPTION_LINE.match(lines[i]):
            return "\n".join(line[:300] for line in lines[i:i + 12]).strip()
    return lines[-1].strip() if lines else "no output (see the log)"


class PointProcess:
    """One point's pipeline as a child process, its output in the point's log.txt."""

    def __init__(self, point: SweepPoint, devices: str | None = None):
        self.point, self.devices = point, devices
        config_path = point.folder / "config.yaml"
        self.log = (point.folder / "log.txt").open("a")
        self.log.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} python -m experiments.pipeline --config {config_path}\n")
        self.log.flush()
        self.started = time.perf_counter()
        # the user's working folder, as if they had typed the command (relative data paths keep working)
        env = {**os.environ, "PYTHONUNBUFFERED": "1",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(PROJECT), os.environ.get("PYTHONPATH")]))}
        if devices is not None:  # this point's GPUs only
            env["CUDA_VISIBLE_DEVICES"] = devices
        self.proc = subprocess.Popen([sys.executable, "-m", "experiments.pipeline", "--config", str(config_path)],
                                     cwd=Path.cwd(), stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                     preexec_fn=die_with_parent)

    def finish(self) -> dict:
        self.log.close()
        seconds = time.perf_counter() - self.started
        rc = self.proc.returncode
        point = self.point
        if rc == 0 and (point.folder / "summary.json").is_file():
            record = {"status": "done", "seconds": seconds, "overrides": point.overrides, "config": point.config}
        else:
            tail = _log_tail(point.folder / "log.txt")
            record = {"status": "failed", "returncode": rc, "seconds": seconds, "error": _error_text(tail),
                      "log_tail": tail, "overrides": point.overrides, "config": point.config}
        record["provenance"] = provenance()  # the code this point ran with (sweep.json: the latest invocation)
        write_json(point.folder / "point.json", record)
        return record


def available_memory_gb() -> float:
    import psutil

    return psutil.virtual_memory().available / 2**30


def run_points(points: list[SweepPoint], parallel: int, devices: list[str] | None = None,
               min_free_memory_gb: float = 0.0) -> dict[str, dict]:
    """Runs the points, at most ``parallel`` at once (and at most one per entry of ``devices``, each
    point seeing only its entry's GPUs), starting another only while ``min_free_memory_gb`` of RAM is
    available; returns each point's record."""
    pending, running, records = list(points), [], {}
    free = list(devices) if devices else [None] * parallel
    free = free[:parallel]
    total, waiting = len(points), False
    try:
        while pending or running:
            while pending and free:
                if running and available_memory_gb() < min_free_memory_gb:
                    if not waiting:
                        print(f"[sweep] less than {min_free_memory_gb:g} GB of memory available: the next point "
                              f"waits for a running one to finish", flush=True)
                    waiting = True
                    break
                waiting = False
                point = pending.pop(0)
                running.append(PointProcess(point, free.pop(0)))
                where = f", CUDA_VISIBLE_DEVICES={running[-1].devices}" if devices else ""
                print(f"[sweep] {point.name}: started ({len(records) + len(running)}/{total}{where}), "
                      f"log {point.folder / 'log.txt'}", flush=True)
            time.sleep(0.5)
            for job in [j for j in running if j.proc.poll() is not None]:
                running.remove(job)
                free.append(job.devices)
                record = records[job.point.name] = job.finish()
                if record["status"] == "done":
                    print(f"[sweep] {job.point.name}: done in {record['seconds']:.0f} s", flush=True)
                else:
                    print(f"[sweep] {job.point.name}: FAILED (exit {record['returncode']}), log "
                          f"{job.point.folder / 'log.txt'}:\n{record['error']}", flush=True)
    finally:
        for job in running:  # interrupted: stop the children too; their finished stages remain
            job.proc.terminate()
            job.proc.wait()
            job.log.close()
    return records

