"""The pipeline's report: held-out tables with intervals, stage-against-stage pairs, retrieval, the
Win-and-Tie figure and TensorBoard summaries."""

from __future__ import annotations

import platform
from pathlib import Path

import torch

from callbacks.win_tie import CURVE_ALPHAS

from models.storage import atomic_file_write

# swa_only: the teacher converted with the memory branch off (same window and sinks), the baseline
# that shows what the memory adds; hybrid students only
STUDENT_KEYS = ("swa_only", "converted", "aligned", "kd", "merged")
LABELS = {"merged": "merged", "kd": "stage-2", "aligned": "stage-1", "converted": "converted", "swa_only": "SWA-only"}
# held-out differences the report shows: each stage against the one before it, and the memory's worth
STAGE_PAIRS = (("aligned", "converted"), ("kd", "aligned"), ("merged", "kd"), ("swa_only", "converted"),
               ("kd", "converted"))


def interval_text(entry: dict, key: str, fmt: str = ".3f") -> str:
    lo, hi = entry[f"{key}_90"]
    return f"{entry[key]:{fmt}} [{lo:{fmt}}, {hi:{fmt}}]"


def heldout_tables(heldout: dict, keys: list[str]) -> str:
    """Markdown: every model's held-out CE, KL and top-1 agreement overall (90 % intervals over
    blocks; CE minus the converted student's, paired), then CE per domain."""
    lines = ["| model | CE | CE − converted (paired) | KL(teacher‖student) | top-1 agreement |",
             "|---|---:|---:|---:|---:|"]
    for key in keys:
        h = heldout[key]
        diff = interval_text(h, "ce_minus_baseline", "+.3f") if "ce_minus_baseline" in h else "baseline" if key == "converted" else ""
        lines.append(f"| {LABELS[key]} | {interval_text(h, 'student_ce')} | {diff} | {interval_text(h, 'kl_teacher_student')} | "
                     f"{interval_text(h, 'top1_agreement')} |")
    lines.append(f"| teacher | {interval_text(heldout['teacher'], 'student_ce')} | | | |")
    domains = list(heldout["teacher"]["domains"])
    lines += ["", "| CE per domain | " + " | ".join(domains) + " |", "|---|" + "---:|" * len(domains)]
    for key in keys:
        lines.append(f"| {LABELS[key]} | " + " | ".join(interval_text(heldout[key]["domains"][d], "student_ce") for d in domains) + " |")
    lines.append("| teacher | " + " | ".join(interval_text(heldout["teacher"]["domains"][d], "student_ce") for d in domains) + " |")
    return "\n".join(lines)


def pairs_table(heldout: dict) -> str:
    """Markdown: each stage against the one before it on held-out text (paired differences, 90 %
    intervals over blocks; negative = the first is closer to the text / the teacher), then each
    expert against the merged student on the expert's own domain."""
    lines = []
    names = {**LABELS, "expert": "expert"}
    pairs = heldout.get("pairs", {})
    if pairs:
        lines += ["| difference | CE | KL(teacher‖student) |", "|---|---:|---:|"]
        for pair, entry in pairs.items():
            a, b = pair.split(" - ")
            overall = entry["all"]
            lines.append(f"| {names[a]} − {names[b]} | {interval_text(overall, 'student_ce', '+.3f')} | "
                         f"{interval_text(overall, 'kl_teacher_student', '+.3f')} |")
    experts = heldout.get("experts", {})
    if experts:
        lines += ["", "| domain | expert CE | merged CE | expert − merged CE | expert − merged KL |",
                  "|---|---:|---:|---:|---:|"]
        for domain, entry in experts.items():
            diff = entry["expert - merged"]
            lines.append(f"| {domain} | {interval_text(entry['expert'], 'student_ce')} | {interval_text(entry['merged'], 'student_ce')} | "
                         f"{interval_text(diff, 'student_ce', '+.3f')} | {interval_text(diff, 'kl_teacher_student', '+.3f')} |")
    return "\n".join(lines)


