"""Ablation sweeps: a base pipeline experiment and a grid (or list) of overrides, each point its own run,
aggregated into one table and one figure.

    python -m experiments.sweep --config configs/sweeps/hybrid_ablation.yaml
    python -m experiments.sweep --config configs/sweeps/kd_ablation.yaml --parallel 2     # two points at once
    python -m experiments.sweep --config configs/sweeps/kd_ablation.yaml --only '[k8]'    # some points only
    python -m experiments.sweep --config configs/sweeps/kd_ablation.yaml --dry_run true   # print the points
    python -m experiments.sweep --help

A sweep file names ``base`` (a pipeline YAML, configs/experiments/) and its points: ``points`` (a list
of override dicts, each may carry a ``name``) crossed with ``grid`` (key -> list of values); either may
be left out. ``common`` overrides apply to every point. Keys are the pipeline's own, dotted
(``hybrid.window``, ``kd.steps``, ``merge.method``); the LightningCLI keys of a training stage go
through its ``overrides`` dict, so ``kd.overrides.model.init_args.top_k`` sets the KD stage's
``--model.init_args.top_k``. A dict value is merged into the dict it overrides; anything else replaces.

Every point runs as ``python -m experiments.pipeline --config <out>/points/<name>/config.yaml`` (its
resolved configuration, validated before any point starts), in its own process, with its output in
``log.txt`` beside it. A finished point (``point.json`` says done) is skipped on a re-run and one whose
configuration changed is refused; a failed point is recorded with the end of its log, does not stop
the others, and is resumed (from its finished stages) by the next run. At most ``parallel`` points run
at once, each with ``threads`` CPU threads. Stages that points share (same settings: the corpus, the
alignment of points that differ only in KD, ...) are copied from a point that finished them instead of
being run again.

Outputs in ``out``: ``sweep.md`` and ``sweep.csv`` (point, overrides, held-out CE/KL/top-1, per-task
scores, C_alpha, alpha*, KD tokens/s, decode ms/token), ``win_tie.png``/``win_tie.csv`` (every point's
final student on one figure) and ``tensorboard/`` (an HParams view: ``tensorboard --logdir <out>``).
"""

from __future__ import annotations

import copy
import csv
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from experiments.pipeline import PROJECT, _write_json, die_with_parent, function_arguments, function_parser
from experiments.pipeline import build_parser as pipeline_parser
from models.checkpoint import atomic_file_write

DEFAULT_ALPHAS = (0.0, 0.02, 0.05, 0.1)
CURVE_GRID = [round(0.005 * i, 4) for i in range(101)]
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


def _value_name(value) -> str:
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
            parts = ([str(p["name"])] if "name" in p else [f"{short[k]}={_value_name(v)}" for k, v in own.items()])
            parts += [f"{short[k]}={_value_name(v)}" for k, v in combo.items()]
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


def _comparable(config: dict) -> dict:
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
        _write_json(point.folder / "point.json", record)
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


# ---- aggregation --------------------------------------------------------------------------------

def _fmt(value, digits: int = 3) -> str:
    if value is None or value != value:
        return ""
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _with_interval(row: dict, key: str) -> str:
    """``x [low, high]``, or ``x`` alone when the run has no interval."""
    if row.get(f"{key}_low") is None:
        return _fmt(row.get(key))
    return f"{_fmt(row.get(key))} [{_fmt(row[f'{key}_low'])}, {_fmt(row[f'{key}_high'])}]"


