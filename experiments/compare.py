"""Side by side: finished pipeline runs (say a hybrid and a Distil-xLSTM student of one teacher) on
held-out cross-entropy and the Win-and-Tie suite, with every student's curve on one figure.

    python -m experiments.compare runs/quickstart runs/distil_xlstm --out runs/compare

Runs must share their teacher scores (same teacher, tasks and item limit), otherwise their curves
would not measure against the same reference, and their held-out text (same corpus, seed, split
and block count); both are checked. Writes ``compare.md``, ``win_tie.csv`` and ``win_tie.png``.
"""

from __future__ import annotations

import json
from pathlib import Path

from jsonargparse import ArgumentParser

from callbacks.win_tie import (
    CURVE_ALPHAS,
    TABLE_ALPHAS,
    critical_tolerance,
    plot_curves,
    win_and_tie,
    write_curve_csv,
)
from experiments.heldout import paired_between_runs
from models import HybridConfig
from models.storage import atomic_file_write

STUDENTS = (("merged", "merged"), ("kd", "stage-2"))


def _read(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: is {path.parent.parent} a finished pipeline run "
                                "(python -m experiments.pipeline)?")
    return json.loads(path.read_text())


def _scores(path: Path) -> dict[str, float]:
    """A task -> score dict from an eval stage's scores.json: ``{"scores": ..., "items": ...}`` as the
    pipeline writes it, or the plain task -> score dict older runs wrote."""
    payload = _read(path)
    return payload["scores"] if isinstance(payload.get("scores"), dict) else payload


def training_tokens(settings: dict) -> int:
    """Tokens every training stage of a run saw: steps x blocks x block length, experts included."""
    stages = [settings["kd"]] + [settings["expert"]] * len(settings["domains"])
    if settings.get("student_family", "hybrid") == "hybrid":
        stages.append(settings["align"])
    return sum(s["steps"] * s["batch_size"] for s in stages) * settings["seq_len"]


def load_run(folder: Path) -> dict:
    settings = _read(folder / "pipeline.json")
    convert = _read(folder / "convert" / "stage.json")["result"]
    family = settings.get("student_family", "hybrid")
    describe = convert.get("describe") or HybridConfig.from_dict(settings.get("hybrid", {})).describe()
    return {"folder": folder, "settings": settings, "family": family, "describe": describe,
            "tokens": training_tokens(settings), "heldout": _read(folder / "heldout" / "heldout.json"),
            "teacher": _scores(folder / "eval_teacher" / "scores.json"),
            # a run without experts has no merged student; one may leave its stage-2 student unscored
            "scores": {key: _scores(folder / f"eval_{key}" / "scores.json") for key, _ in STUDENTS
                       if (folder / f"eval_{key}" / "scores.json").is_file()}}


def _paired_with_first(run: dict, ref: dict, key: str) -> str:
    """``key``'s held-out CE in ``run`` minus the same student's in the first run, over the same blocks
    (``heldout.json``'s per-block sums), with a 90 % bootstrap interval; blank for the first run, and
    ``n/a`` where a run kept no per-block sums or scored other blocks."""
    if run is ref:
        return "baseline"
    mine, first = (r["heldout"].get("per_block", {}).get(key) for r in (run, ref))
    diff = paired_between_runs(mine, first) if mine and first else None
    if diff is None:
        return "n/a"
    low, high = diff["student_ce_90"]
    return f"{diff['student_ce']:+.3f} [{low:+.3f}, {high:+.3f}]"


