"""A sweep's aggregation: one row per point (held-out metrics paired against the first point, task
scores, C_alpha, alpha*, speeds) as sweep.md / sweep.csv, every point's curve on one figure, and the
TensorBoard HParams view."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path


from callbacks.win_tie import CURVE_ALPHAS
from models.storage import atomic_file_write

from experiments.sweep_points import SweepPoint, get_dotted, value_name


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
        "curve": win_and_tie(scores, teacher, CURVE_ALPHAS),
    })
    return row


def write_sweep_tensorboard(out: Path, points: list[SweepPoint], rows: list[dict], alphas: list[float]) -> None:
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
            hparams[key] = value if isinstance(value, (int, float, str, bool)) else value_name(value)
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
        overrides = ", ".join(f"`{k}={value_name(v)}`" for k, v in json.loads(r["overrides"]).items()) or "(base)"
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
        write_curve_csv(out / "win_tie.csv", CURVE_ALPHAS, curves)
        plot_curves(out / "win_tie.png", CURVE_ALPHAS, curves, {r["point"]: r["alpha_star"] for r in done}, target)
    failed = [r for r in rows if r["status"] == "failed"]
    if failed:
        md += "\n## Failed points\n\n" + "\n".join(
            f"**{r['point']}** (log: `{out / 'points' / r['point'] / 'log.txt'}`):\n\n```\n{r.get('error', '')}\n```\n"
            for r in failed)
    atomic_file_write(out / "sweep.md", lambda tmp: tmp.write_text(md))
    write_sweep_tensorboard(out, points, rows, alphas)
    return md