def point_row(point: SweepPoint, alphas: list[float], target: float) -> dict:
    """One point's numbers (only ``status`` and ``error`` for a point without a finished run)."""
    from callbacks.win_tie import critical_tolerance, win_and_tie

    record = point.record
    row = {"point": point.name, "overrides": json.dumps(point.overrides, sort_keys=True),
           "status": record["status"] if record else "not run"}
    if record and record["status"] == "failed":
        row["error"] = record["error"]
    if not point.finished:
        return row
    summary = json.loads((point.folder / "summary.json").read_text())
    final = summary["final"]
    scores, teacher = summary["scores"][final], summary["scores"]["teacher"]
    heldout = summary["heldout"][final]
    row.update({
        "student": final, "heldout_ce": heldout["student_ce"], "kl_teacher_student": heldout["kl_teacher_student"],
        # 90 % bootstrap intervals over the held-out blocks (runs before the per-domain held-out set have none)
        "heldout_ce_low": (heldout.get("student_ce_90") or [None, None])[0],
        "heldout_ce_high": (heldout.get("student_ce_90") or [None, None])[1],
        "ce_minus_converted": heldout.get("ce_minus_baseline"),
        "ce_minus_converted_low": (heldout.get("ce_minus_baseline_90") or [None, None])[0],
        "ce_minus_converted_high": (heldout.get("ce_minus_baseline_90") or [None, None])[1],
        "top1_agreement": heldout["top1_agreement"], "teacher_ce": heldout["teacher_ce"],
        # the same held-out tokens of every domain, each with its interval (older runs: none)
        "domain_ce": {d: {"ce": e["student_ce"], "low": (e.get("student_ce_90") or [None, None])[0],
                          "high": (e.get("student_ce_90") or [None, None])[1]}
                      for d, e in sorted(heldout.get("domains", {}).items())},
        # where training started: the untrained conversion on the same held-out blocks
        "converted_ce": summary["heldout"].get("converted", {}).get("student_ce"),
        "suite_mean": sum(scores.values()) / len(scores),
        **{f"C_{a:g}": c for a, c in zip(alphas, win_and_tie(scores, teacher, alphas))},
        "alpha_star": critical_tolerance(scores, teacher, target),
        "kd_tokens_per_s": summary["kd_metrics"].get("train/tokens_per_s"),
        "decode_ms_per_token": (summary["decode"] or {}).get("student_ms_per_token"),
        # teacher/student time per token, measured side by side in the same process (stabler than ms across points)
        "decode_speedup": (summary["decode"] or {}).get("decode_speedup"),
        "decode_state_mb": ((summary["decode"] or {}).get("student_state_bytes") or float("nan")) / 2**20,
        "teacher_decode": summary["decode"] and {"ms_per_token": summary["decode"]["teacher_ms_per_token"],
                                                 "kv_cache_mb": summary["decode"]["teacher_kv_cache_bytes"] / 2**20,
                                                 "prompt": summary["decode"]["prompt"]},
        "seconds": record["seconds"],
        "per_block": summary["heldout"].get("per_block", {}).get(final),
        "scores": scores, "teacher_scores": teacher,
        "curve": win_and_tie(scores, teacher, CURVE_GRID),
    })
    return row


def _tensorboard(out: Path, points: list[SweepPoint], rows: list[dict], alphas: list[float]) -> None:
    """An HParams view: each finished point's overrides against its metrics."""
    from torch.utils.tensorboard import SummaryWriter

    keys = sorted({k for p in points for k in p.overrides})
    tmp = out / "tensorboard.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    for point, row in zip(points, rows):
        if "heldout_ce" not in row:
            continue
        hparams = {}
        for key in keys:
            value = get_dotted(point.config, key, "default")
            hparams[key] = value if isinstance(value, (int, float, str, bool)) else _value_name(value)
        metrics = {"sweep/heldout_ce": row["heldout_ce"], "sweep/top1_agreement": row["top1_agreement"],
                   "sweep/suite_mean": row["suite_mean"], "sweep/alpha_star": row["alpha_star"],
                   **{f"sweep/C_{a:g}": row[f"C_{a:g}"] for a in alphas}}
        if row["kd_tokens_per_s"] is not None:
            metrics["sweep/kd_tokens_per_s"] = row["kd_tokens_per_s"]
        metrics.update({f"sweep/heldout_ce/{d}": e["ce"] for d, e in row["domain_ce"].items()})
        with SummaryWriter(str(tmp / point.name)) as writer:
            writer.add_hparams(hparams, metrics, run_name=".")
    shutil.rmtree(out / "tensorboard", ignore_errors=True)
    if tmp.exists():
        tmp.rename(out / "tensorboard")


