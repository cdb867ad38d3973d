import csv
import math

import pytest

from callbacks import critical_tolerance, win_and_tie
from callbacks.scoring import write_report
from callbacks.win_tie import PRESETS, preset, required_tolerance, teacher_recovery

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


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_scores_are_refused_not_counted_as_wins(bad):
    # max(0, 0.8 - nan) is 0: without the check a failed student evaluation would tie its teacher
    for student, teacher, side in (({**STUDENT, "b": bad}, TEACHER, "student"),
                                   (STUDENT, {**TEACHER, "b": bad}, "teacher")):
        for compute in (lambda: win_and_tie(student, teacher, [0.0]), lambda: critical_tolerance(student, teacher),
                        lambda: win_and_tie(student, teacher, [0.0], relative=True)):
            with pytest.raises(ValueError, match=rf"'b'.*{side} score is {bad}"):
                compute()
    with pytest.raises(ValueError, match="student score is nan"):
        required_tolerance(math.nan, 0.5)


def test_relative_tolerance_is_refused_at_or_below_chance():
    # b's teacher (0.50) is exactly at its chance score: A_S >= (1 - alpha) A_T would say nothing there
    with pytest.raises(ValueError, match=r"'b'.*teacher score 0\.5 .*chance score 0\.5.*absolute tolerance"):
        win_and_tie(STUDENT, TEACHER, [0.1], relative=True, chance={"b": 0.5})
    with pytest.raises(ValueError, match=r"'c'.*teacher score 0\.3 .*chance score 0\.4"):
        critical_tolerance(STUDENT, TEACHER, relative=True, chance={"a": 0.25, "c": 0.4})
    # without a chance score the floor is 0 (this used to return a tolerance of 0, i.e. a tie)
    with pytest.raises(ValueError, match=r"'x'.*teacher score 0 .*no chance score"):
        win_and_tie({"x": 0.2}, {"x": 0.0}, [0.0], relative=True)
    with pytest.raises(ValueError, match="teacher score 0 "):
        required_tolerance(0.2, 0.0, relative=True)
    # teachers above chance keep the unrefused curve; absolute mode ignores chance
    chance = {"a": 0.25, "b": 0.25, "c": 0.25, "d": 0.25}
    assert win_and_tie(STUDENT, TEACHER, [0.0, 0.1, 0.2, 0.23], relative=True, chance=chance) == [0.5, 0.75, 0.75, 1.0]
    assert win_and_tie(STUDENT, TEACHER, [0.05], chance={"b": 0.9}) == [0.75]
    assert critical_tolerance({"x": 0.2}, {"x": 0.0}, chance={"x": 0.5}) == 0.0


def test_presets():
    assert preset("paper") == {"relative": True, "target": 0.5}
    assert preset("strict") == {"relative": False, "target": 1.0}
    # relative needs sorted: a 0, c 0, b 0.1, d 0.222; half the tasks are tied at 0
    assert critical_tolerance(STUDENT, TEACHER, **preset("paper")) == 0.0
    assert critical_tolerance(STUDENT, TEACHER, **preset("strict")) == pytest.approx(0.20)
    preset("paper")["target"] = 0.9
    assert PRESETS["paper"]["target"] == 0.5
    with pytest.raises(ValueError, match="'loose'.*allowed: paper, strict"):
        preset("loose")


def test_teacher_recovery_by_hand():
    recovery = teacher_recovery(STUDENT, TEACHER)
    assert recovery == pytest.approx({"a": 1.0, "b": 0.9, "c": 0.35 / 0.30, "d": 0.70 / 0.90})
    with pytest.raises(ValueError, match="'z'.*teacher score is 0"):
        teacher_recovery({"a": 0.5, "z": 0.1}, {"a": 0.5, "z": 0.0})


def test_report_files(tmp_path):
    report = write_report(tmp_path, STUDENT, TEACHER, [0.0, 0.1, 0.2], others={"other": TEACHER})
    assert report["alpha_star"] == pytest.approx(0.2)
    rows = list(csv.reader((tmp_path / "win_tie.csv").open()))
    assert rows[0] == ["alpha", "student", "other"] and rows[1] == ["0", "0.5", "1"]
    assert (tmp_path / "win_tie.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "scores.json").is_file()
