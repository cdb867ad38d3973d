"""How the benchmarks report: markdown tables, plot series and figures, and the small arithmetic
of their summaries (a teacher/student pair of rows, ratios, MiB).

Separate from the measuring (``experiments.measure``) and from the benchmarks themselves: nothing
here runs a model or reads a clock; it turns rows (dicts) into the ``<what>.md`` table and the
``<what>.png`` figure that every benchmark writes next to its JSON, and rows into comparisons: the
per-round ratio with its interval (``paired_ratio``) and the train benchmark's side-by-side tables.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from experiments.measure import MiB
from models.storage import atomic_file_write


def _cell(value, fmt: str) -> str:
    if value is None:
        return "—"
    if isinstance(value, str):
        return value
    return format(value, fmt)


def markdown_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """columns: (key, header, format spec); missing values print as a dash."""
    lines = ["| " + " | ".join(header for _, header, _ in columns) + " |",
             "|" + "|".join("---:" if fmt else "---" for _, _, fmt in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(key), fmt) for key, _, fmt in columns) + " |")
    return "\n".join(lines)


def figure(path: Path, title: str, panels):
    """panels: [(y label, [(label, xs, ys, style)], log-y)] against context length (log2 x), or a
    callable that draws two axes itself. A series may carry a fifth element, (lows, highs): drawn as
    error bars around ys (an interval, not a spread). A panel may carry a fourth element, a y value
    drawn as a dotted reference line (1.0 for a ratio)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if callable(panels):  # a figure of its own kind (bars), two panels
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
        panels(list(axes))
        panels = []
    else:
        fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2))
        axes = [axes] if len(panels) == 1 else list(axes)
    for ax, (ylabel, series, log_y, *reference) in zip(axes, panels):
        for label, xs, ys, style, *interval in series:
            bounds = interval[0] if interval else ([None] * len(xs), [None] * len(xs))
            points = [(x, y, lo, hi) for x, y, lo, hi in zip(xs, ys, *bounds) if y is not None]
            if not points:
                continue
            px, py = [p[0] for p in points], [p[1] for p in points]
            if interval:
                below = [y - (y if lo is None else lo) for _, y, lo, _ in points]
                above = [(y if hi is None else hi) - y for _, y, _, hi in points]
                ax.errorbar(px, py, yerr=[below, above], fmt=style, label=label, markersize=4, capsize=3)
            else:
                ax.plot(px, py, style, label=label, markersize=4)
        if reference:
            ax.axhline(reference[0], color="black", linestyle=":", linewidth=1)
        ax.set_xscale("log", base=2)
        if log_y:
            ax.set_yscale("log")
        ax.set_xlabel("prompt length (tokens)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    atomic_file_write(path, lambda tmp: fig.savefig(tmp, dpi=110))
    plt.close(fig)


def interval_series(summary: list[dict], key: str) -> list:
    """``figure`` series of a per-round ratio (``summary[i][key]``: ``paired_ratio``'s result or None),
    one per batch size: the median against the prompt length, its interval as error bars."""
    out = []
    for batch in dict.fromkeys(s["batch"] for s in summary):
        cells = sorted((s for s in summary if s["batch"] == batch and s.get(key)), key=lambda s: s["prompt"])
        if cells:
            out.append((f"batch {batch}", [s["prompt"] for s in cells], [s[key]["median"] for s in cells], "s-",
                        ([s[key]["low"] for s in cells], [s[key]["high"] for s in cells])))
    return out


def series_of(rows, model, batch, key, scale=1.0):
    """(prompt lengths, values of ``key`` times ``scale``) of one model's rows at one batch size."""
    picked = sorted((r for r in rows if r["model"] == model and r["batch"] == batch), key=lambda r: r["prompt"])
    return [r["prompt"] for r in picked], [None if r.get(key) is None else r[key] * scale for r in picked]


def pair(rows, batch, prompt):
    """The teacher's and the student's row of one (batch, prompt) cell; {} for one not measured."""
    found = {r["model"]: r for r in rows if r["batch"] == batch and r["prompt"] == prompt}
    return found.get("teacher", {}), found.get("student", {})


def ratio(a, b):
    """a / b, None where either is missing (or b is 0)."""
    return a / b if a is not None and b else None


def mib(value):
    """Bytes in MiB; None stays None."""
    return None if value is None else value / MiB


def paired_ratio(numerators, denominators, level: float = 0.95) -> dict | None:
    """The median of per-round ratios ``numerators[i] / denominators[i]`` with a distribution-free
    interval for that median: {"median", "low", "high", "coverage", "pairs"}; None without a pair.

    Each round of a benchmark times both models back to back, so a round's ratio carries the drift
    they shared and cancels it; the rounds' ratios are then taken as independent draws. The interval
    is the pair of order statistics (k-th smallest, k-th largest) for the largest k whose coverage
    of the median, 1 - 2 P(Binomial(n, 1/2) <= k - 1), is at least ``level`` (the textbook
    distribution-free interval for a median): exact for any continuous distribution of the ratios.
    Below 6 rounds no pair reaches 95 %: the interval is then the whole range, and ``coverage``
    says what it actually covers.
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level={level} is invalid; allowed values: 0 < level < 1")
    if len(numerators) != len(denominators):
        raise ValueError(f"a paired ratio needs as many numerators as denominators; got {len(numerators)} "
                         f"and {len(denominators)}")
    ratios = sorted(a / b for a, b in zip(numerators, denominators))
    n = len(ratios)
    if n == 0:
        return None

    def coverage(k: int) -> float:  # of [ratios[k - 1], ratios[n - k]]
        return 1.0 - 2.0 * sum(math.comb(n, i) for i in range(k)) / 2.0 ** n

    k = 1
    while 2 * (k + 1) <= n + 1 and coverage(k + 1) >= level:
        k += 1
    return {"median": statistics.median(ratios), "low": ratios[k - 1], "high": ratios[n - k],
            "coverage": coverage(k), "pairs": n}


def round_ratio(numerator_row: dict, denominator_row: dict, key: str) -> dict | None:
    """``paired_ratio`` of two models' per-round times ``key`` in one cell. Their lists are aligned by
    round; a model that stopped (out of memory) has fewer, and only the rounds both ran are paired."""
    numerators, denominators = numerator_row.get(key) or [], denominator_row.get(key) or []
    n = min(len(numerators), len(denominators))
    return paired_ratio(numerators[:n], denominators[:n])


def interval_text(rounds: dict | None) -> str | None:
    """``paired_ratio``'s result as "median [low, high] coverage", e.g. "1.03 [0.98, 1.07] 96 %"."""
    if rounds is None:
        return None
    return (f"{rounds['median']:.2f} [{rounds['low']:.2f}, {rounds['high']:.2f}] "
            f"{100 * rounds['coverage']:.0f} %")


# -- the train benchmark's comparisons, round by round (experiments.bench_train) -------------------


# what identifies a train row within a round
TRAIN_ROW_NAMES = ("stage", "plan", "allocator", "backend")


def train_row_key(row, *names) -> tuple:
    """A train row's values of ``names``, with the defaults of rows written before a setting existed."""
    defaults = {"allocator": "glibc", "backend": "auto", "round": 0}
    return tuple(row.get(name, defaults.get(name)) for name in names)


def round_ratios(pairs: list[tuple[dict, dict]], ratios: dict) -> dict:
    """``ratios`` ({name: (key of a row, key of its reference)}) over the (row, reference) pairs
    of each round: the median of the rounds' ratios as ``name``, and with more than one round
    ``name_rounds`` (``paired_ratio``) and ``name_text``. One round: the plain ratio."""
    out = {}
    for name, (key, reference_key) in ratios.items():
        usable = [(row[key], reference[reference_key]) for row, reference in pairs
                  if row.get(key) is not None and reference.get(reference_key)]
        if not usable:
            continue
        rounds = paired_ratio([a for a, _ in usable], [b for _, b in usable])
        out[name] = rounds["median"]
        if len(usable) > 1:
            out[f"{name}_rounds"], out[f"{name}_text"] = rounds, interval_text(rounds)
    return out


def lean_against_plain(rows) -> list[dict]:
    """Each stage's lean rows against its plain rows of the same allocator, backend and round:
    tokens/s and peak memory."""
    by = {train_row_key(r, "stage", "plan", "allocator", "backend", "round"): r for r in rows if "tokens_per_s" in r}
    side = []
    for stage, allocator, backend in dict.fromkeys((s, a, b) for s, _, a, b, _ in by):
        pairs = [(lean, plain) for n in sorted({key[-1] for key in by})
                 if (lean := by.get((stage, "lean", allocator, backend, n)))
                 and (plain := by.get((stage, "plain", allocator, backend, n)))]
        if pairs:
            side.append({"stage": stage, "allocator": allocator, "backend": backend, "rounds": len(pairs),
                         **round_ratios(pairs, {"tokens_per_s_ratio": ("tokens_per_s", "tokens_per_s"),
                                                "peak_ratio": ("peak_bytes", "peak_bytes")})})
    return side


def against_teachers_own_step(rows) -> list[dict]:
    """Each row with a floor against the ``teacher_lm`` row of its allocator (and round): both
    ``ms / floor`` and their ratio."""
    names = TRAIN_ROW_NAMES
    teacher = {train_row_key(r, "allocator", "round"): r for r in rows
               if r["stage"] == "teacher_lm" and "over_floor" in r}
    pairs: dict[tuple, list] = {}
    for row in rows:
        reference = teacher.get(train_row_key(row, "allocator", "round"))
        if row["stage"] != "teacher_lm" and "over_floor" in row and reference is not None:
            pairs.setdefault(train_row_key(row, *names), []).append((row, reference))
    out = []
    for key, matched in pairs.items():
        out.append({**dict(zip(names, key)), "rounds": len(matched),
                    "over_floor": statistics.median(row["over_floor"] for row, _ in matched),
                    "teacher_over_floor": statistics.median(ref["over_floor"] for _, ref in matched),
                    **round_ratios(matched, {"over_teacher_floor_ratio": ("over_floor", "over_floor")})})
    return out


def against_first(rows, axis: str, values: list[str]) -> list[dict]:
    """Each row against the row of ``values[0]`` on ``axis`` (allocator or backend) with the same
    stage, plan, other axis and round: tokens/s, peak memory and, where both have it, ms / floor."""
    names = TRAIN_ROW_NAMES
    by = {train_row_key(r, *names, "round"): r for r in rows if "tokens_per_s" in r}
    at = names.index(axis)
    pairs: dict[tuple, list] = {}
    for key, row in by.items():
        first = by.get(key[:at] + (values[0],) + key[at + 1:])
        if key[at] != values[0] and first is not None:
            pairs.setdefault(key[:-1], []).append((row, first))
    return [{**dict(zip(names, key)), "rounds": len(matched),
             **round_ratios(matched, {"tokens_per_s_ratio": ("tokens_per_s", "tokens_per_s"),
                                      "peak_ratio": ("peak_bytes", "peak_bytes"),
                                      "over_floor_ratio": ("over_floor", "over_floor")})}
            for key, matched in pairs.items()]