def needle_table(scores: dict[str, dict], items: dict[str, dict], keys: list[str]) -> str:
    """Markdown: needle retrieval accuracy by context length (items correct / items)."""
    from datamodules.eval_suite import NEEDLE_PREFIX

    tasks = sorted((t for t in scores["teacher"] if t.startswith(NEEDLE_PREFIX)), key=lambda t: int(t.rsplit("_", 1)[1]))
    if not tasks:
        return ""
    lines = ["| model | " + " | ".join(f"{t.rsplit('_', 1)[1]} tokens" for t in tasks) + " |", "|---|" + "---:|" * len(tasks)]
    for key in ["teacher", *keys]:
        name = "teacher" if key == "teacher" else LABELS[key]
        cells = [f"{scores[key][t]:.2f} ({int(round(sum(items[key][t])))}/{len(items[key][t])})" for t in tasks]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_pipeline_report(out: Path, scores: dict[str, dict], heldout: dict, decode: dict | None,
                          timings: dict[str, float], target: float, settings: dict, items: dict[str, dict]) -> str:
    """report.md, win_tie.png, win_tie.csv, scores.json and TensorBoard scalars and figure; returns the
    Markdown (also printed). ``scores`` / ``items``: the teacher's and those of the scored students
    (``merged``, ``kd``, ``converted``, ``swa_only``; the first present of the first three is the
    final student), per task and per item."""
    from callbacks.scoring import comparison_table, preset_table, write_report

    teacher = scores["teacher"]
    keys = [k for k in STUDENT_KEYS[::-1] if k in scores]
    final_key = keys[0]
    final = LABELS[final_key]
    labelled = {LABELS[k]: scores[k] for k in keys}
    report = write_report(out, labelled[final], teacher, CURVE_ALPHAS, target, relative=False, label=final,
                          others={k: v for k, v in labelled.items() if k != final},
                          items={LABELS[k]: items[k] for k in keys}, teacher_items=items["teacher"])
    comparisons = report["comparisons"]
    heldout_keys = [k for k in STUDENT_KEYS[::-1] if k in heldout]
    parts = []
    h = heldout[final_key]
    if "ce_minus_baseline" in h:
        lo, hi = h["ce_minus_baseline_90"]
        verdict = "lowered" if hi < 0 else "raised" if lo > 0 else "did not measurably change"
        parts.append(f"Training {verdict} held-out CE against the converted student: {h['ce_minus_baseline']:+.3f} "
                     f"[{lo:+.3f}, {hi:+.3f}] (90 % interval over blocks; teacher {heldout['teacher']['student_ce']:.3f}).")
    if "swa_only" in heldout and "converted" in heldout:
        m = heldout["swa_only"]
        parts.append(f"SWA-only conversion (no memory) CE {interval_text(m, 'student_ce')} against the converted hybrid's "
                     f"{interval_text(heldout['converted'], 'student_ce')}.")
    tied = [t for t, row in comparisons[final]["tasks"].items() if row["low"] <= 0 <= row["high"]]
    parts.append(f"On the suite the {final} student's gap to the teacher has a 95 % interval that includes 0 on "
                 f"{len(tied)} of {len(comparisons[final]['tasks'])} tasks.")
    excluded = comparisons[final]["excluded"]
    if excluded:
        parts.append(f"Left out of Win-and-Tie because the teacher does not pass them (chance + margin): {', '.join(excluded)}.")
    decode_md = ""
    if decode:
        decode_md = ("| prompt | teacher ms/token | student ms/token | speed-up | teacher KV cache | student state | "
                     "teacher prefill | student prefill |\n|---:|---:|---:|---:|---:|---:|---:|---:|\n"
                     f"| {decode['prompt']} | {decode['teacher_ms_per_token']:.1f} | {decode['student_ms_per_token']:.1f} | "
                     f"{decode['decode_speedup']:.2f}x | {decode['teacher_kv_cache_bytes'] / 2**20:.1f} MB | "
                     f"{decode['student_state_bytes'] / 2**20:.1f} MB | {decode['teacher_prefill_s']:.2f} s | "
                     f"{decode['student_prefill_s']:.2f} s |")
    total = sum(timings.values())
    stage_times = " · ".join(f"{name} {sec:.0f} s" for name, sec in timings.items())
    needles = needle_table(scores, items, keys)
    md = (f"# xdistill pipeline report\n\nRun folder `{out}`; teacher `{settings['teacher']}`; student "
          f"{settings['student']}; machine {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}.\n\n"
          f"## Held-out text\n\n{heldout['blocks_per_domain']} blocks of every domain ({heldout['tokens']} scored "
          f"tokens; documents no stage trained on); [90 % bootstrap interval over blocks].\n\n"
          f"{heldout_tables(heldout, heldout_keys)}\n\n"
          + (f"Stage by stage (paired on the same blocks; negative: the first is better):\n\n{pairs_table(heldout)}\n\n"
             if heldout.get("pairs") or heldout.get("experts") else "")
          + f"## Tasks\n\nScore (gap to the teacher [95 % paired bootstrap interval over items], teacher recovery = "
          f"student / teacher).\n\n{comparison_table(comparisons, teacher)}\n\n"
          f"Win-and-Tie over the tasks the teacher passes, alpha* [90 % interval]: `strict` = absolute tolerance, "
          f"every task (C_alpha >= 1); `paper` = the seed paper's, relative tolerance A_S >= (1 - alpha) A_T, "
          f"C_alpha >= 0.5.\n\n{preset_table(comparisons)}\n\n"
          + (f"## Retrieval beyond the window\n\nA 5-digit number planted at least half the context before the "
             f"question (greedy decoding must give it exactly; chance 0).\n\n{needles}\n\n" if needles else "")
          + " ".join(parts) + "\n\n![Win-and-Tie](win_tie.png)\n\n"
          + (f"## Decoding at a long prompt\n\n{decode_md}\n\n" if decode else "")
          + f"## Time\n\n{total:.0f} s in all: {stage_times}\n")
    atomic_file_write(out / "report.md", lambda tmp: tmp.write_text(md))
    write_tensorboard_summary(out / "tensorboard" / "report", keys, scores, heldout, comparisons, report["figure"])
    return md


