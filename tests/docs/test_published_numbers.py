"""Every number in a table of README.md or docs/*.md is backed by a file a program wrote under
docs/results/.

Pure Python: no torch, no project import (the root conftest still imports torch for the session).

What counts as a published number
- Tables are runs of lines that start with ``|`` outside fenced code blocks. The first line of a
  table is its header and is skipped, as is the ``|---|---:|`` separator line; every other line is
  a body row, and every cell of it is read, the first (label) column included: labels such as
  "batch 8, prompt 16,384" name settings that the result files record too.
- Inside a cell, text in backticks (identifiers, commands, config keys such as
  ``hybrid.window=16``) and the targets of links are dropped. A duration written ``17 min 55 s``
  is skipped (wall clocks are read off a terminal, not written to a file). Digits glued to letters
  or underscores are part of a name or an abbreviation and are not numbers: ``SmolLM2``,
  ``xd_needle_512``, ``16k``, ``C_0.05``.
- A number is an optional sign, digits with optional thousands commas (``10,220``), an optional
  fraction and exponent. Unicode minus (U+2212) is a minus sign and ``+`` is dropped; a sign
  directly after a digit is a range dash (``0.019-0.056``), so both ends are unsigned. Interval
  brackets need no special case: ``[−0.244,−0.217]`` gives -0.244 and -0.217.
- A ratio ``1.04x`` is the number 1.04. A percentage ``7 %`` or ``7%`` is backed by 7 or by 0.07
  (a file may store the fraction).
- Integers from -10 to 10 are skipped: in these tables they are counts, steps, batch sizes and
  0/10 tallies, and they would match any file by chance. Every number with a fraction is checked,
  however small (``0.000`` included).

When a number is backed
- Its text (sign kept, ``+`` and thousands commas dropped) occurs as a number in a text file
  (``.json``, ``.csv``, ``.md``, ``.txt``) under docs/results/, or
- a number in those files rounds to it at the quoted precision: |file - quoted| <= half a unit
  of the quoted last digit (``2.0731`` backs ``2.073``; ``332`` is backed by ``331.7``), with the
  same sign (a quoted negative needs a value <= 0, an unsigned one a value >= 0).
- ``README.md`` files under docs/results/ do not count: people write them (the command, the commit,
  what the files are), and a number copied by hand into one proves nothing.
- Stricter, and checked separately: one run folder (a folder directly under docs/results/, its
  subfolders included) backs every number of a table. Two- and three-digit numbers match some
  value of a large score file by chance; within the single run a table reports, a wrong one rarely
  does.

Tables that hold no measurement (configuration defaults, error messages, targets set before
measuring) are exempted by an HTML comment on the line right above the table, with its reason:
``<!-- numbers not measured: configuration defaults -->``, or for some columns only (1-based,
the label column is 1): ``<!-- numbers not measured in columns 2: the targets -->``. A marker
that is not followed by a table is an error, so an exemption cannot drift onto other text.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "docs" / "results"
SOURCE_SUFFIXES = {".json", ".csv", ".md", ".txt"}

MINUS = "\u2212"
# A number in a table cell. Not preceded by a word character or a dot (so not part of a name or a
# version), not followed by a word character except the ratio suffix x.
CELL_NUMBER = re.compile(
    r"(?<![\w.])(?P<sign>[+-])?(?P<int>\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?P<frac>\.\d+)?"
    r"(?:[eE](?P<exp>[+-]?\d+))?(?P<suffix>x(?!\w)|\s?%)?(?![\w.]?\w)"
)
# A number in a result file: looser, since files hold numbers inside keys and paths too, and an
# extra number there can only make a check pass that should pass anyway.
FILE_NUMBER = re.compile(r"(?<![\d.])-?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?(?:[eE][+-]?\d+)?")
DURATION = re.compile(r"\d+\s*min\s+\d+\s*s\b")
CODE_SPAN = re.compile(r"`[^`]*`")
LINK_TARGET = re.compile(r"\]\([^)]*\)")
SEPARATOR = re.compile(r"^\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?\s*$")
MARKER = re.compile(r"<!--\s*numbers not measured(?:\s+in\s+columns?\s+(?P<cols>[\d,\s]+?))?\s*:\s*(?P<why>.*?)\s*-->")


@dataclass(frozen=True)
class Quoted:
    """One number as a table prints it."""

    where: str  # file:line
    cell: str
    text: str  # normalised: sign kept, '+' and thousands commas dropped
    value: float
    decimals: int
    percent: bool


def split_row(line: str) -> list[str]:
    body = line.strip()
    body = body[1:] if body.startswith("|") else body
    body = body[:-1] if body.endswith("|") else body
    return [c.strip() for c in body.split("|")]


def numbers_in_cell(cell: str) -> list[tuple[str, float, int, bool]]:
    """(normalised text, value, decimals, is a percentage) of every number the rules above count."""
    text = LINK_TARGET.sub("]", CODE_SPAN.sub(" ", cell)).replace(MINUS, "-")
    text = DURATION.sub(" ", text)
    found = []
    for m in CELL_NUMBER.finditer(text):
        sign = "-" if m["sign"] == "-" else ""
        digits = m["int"].replace(",", "")
        frac = m["frac"] or ""
        exp = int(m["exp"]) if m["exp"] else 0
        if not frac and not m["exp"] and not m["suffix"] and int(digits) <= 10:
            continue  # a count or a label, see the docstring
        normalised = f"{sign}{digits}{frac}" + (f"e{exp}" if m["exp"] else "")
        decimals = max(0, len(frac) - 1 - exp) if frac else max(0, -exp)
        found.append((normalised, float(normalised), decimals, bool(m["suffix"] and "%" in m["suffix"])))
    return found


def tables(path: Path) -> tuple[list[Quoted], list[str]]:
    """Every counted number in the tables of a markdown file, and the markers that precede no table."""
    lines = path.read_text(encoding="utf-8").splitlines()
    name = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
    quoted: list[Quoted] = []
    stray: list[str] = []
    in_fence = False
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
            i += 1
            continue
        marker = None if in_fence else MARKER.search(line)
        if marker:
            if i + 1 >= len(lines) or not lines[i + 1].lstrip().startswith("|") or not marker["why"]:
                stray.append(f"{name}:{i + 1}: {line.strip()}")
        if in_fence or not line.lstrip().startswith("|"):
            i += 1
            continue
        above = MARKER.search(lines[i - 1]) if i > 0 else None
        skip_all = bool(above and not above["cols"])
        skip_cols = {int(c) - 1 for c in re.findall(r"\d+", above["cols"])} if above and above["cols"] else set()
        first = True
        while i < len(lines) and lines[i].lstrip().startswith("|"):
            row = lines[i]
            if not first and not SEPARATOR.match(row.strip()) and not skip_all:
                for col, cell in enumerate(split_row(row)):
                    if col in skip_cols:
                        continue
                    for text, value, decimals, percent in numbers_in_cell(cell):
                        quoted.append(Quoted(f"{name}:{i + 1}", cell, text, value, decimals, percent))
            first = False
            i += 1
    return quoted, stray


class Evidence:
    """The numbers in the result files, as text and as sorted values."""

    def __init__(self, texts: list[str]):
        self.strings: set[str] = set()
        values = []
        for text in texts:
            for m in FILE_NUMBER.finditer(text.replace(MINUS, "-")):
                # "10,220" in a report is 10220, but "256,512" in compact JSON is two numbers: keep
                # every reading, since an extra number cannot hide a missing one
                group = m.group()
                readings = {group.replace(",", "")} | (set(group.split(",")) if "," in group else set())
                self.strings |= readings
                values += [float(r) for r in readings]
        self.values = sorted(values)

    @classmethod
    def from_folder(cls, folder: Path = RESULTS) -> "Evidence":
        return cls([p.read_text(encoding="utf-8", errors="replace") for p in result_files(folder)])

    def _rounds_to(self, value: float, decimals: int, negative: bool) -> bool:
        half = 0.5 * 10.0 ** -decimals
        slack = 1e-9 * max(1.0, abs(value))
        lo = bisect.bisect_left(self.values, value - half - slack)
        hi = bisect.bisect_right(self.values, value + half + slack)
        return any((x <= 0) if negative else (x >= 0) for x in self.values[lo:hi])

    def backs(self, q: Quoted) -> bool:
        if q.text in self.strings:
            return True
        negative = q.text.startswith("-")
        if self._rounds_to(q.value, q.decimals, negative):
            return True
        return q.percent and self._rounds_to(q.value / 100, q.decimals + 2, negative)


def published_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def result_files(folder: Path = RESULTS) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in SOURCE_SUFFIXES and p.name != "README.md")


def split_tables(quoted: list[Quoted]) -> list[list[Quoted]]:
    """The numbers of one file grouped by table (a table is a run of consecutive lines)."""
    groups: list[list[Quoted]] = []
    previous = None
    for q in quoted:
        line = int(q.where.rsplit(":", 1)[1])
        if previous is None or line - previous > 1:
            groups.append([])
        groups[-1].append(q)
        previous = line
    return groups


def unbacked(files: list[Path], evidence: Evidence) -> tuple[list[Quoted], list[str]]:
    missing, stray = [], []
    for path in files:
        quoted, bad_markers = tables(path)
        stray += bad_markers
        missing += [q for q in quoted if not evidence.backs(q)]
    return missing, stray


def tables_from_no_single_run(files: list[Path], runs: dict[str, Evidence]) -> list[str]:
    """Tables no single run folder backs entirely, each with the numbers its closest folder lacks."""
    problems = []
    for path in files:
        for table in split_tables(tables(path)[0]):
            lacking = {name: [q.text for q in table if not ev.backs(q)] for name, ev in runs.items()}
            name, missing = min(lacking.items(), key=lambda item: len(item[1]))
            if missing:
                problems.append(f"{table[0].where}: closest run folder {name} lacks {', '.join(missing)}")
    return problems


def run_folders(folder: Path = RESULTS) -> dict[str, Evidence]:
    """One Evidence per run: a folder directly under docs/results/, subfolders included."""
    return {
        run.name: Evidence([p.read_text(encoding="utf-8", errors="replace") for p in result_files(run)])
        for run in sorted(folder.iterdir())
        if run.is_dir()
    }


def test_every_table_number_is_in_a_result_file():
    missing, stray = unbacked(published_files(), Evidence.from_folder())
    assert not stray, "exemption markers not directly above a table, or without a reason:\n" + "\n".join(stray)
    report = "\n".join(f"{q.where}: {q.text} (cell: {q.cell})" for q in missing)
    assert not missing, f"{len(missing)} table numbers found in no file under docs/results/:\n{report}"


def test_each_table_comes_from_one_run():
    """Stricter than the rule above: one run folder backs a whole table. A number with two or three
    digits matches some value of a 100 kB score file by chance; within the one run a table reports,
    a wrong number rarely does. A table that compares runs needs their numbers in one folder (copy the
    files side by side, as results/hybrid_ablation/ holds its points) or one table per run."""
    problems = tables_from_no_single_run(published_files(), run_folders())
    assert not problems, "tables whose numbers no single folder under docs/results/ holds:\n" + "\n".join(problems)


def test_a_made_up_number_is_reported(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "Held-out text.\n\n"
        "| model | CE | CE − converted |\n"
        "|---|---:|---:|\n"
        "| stage-2 | 2.073 [1.970, 2.164] | −0.274 [−0.287, 9.8765] |\n",
        encoding="utf-8",
    )
    quoted, stray = tables(page)
    assert not stray
    assert [q.text for q in quoted] == ["2.073", "1.970", "2.164", "-0.274", "-0.287", "9.8765"]
    # the quickstart's numbers are backed by its files, the invented one by none
    missing, _ = unbacked([page], Evidence.from_folder())
    assert [(q.where, q.text) for q in missing] == [("page.md:5", "9.8765")]


def test_a_table_mixing_runs_is_reported(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("| model | CE |\n|---|---:|\n| stage-2 | 2.073 [1.970] |\n| SWA only | 2.342 |\n", encoding="utf-8")
    runs = {"quickstart": Evidence(["2.073 1.970"]), "layer_study": Evidence(["2.342"])}
    # every number is backed, but by two different runs
    assert not unbacked([page], Evidence(["2.073 1.970 2.342"]))[0]
    assert tables_from_no_single_run([page], runs) == ["page.md:3: closest run folder quickstart lacks 2.342"]
    assert tables_from_no_single_run([page], {"both": Evidence(["2.073 1.970 2.342"])}) == []


def test_the_rules_read_cells_as_documented():
    def texts(cell):
        return [t for t, *_ in numbers_in_cell(cell)]

    assert texts("−0.231 [−0.244,−0.217]") == ["-0.231", "-0.244", "-0.217"]
    assert texts("+0.259 [+0.238, +0.277]") == ["0.259", "0.238", "0.277"]
    assert texts("1,548 / 1,557 MiB") == ["1548", "1557"]
    assert texts("**1.04x** at 2,048, 17 min 55 s") == ["1.04", "2048"]
    assert texts("0/10, 10/10 each; batch 8, −4") == []  # tallies and small counts
    assert texts("`xd_needle_512` SmolLM2 16k C_0.05 Python 3.11.7 `hybrid.window=16`") == []
    assert texts("0.019-0.056, 1e-5") == ["0.019", "0.056", "1e-5"]
    assert numbers_in_cell("49 %") == [("49", 49.0, 0, True)]
    assert numbers_in_cell("1e-5")[0][1:3] == (1e-5, 5)

    evidence = Evidence(["a 0.49 b", "-0.2314 c 2.0731 d 331.7"])
    assert evidence.backs(Quoted("x", "", "49", 49.0, 0, True))  # 49 % stored as a fraction
    assert evidence.backs(Quoted("x", "", "-0.231", -0.231, 3, False))
    assert not evidence.backs(Quoted("x", "", "0.231", 0.231, 3, False))  # the sign differs
    assert evidence.backs(Quoted("x", "", "2.073", 2.073, 3, False))
    assert evidence.backs(Quoted("x", "", "2.07", 2.07, 2, False))  # quoted to fewer digits
    assert not evidence.backs(Quoted("x", "", "2.075", 2.075, 3, False))
    assert evidence.backs(Quoted("x", "", "332", 332.0, 0, False))
    assert not evidence.backs(Quoted("x", "", "333", 333.0, 0, False))


def test_markers_must_sit_on_a_table(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("<!-- numbers not measured: defaults -->\nprose\n\n"
                    "<!-- numbers not measured in columns 2: targets -->\n| a | b |\n|---|---|\n| 1.5 | 2.5 |\n",
                    encoding="utf-8")
    quoted, stray = tables(page)
    assert len(stray) == 1 and "defaults" in stray[0]
    assert [q.text for q in quoted] == ["1.5"]  # column 2 exempted, column 1 still read
