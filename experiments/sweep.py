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

import json
import os
import sys
from pathlib import Path
from typing import Any

import yaml

from callbacks.win_tie import TABLE_ALPHAS
from experiments.pipeline import build_parser as pipeline_parser
from experiments.runner import function_arguments, function_parser, provenance
from experiments.sweep_points import (
    RUNTIME_KEYS,
    SweepPoint,
    base_config,
    comparable_config,
    expand_points,
    resolve_point,
    run_points,
)
from experiments.sweep_report import aggregate
from models.storage import atomic_file_write, write_json

# ---- the command --------------------------------------------------------------------------------

def run_sweep(base: str, out: str | None = None, points: list[dict[str, Any]] | None = None,
              grid: dict[str, list[Any]] | None = None, common: dict[str, Any] | None = None, parallel: int | None = None,
              threads: int | None = None, devices: list[str] | None = None, min_free_memory_gb: float = 4.0,
              alphas: list[float] = list(TABLE_ALPHAS), target: float = 1.0,
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
        if point.finished and comparable_config(record["config"]) != comparable_config(point.config):
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
    write_json(out_dir / "sweep.json", {"base": str(base), "common": common, "points": points, "grid": grid,
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