def aggregate(out: Path, points: list[SweepPoint], alphas: list[float], target: float, title: str) -> str:
    """sweep.csv, sweep.md, win_tie.csv/png and the TensorBoard HParams view; returns the Markdown."""
    from callbacks.win_tie import plot_curves, write_curve_csv

    rows = [point_row(p, alphas, target) for p in points]
    done = [r for r in rows if "heldout_ce" in r]
    # every point against the first finished one on the same held-out blocks (paired)
    first = done[0] if done else None
    for r in done[1:]:
        if r.get("per_block") and first.get("per_block"):
            from experiments.heldout import paired_between_runs

            diff = paired_between_runs(r["per_block"], first["per_block"])
            if diff:
                r.update({"ce_minus_first": diff["student_ce"], "ce_minus_first_low": diff["student_ce_90"][0],
                          "ce_minus_first_high": diff["student_ce_90"][1], "kl_minus_first": diff["kl_teacher_student"],
                          "kl_minus_first_low": diff["kl_teacher_student_90"][0],
                          "kl_minus_first_high": diff["kl_teacher_student_90"][1]})
    tasks = sorted({t for r in done for t in r["teacher_scores"]})
    domains = sorted({d for r in done for d in r["domain_ce"]})
    calpha = [f"C_{a:g}" for a in alphas]
    columns = ["point", "overrides", "status", "student", "heldout_ce", "heldout_ce_low", "heldout_ce_high",
               "ce_minus_converted", "ce_minus_converted_low", "ce_minus_converted_high",
               "ce_minus_first", "ce_minus_first_low", "ce_minus_first_high",
               "kl_minus_first", "kl_minus_first_low", "kl_minus_first_high", "converted_ce", "kl_teacher_student",
               "top1_agreement",
               "suite_mean", *calpha, "alpha_star", "kd_tokens_per_s", "decode_ms_per_token", "decode_speedup", "decode_state_mb", "seconds",
               *(f"heldout_ce:{d}{part}" for d in domains for part in ("", "_low", "_high")),
               *(f"task:{t}" for t in tasks), "error"]

    def write_csv(tmp: Path):
        with tmp.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(columns)
            for r in rows:
                flat = {**r, **{f"task:{t}": s for t, s in r.get("scores", {}).items()},
                        **{f"heldout_ce:{d}{part}": e[key] for d, e in r.get("domain_ce", {}).items()
                           for part, key in (("", "ce"), ("_low", "low"), ("_high", "high"))}}
                writer.writerow(["" if flat.get(c) is None or flat.get(c) != flat.get(c) else flat.get(c, "")
                                 for c in columns])

    out.mkdir(parents=True, exist_ok=True)
    atomic_file_write(out / "sweep.csv", write_csv)

    first_name = done[0]["point"] if done else "first point"
    header = (["point", "overrides", "held-out CE [90 %]", "CE − converted [90 %, paired]",
               f"CE − {first_name} [90 %, paired]", f"KL − {first_name} [90 %, paired]", "(converted)", "KL(teacher‖student)", "top-1 agreement", "suite mean", *calpha,
               "alpha*", "KD tokens/s", "decode ms/token", "decode speed-up", "state MB", "status"])
    lines = ["| " + " | ".join(header) + " |", "|---|---|" + "---:|" * (len(header) - 3) + "---|"]
    for r in rows:
        overrides = ", ".join(f"`{k}={_value_name(v)}`" for k, v in json.loads(r["overrides"]).items()) or "(base)"
        status = r["status"] if r["status"] != "failed" else "failed (see below)"
        lines.append(f"| {r['point']} | {overrides} | {_with_interval(r, 'heldout_ce')} | "
                     f"{_with_interval(r, 'ce_minus_converted')} | {_with_interval(r, 'ce_minus_first')} | "
                     f"{_with_interval(r, 'kl_minus_first')} | " + " | ".join(_fmt(r.get(c)) for c in (
            "converted_ce", "kl_teacher_student", "top1_agreement", "suite_mean", *calpha,
            "alpha_star")) + " | "
            + f"{_fmt(r.get('kd_tokens_per_s'), 0)} | {_fmt(r.get('decode_ms_per_token'), 1)} | "
            f"{_fmt(r.get('decode_speedup'), 2)}{'x' if r.get('decode_speedup') else ''} | "
            f"{_fmt(r.get('decode_state_mb'), 2)} | {status} |")
    md = f"# Sweep `{title}`\n\n" + "\n".join(lines) + "\n"
    if done:
        teacher = done[0]["teacher_scores"]
        decoded = next((r["teacher_decode"] for r in done if r["teacher_decode"]), None)
        teacher_decode = (f" {decoded['ms_per_token']:.1f} | 1x | {decoded['kv_cache_mb']:.2f} (KV cache) |" if decoded
                          else " | | |")
        md += (f"| teacher | | {_fmt(done[0]['teacher_ce'])} | | | | | | {_fmt(sum(teacher.values()) / len(teacher))} |"
               + " |" * (len(calpha) + 2) + teacher_decode + " |\n")
        best_ce = min(done, key=lambda r: r["heldout_ce"])
        best_star = min(done, key=lambda r: (r["alpha_star"], r["heldout_ce"]))
        md += (f"\nEach point's final student ({', '.join(sorted({r['student'] for r in done}))}) against the teacher. "
               f"Lowest held-out CE: **{best_ce['point']}** ({best_ce['heldout_ce']:.3f}); smallest alpha* "
               f"(C_alpha >= {target:g}): **{best_star['point']}** ({best_star['alpha_star']:.3f}).\n")
        if any(r["teacher_scores"] != teacher for r in done):
            md += ("\n**The points' teacher scores differ** (different tasks, limits or teachers): their curves are "
                   "each measured against their own teacher.\n")
        task_lines = ["| task | teacher | " + " | ".join(r["point"] for r in done) + " |",
                      "|---|---:|" + "---:|" * len(done)]
        for task in tasks:
            task_lines.append(f"| {task} | {_fmt(teacher.get(task))} | "
                              + " | ".join(_fmt(r["scores"].get(task)) for r in done) + " |")
        if domains:
            domain_lines = ["| held-out CE [90 %] | " + " | ".join(domains) + " |", "|---|" + "---:|" * len(domains)]
            for r in done:
                cells = []
                for d in domains:
                    e = r["domain_ce"].get(d)
                    cells.append("" if e is None else _fmt(e["ce"]) + (
                        f" [{e['low']:.3f}, {e['high']:.3f}]" if e["low"] is not None else ""))
                domain_lines.append(f"| {r['point']} | " + " | ".join(cells) + " |")
            md += "\n## Held-out CE per domain\n\n" + "\n".join(domain_lines) + "\n"
        md += "\n## Per task\n\n" + "\n".join(task_lines) + "\n\n![Win-and-Tie](win_tie.png)\n"
        curves = {r["point"]: r["curve"] for r in done}
        write_curve_csv(out / "win_tie.csv", CURVE_GRID, curves)
        plot_curves(out / "win_tie.png", CURVE_GRID, curves, {r["point"]: r["alpha_star"] for r in done}, target)
    failed = [r for r in rows if r["status"] == "failed"]
    if failed:
        md += "\n## Failed points\n\n" + "\n".join(
            f"**{r['point']}** (log: `{out / 'points' / r['point'] / 'log.txt'}`):\n\n```\n{r.get('error', '')}\n```\n"
            for r in failed)
    atomic_file_write(out / "sweep.md", lambda tmp: tmp.write_text(md))
    _tensorboard(out, points, rows, alphas)
    return md


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


