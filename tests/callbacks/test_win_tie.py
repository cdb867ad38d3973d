import csv

import pytest

from callbacks import critical_tolerance, win_and_tie
from callbacks.eval import write_report

TEACHER = {"a": 0.80, "b": 0.50, "c": 0.30, "d": 0.90}
STUDENT = {"a": 0.80, "b": 0.45, "c": 0.35, "d": 0.70}  # tie, -0.05, +0.05, -0.20


def test_absolute_curve_on_a_hand_made_table():
    assert win_and_tie(STUDENT, TEACHER, [0.0, 0.04, 0.05, 0.1, 0.2]) == [0.5, 0.5, 0.75, 0.75, 1.0]
    assert critical_tolerance(STUDENT, TEACHER) == pytest.approx(0.20)
    assert critical_tolerance(STUDENT, TEACHER, target=0.75) == pytest.approx(0.05)
    assert critical_tolerance(STUDENT, TEACHER, target=0.5) == 0.0


def test_relative_variant():
    # needs: a 0, b 1 - .45/.5 = 0.1, c 0, d 1 - .7/.9 = 0.2222
    assert win_and_tie(STUDENT, TEACHER, [0.0, 0.1, 0.2, 0.23], relative=True) == [0.5, 0.75, 0.75, 1.0]
    assert critical_tolerance(STUDENT, TEACHER, relative=True) == pytest.approx(1 - 0.7 / 0.9)


def test_student_better_everywhere_and_float_ties():
    better = {k: v + 0.01 for k, v in TEACHER.items()}
    assert win_and_tie(better, TEACHER, [0.0]) == [1.0]
    assert critical_tolerance(better, TEACHER) == 0.0
    assert win_and_tie({"x": 0.1 + 0.2}, {"x": 0.3}, [0.0]) == [1.0]


def test_mismatched_tasks_are_named():
    with pytest.raises(ValueError, match="'?d'?"):
        win_and_tie({"a": 1.0}, {"a": 1.0, "d": 0.5}, [0.0])


def test_report_files(tmp_path):
    report = write_report(tmp_path, STUDENT, TEACHER, [0.0, 0.1, 0.2], others={"other": TEACHER})
    assert report["alpha_star"] == pytest.approx(0.2)
    rows = list(csv.reader((tmp_path / "win_tie.csv").open()))
    assert rows[0] == ["alpha", "student", "other"] and rows[1] == ["0", "0.5", "1"]
    assert (tmp_path / "win_tie.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "scores.json").is_file()
