"""One training benchmark in two checkouts (two commits of xdistill, or a commit and a change), in
alternating rounds, and each row of the second against the same row of the first, round by round.

    python -m experiments.bench_ab --checkouts '[/tmp/wt_before, /tmp/wt_after]' --rounds 6 --out runs/ab \\
        --bench "--config configs/bench/smollm2-cpu.yaml train --seq_len 512 --batch 4 --steps 2 --stages [kd] --plans [lean]"

A round runs the command once in each checkout (``python -m experiments.bench`` there, with
``--out_dir <out>/<label>/round<k>`` placed before the subcommand), the second checkout first every
other round, so that a machine drifting over the minutes a row takes falls on both sides of each
round's pair; ``--compare_only`` reads rounds already written. Labels are the checkouts' commits
(``git describe --always --dirty``). Writes ``ab.json`` and ``ab.md``: per (stage, plan, allocator,
backend) row, the median of the rounds' ratios after / before with its interval
(``experiments.bench_report.paired_ratio``) for ms per step, ms over the FLOP floor and peak memory.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

from jsonargparse import CLI

from experiments.bench_report import TRAIN_ROW_NAMES, markdown_table, round_ratios, train_row_key
from models.storage import atomic_file_write, write_json

# the benchmark commands of experiments.bench: --out_dir goes right before the first of them
BENCH_COMMANDS = ("decode", "decode_layers", "prefill", "train", "kd_memory", "head_loss", "kernels", "integrity")
RATIOS = {"ms_per_step_ratio": ("ms_per_step", "ms_per_step"), "over_floor_ratio": ("over_floor", "over_floor"),
          "peak_ratio": ("peak_bytes", "peak_bytes")}


def with_out_dir(bench_args: list[str], out_dir: Path) -> list[str]:
    """``bench_args`` with ``--out_dir out_dir`` before the subcommand (after any --config, which
    would otherwise set it again); a command without a subcommand or with its own --out_dir is
    refused."""
    if any(a == "--out_dir" or a.startswith("--out_dir=") for a in bench_args):
        raise ValueError("--bench must not set --out_dir: each checkout's rounds are written under --out")
    at = next((i for i, a in enumerate(bench_args) if a in BENCH_COMMANDS), None)
    if at is None:
        raise ValueError(f"--bench names no benchmark; allowed values: {', '.join(BENCH_COMMANDS)}")
    return [*bench_args[:at], "--out_dir", str(out_dir), *bench_args[at:]]


def checkout_label(checkout: Path) -> str:
    """The checkout's commit (with ``-dirty`` when its tree differs from it)."""
    done = subprocess.run(["git", "-C", str(checkout), "describe", "--always", "--dirty"], capture_output=True,
                          text=True)
    if done.returncode:
        raise ValueError(f"{checkout} is not a git checkout of xdistill: {done.stderr.strip()}")
    return done.stdout.strip()


def round_order(round_: int, labels: list[str]) -> list[str]:
    """The checkouts' order in round ``round_``: as given, then reversed, and so on."""
    return labels[::-1] if round_ % 2 else list(labels)


def paired_rows(before: dict[int, list[dict]], after: dict[int, list[dict]]) -> list[dict]:
    """Rows of ``after`` against the same rows of ``before`` (by stage, plan, allocator, backend),
    paired by round ({round: rows}); rounds one side lacks are left out."""
    pairs: dict[tuple, list] = {}
    for round_ in sorted(set(before) & set(after)):
        reference = {train_row_key(r, *TRAIN_ROW_NAMES): r for r in before[round_] if "ms_per_step" in r}
        for row in after[round_]:
            match = reference.get(train_row_key(row, *TRAIN_ROW_NAMES))
            if "ms_per_step" in row and match is not None:
                pairs.setdefault(train_row_key(row, *TRAIN_ROW_NAMES), []).append((row, match))
    return [{**dict(zip(TRAIN_ROW_NAMES, key)), "rounds": len(matched), **round_ratios(matched, RATIOS),
             "after_ms_per_step": [r["ms_per_step"] for r, _ in matched],
             "before_ms_per_step": [b["ms_per_step"] for _, b in matched],
             "after_peak_mib": [r.get("peak_mib") for r, _ in matched],
             "before_peak_mib": [b.get("peak_mib") for _, b in matched]}
            for key, matched in pairs.items()]


def read_rounds(folder: Path) -> dict[int, list[dict]]:
    """{round: rows} of the ``train.json`` files under ``folder/round<k>/``."""
    rounds = {}
    for path in sorted(folder.glob("round*/train.json")):
        rounds[int(path.parent.name.removeprefix("round"))] = json.loads(path.read_text())["rows"]
    return rounds


def main(checkouts: list[str], out: str, bench: str = "", rounds: int = 6, compare_only: bool = False) -> dict:
    """Run ``bench`` (the arguments of ``python -m experiments.bench``, one string) in both
    ``checkouts`` for ``rounds`` alternating rounds, then compare their train rows.

    Args:
        checkouts: two xdistill checkouts: before, after.
        out: folder for the rounds (``<label>/round<k>/``) and ``ab.json``, ``ab.md``.
        bench: the benchmark's arguments, e.g. "--config configs/bench/smollm2-cpu.yaml train --stages [kd]".
        rounds: rounds (6: a 97 % interval from the extreme ratios).
        compare_only: read the rounds already under ``out`` instead of running.
    """
    if len(checkouts) != 2:
        raise ValueError(f"--checkouts takes two checkouts (before, after); got {len(checkouts)}")
    if rounds < 1:
        raise ValueError(f"rounds={rounds} is invalid; allowed values: an integer >= 1")
    out = Path(out)
    labels = [checkout_label(Path(c)) for c in checkouts]
    if labels[0] == labels[1]:
        labels = [f"{labels[0]}-before", f"{labels[1]}-after"]  # the same commit on both sides
    where = dict(zip(labels, map(Path, checkouts)))
    if not compare_only:
        args = shlex.split(bench)
        with_out_dir(args, out)  # refused before any round runs
        for round_ in range(rounds):
            for label in round_order(round_, labels):
                command = [sys.executable, "-m", "experiments.bench",
                           *with_out_dir(args, (out / label / f"round{round_}").resolve())]
                subprocess.run(command, cwd=where[label], check=True)
    before, after = (read_rounds(out / label) for label in labels)
    rows = paired_rows(before, after)
    payload = {"before": labels[0], "after": labels[1], "bench": bench, "rounds": rounds, "rows": rows}
    write_json(out / "ab.json", payload)
    columns = [*((n, n, "") for n in TRAIN_ROW_NAMES), ("rounds", "rounds", ""),
               ("ms_per_step_ratio_text", "ms per step, after / before", ""),
               ("over_floor_ratio_text", "ms / floor, after / before", ""),
               ("peak_ratio_text", "peak memory, after / before", "")]
    table = (f"{labels[1]} against {labels[0]}: each row's ratio per round, median [interval] coverage\n\n"
             f"`python -m experiments.bench {bench}`\n\n" + markdown_table(rows, columns))
    atomic_file_write(out / "ab.md", lambda tmp: tmp.write_text(table + "\n"))
    print(table)
    return payload


if __name__ == "__main__":
    CLI(main, as_positional=False)