# ---- the command --------------------------------------------------------------------------------

def run_sweep(base: str, out: str | None = None, points: list[dict[str, Any]] | None = None,
              grid: dict[str, list[Any]] | None = None, common: dict[str, Any] | None = None, parallel: int | None = None,
              threads: int | None = None, devices: list[str] | None = None, min_free_memory_gb: float = 4.0,
              alphas: list[float] = list(DEFAULT_ALPHAS), target: float = 1.0,
              only: list[str] | None = None, dry_run: bool = False, aggregate_only: bool = False) -> dict:
    """Run (or resume) a sweep and aggregate it; returns {"points": {name: status}, "markdown": ...}.

    Args:
        base: the pipeline YAML every point starts from (configs/experiments/).
        out: sweep folder (points under ``<out>/points/<name>``); default runs/sweeps/<sweep file name>.
        points: list of override dicts (dotted pipeline keys; an optional ``name``), crossed with ``grid``.
        grid: key -> list of values; every combination is a point.
        common: overrides applied to every point (e.g. fewer stages or items than the base).
        parallel: at most this many points run at once, each as its own process (None: 1, or one per
            entry of ``devices``).
        threads: torch CPU threads per point (None: the machine's cores divided by ``parallel``).
        devices: GPUs per concurrent point, as CUDA_VISIBLE_DEVICES values (``["0", "1"]``: two points at
            once, one GPU each; ``["0,1", "2,3"]``: two GPUs each, with a multi-GPU trainer config); a
            point runs on the first free entry. None: every point sees every GPU.
        min_free_memory_gb: a further point starts only while this much RAM is available (one point
            always runs), so parallel points do not push the machine into swap.
        alphas: tolerances whose C_alpha the table shows.
        target: C_alpha that defines alpha*.
        only: run only these points (the table still shows every finished one).
        dry_run: print the points and their overrides, run nothing.
        aggregate_only: run nothing; rebuild the table and figure from the finished points.
    """
    if parallel is not None and parallel < 1:
        raise ValueError(f"parallel={parallel} must be >= 1 (or null: one point at a time, one per entry of devices)")
    if devices is not None and (not devices or any(not str(d).strip() for d in devices)):
        raise ValueError(f"devices={devices} must list CUDA_VISIBLE_DEVICES values such as ['0', '1'] (or be null)")
    if parallel is None:
        parallel = len(devices) if devices else 1
    if threads is not None and threads < 1:
        raise ValueError(f"threads={threads} must be >= 1 (or null: the cores divided by parallel)")
    if not alphas or any(a < 0 for a in alphas):
        raise ValueError(f"alphas={alphas} must be a non-empty list of tolerances >= 0")
    out_dir = Path(out or f"runs/sweeps/{Path(base).stem}").resolve()
    expanded = expand_points(points, grid)
    unknown = sorted(set(only or ()) - {n for n, _ in expanded})
    if unknown:
        raise ValueError(f"only={unknown} names no point of this sweep; its points: {', '.join(n for n, _ in expanded)}")
    sweep_points = [SweepPoint(name, overrides, out_dir / "points" / name) for name, overrides in expanded]
    parser = pipeline_parser(exit_on_error=False)
    base_plain = base_config(parser, base)
    cores = os.cpu_count() or 1
    if threads and threads * parallel > cores:
        print(f"[sweep] warning: {parallel} points x {threads} threads exceed the {cores} cores; they will compete",
              flush=True)
    threads = threads or max(1, cores // parallel)
    for point in sweep_points:  # every point is checked before any runs
        others = [p.folder for p in sweep_points if p is not point]
        point.config = resolve_point(parser, base_plain, dict(common or {}), point, threads, others)
        record = point.record
        if point.finished and _comparable(record["config"]) != _comparable(point.config):
            changed = sorted(k for k in set(point.config) | set(record["config"]) if k not in RUNTIME_KEYS
                             and point.config.get(k) != record["config"].get(k))
            raise ValueError(f"sweep point {point.name!r} in {point.folder} finished with another configuration "
                             f"(changed: {', '.join(changed)}); use another --out, or delete the point's folder")
    print(f"[sweep] {len(sweep_points)} points of {base} in {out_dir}, at most {parallel} at once, {threads} threads each",
          flush=True)
    for point in sweep_points:
        state = "finished" if point.finished else (point.record or {}).get("status", "to run")
        print(f"  {point.name}: {json.dumps(point.overrides, sort_keys=True)} [{state}]", flush=True)
    if dry_run:
        return {"points": {p.name: "dry run" for p in sweep_points}, "markdown": ""}
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_json(out_dir / "sweep.json", {"base": str(base), "common": common, "points": points, "grid": grid,
                                        "alphas": alphas, "target": target, "parallel": parallel,
                                        "threads": threads, "devices": devices,
                                        "names": [p.name for p in sweep_points], **provenance()})
    todo = [p for p in sweep_points if not p.finished and (not only or p.name in only)]
    for point in sweep_points:
        if point.finished and (not only or point.name in only):
            print(f"[sweep] {point.name}: finished earlier, skipped", flush=True)
    if not aggregate_only:
        for point in todo:
            point.folder.mkdir(parents=True, exist_ok=True)
            atomic_file_write(point.folder / "config.yaml",
                              lambda tmp, c=point.config: tmp.write_text(yaml.safe_dump(c, sort_keys=False)))
        run_points(todo, parallel, [str(d) for d in devices] if devices else None, min_free_memory_gb)
    md = aggregate(out_dir, sweep_points, list(alphas), target, out_dir.name)
    print("\n" + md)
    print(f"table: {out_dir / 'sweep.md'} ({out_dir / 'sweep.csv'}); curves: {out_dir / 'win_tie.png'}; "
          f"TensorBoard: tensorboard --logdir {out_dir}")
    return {"points": {p.name: (p.record or {}).get("status", "not run") for p in sweep_points}, "markdown": md}


def build_parser():
    return function_parser(run_sweep, __doc__.split("\n")[0], "a sweep YAML (configs/sweeps/)")


def main(args: list[str] | None = None) -> dict:
    kwargs, cfg = function_arguments(build_parser(), args)
    if not kwargs["out"] and cfg.get("config"):
        kwargs["out"] = f"runs/sweeps/{Path(str(cfg.config[-1])).stem}"
    return run_sweep(**kwargs)


if __name__ == "__main__":
    import signal

    # a terminated sweep stops its running points too (run_points' cleanup); their finished stages stay
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    result = main()
    sys.exit(1 if any(status == "failed" for status in result["points"].values()) else 0)