def write_tensorboard_summary(folder: Path, keys: list[str], scores: dict, heldout: dict, comparisons: dict, figure) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(folder))
    try:
        for key in keys:
            name = LABELS[key]
            c = comparisons[name]
            for preset, result in c["presets"].items():
                star = result["alpha_star"]
                for part in ("value", "low", "high"):
                    writer.add_scalar(f"pipeline/{name}/{preset}/alpha_star_{part}", star[part])
            for metric in ("student_ce", "kl_teacher_student", "top1_agreement"):
                h = heldout[key]
                writer.add_scalar(f"pipeline/{name}/heldout/{metric}", h[metric])
                writer.add_scalar(f"pipeline/{name}/heldout/{metric}_low", h[f"{metric}_90"][0])
                writer.add_scalar(f"pipeline/{name}/heldout/{metric}_high", h[f"{metric}_90"][1])
            for domain, entry in heldout[key]["domains"].items():
                writer.add_scalar(f"pipeline/{name}/heldout_ce/{domain}", entry["student_ce"])
            for task, row in c["tasks"].items():
                writer.add_scalar(f"pipeline/{name}/{task}", row["student"])
                writer.add_scalar(f"pipeline/{name}/gap/{task}", row["gap"])
                writer.add_scalar(f"pipeline/{name}/gap_low/{task}", row["low"])
                writer.add_scalar(f"pipeline/{name}/gap_high/{task}", row["high"])
        for task, value in scores["teacher"].items():
            writer.add_scalar(f"pipeline/teacher/{task}", value)
        writer.add_figure("pipeline/win_tie", figure)
    finally:
        writer.close()