def compare(runs: list[str], out: str = "runs/compare", target: float = 1.0) -> str:
    """Print and write the comparison of finished pipeline runs.

    Args:
        runs: pipeline run folders.
        out: folder for compare.md, win_tie.csv and win_tie.png.
        target: C_alpha that defines alpha*.
    """
    if len(runs) < 2:
        raise ValueError(f"compare needs at least two run folders, got {runs}")
    loaded = [load_run(Path(r)) for r in runs]
    ref = loaded[0]
    for run in loaded[1:]:
        if run["teacher"] != ref["teacher"]:
            raise ValueError(f"{run['folder']} and {ref['folder']} have different teacher scores: they were evaluated "
                             "with other tasks, limits or teachers; compare runs with the same eval settings")
        same = ("teacher", "seq_len", "val_fraction", "seed", "corpus")
        diff = [k for k in same if run["settings"].get(k) != ref["settings"].get(k)]
        if diff or run["heldout"]["tokens"] != ref["heldout"]["tokens"]:
            raise ValueError(f"{run['folder']} and {ref['folder']} were scored on different held-out text "
                             f"(settings differ: {', '.join(diff) or 'heldout blocks'}); compare runs of one corpus")
    teacher = ref["teacher"]
    grid = list(CURVE_ALPHAS)
    curves, stars, rows, per_task = {}, {}, [], {}
    for run in loaded:
        if not run["scores"]:
            raise FileNotFoundError(f"{run['folder']} has no scored merged or stage-2 student (eval_merged/, eval_kd/)")
        for key, label in STUDENTS:
            if key not in run["scores"]:
                continue
            name = f"{run['folder'].name}: {label}"
            scores = run["scores"][key]
            curves[name] = win_and_tie(scores, teacher, grid)
            stars[name] = critical_tolerance(scores, teacher, target)
            h = run["heldout"][key]
            c = win_and_tie(scores, teacher, TABLE_ALPHAS)
            mean = sum(scores.values()) / len(scores)
            rows.append(f"| {name} | {run['describe']} | {run['tokens']:,} | {h['student_ce']:.3f} | "
                        f"{_paired_with_first(run, ref, key)} | "
                        f"{h['kl_teacher_student']:.3f} | {h['top1_agreement']:.3f} | {mean:.3f} | "
                        + " | ".join(f"{v:.3f}" for v in c) + f" | {stars[name]:.3f} |")
            per_task[name] = scores
    header = ("| student | architecture | training tokens | held-out CE | KL(teacher‖student) | top-1 agreement | "
              "suite mean | " + " | ".join(f"C_{a:g}" for a in TABLE_ALPHAS) + " | alpha* |").replace(
        "| held-out CE |", "| held-out CE | CE − first run's (paired, 90 %) |")
    teacher_mean = sum(teacher.values()) / len(teacher)
    lines = [header, "|---|---|---:|" + "---:|" * (6 + len(TABLE_ALPHAS)), *rows,
             f"| teacher | | | {ref['heldout']['kd']['teacher_ce']:.3f} | | | | {teacher_mean:.3f} |"
             + " |" * (len(TABLE_ALPHAS) + 1)]
    task_lines = ["| task | teacher | " + " | ".join(per_task) + " |", "|---|---:|" + "---:|" * len(per_task)]
    for task in sorted(teacher):
        task_lines.append(f"| {task} | {teacher[task]:.3f} | " + " | ".join(f"{s[task]:.3f}" for s in per_task.values())
                          + " |")
    md = ("# Pipeline runs side by side\n\n" + "\n".join(lines) + f"\n\nHeld-out CE on {ref['heldout']['tokens']} tokens "
          f"(same blocks for every run); alpha*: smallest alpha with C_alpha >= {target:g}.\n\n"
          + "\n".join(task_lines) + "\n\n![Win-and-Tie](win_tie.png)\n")
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_curve_csv(out_dir / "win_tie.csv", grid, curves)
    plot_curves(out_dir / "win_tie.png", grid, curves, stars, target, False)
    atomic_file_write(out_dir / "compare.md", lambda tmp: tmp.write_text(md))
    print(md)
    return md


def main(args: list[str] | None = None) -> str:
    parser = ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", help="finished pipeline run folders")
    parser.add_argument("--out", default="runs/compare", help="folder for compare.md, win_tie.csv and win_tie.png")
    parser.add_argument("--target", type=float, default=1.0, help="C_alpha that defines alpha*")
    cfg = parser.parse_args(args)
    return compare(list(cfg.runs), out=cfg.out, target=cfg.target)


if __name__ == "__main__":
    main()
