import csv
import math

import numpy as np
import pytest

from callbacks.statistics import bootstrap_indices, curve_replicates, paired_gap, win_tie_bands
from callbacks.win_tie import critical_tolerance, plot_curves, relative_floor, win_and_tie, write_curve_csv

ALPHAS = [round(0.01 * i, 2) for i in range(31)]


def bernoulli_items(seed: int, rates: dict[str, float], n_items: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {task: rng.binomial(1, rate, n_items).astype(float) for task, rate in rates.items()}


def test_bootstrap_indices_are_reproducible_draws_with_replacement():
    indices = bootstrap_indices(7, 50, seed=3)
    assert indices.shape == (50, 7) and indices.min() >= 0 and indices.max() <= 6
    assert np.array_equal(indices, bootstrap_indices(7, 50, seed=3))
    assert not np.array_equal(indices, bootstrap_indices(7, 50, seed=4))
    assert any(len(set(row)) < 7 for row in indices)  # with replacement: some rows repeat an item
    with pytest.raises(ValueError, match="n_items=0"):
        bootstrap_indices(0, 10, seed=0)


def test_paired_gap_by_hand():
    # differences 0, -1, +1, +1: mean 0.25; the resampled means can only lie in [-1, 1]
    gap = paired_gap([1, 0, 1, 1], [1, 1, 0, 0])
    assert (gap["gap"], gap["student"], gap["teacher"], gap["items"]) == (0.25, 0.75, 0.5, 4)
    assert -1.0 <= gap["low"] <= 0.25 <= gap["high"] <= 1.0


def test_constant_difference_has_a_point_interval():
    teacher = [0.0, 0.5, 0.25, 1.0, 0.5]  # every value and every difference exact in binary floats
    gap = paired_gap([t + 0.25 for t in teacher], teacher, iters=300)
    assert gap["low"] == gap["high"] == gap["gap"] == 0.25


def test_interval_width_matches_the_normal_approximation():
    # independent Bernoulli(0.5) items: the per-item difference has variance 0.25 + 0.25, so the 95 %
    # interval of the mean gap has half-width about 1.96 * sqrt(0.5 / n)
    n = 4000
    items = bernoulli_items(11, {"student": 0.5, "teacher": 0.5}, n)
    gap = paired_gap(items["student"], items["teacher"], iters=2000, seed=5)
    half_width = (gap["high"] - gap["low"]) / 2
    assert half_width == pytest.approx(1.96 * math.sqrt(0.5 / n), rel=0.15)
    assert gap["low"] <= gap["gap"] <= gap["high"]


def test_paired_gap_refuses_unpaired_or_non_finite_items():
    with pytest.raises(ValueError, match="3 student and 2 teacher items"):
        paired_gap([1, 0, 1], [1, 0])
    with pytest.raises(ValueError, match="0 student and 0 teacher items"):
        paired_gap([], [])
    with pytest.raises(ValueError, match="student score of item 1 is nan"):
        paired_gap([1, math.nan], [1, 0])


def test_vectorised_replicates_agree_with_the_scalar_definitions():
    rng = np.random.default_rng(2)
    tasks = ["a", "b", "c", "d", "e"]
    student, teacher = rng.uniform(0.1, 0.9, (40, 5)), rng.uniform(0.3, 0.9, (40, 5))
    student[0] = teacher[0]  # exact ties
    chance = {"a": 0.25, "c": 0.2}
    floors = np.array([relative_floor(t, chance.get(t)) for t in tasks])
    for relative in (False, True):
        for target in (1.0, 0.5, 0.3):
            curves, stars = curve_replicates(student, teacher, ALPHAS, relative, target, floors)
            for row in range(len(student)):
                s, t = dict(zip(tasks, student[row])), dict(zip(tasks, teacher[row]))
                assert curves[row].tolist() == win_and_tie(s, t, ALPHAS, relative, chance=chance)
                assert stars[row] == critical_tolerance(s, t, target, relative, chance=chance)


def test_bands_contain_the_point_curve_and_alpha_star():
    rates = {"a": 0.55, "b": 0.6, "c": 0.5, "d": 0.7, "e": 0.45, "f": 0.65}
    teacher = bernoulli_items(1, rates, 300)
    student = bernoulli_items(2, {task: rate - 0.04 for task, rate in rates.items()}, 300)
    for relative, target in ((False, 1.0), (True, 0.5)):
        bands = win_tie_bands(student, teacher, ALPHAS, relative, target, iters=500, seed=1)
        means = ({t: v.mean() for t, v in student.items()}, {t: v.mean() for t, v in teacher.items()})
        assert bands["curve"] == win_and_tie(*means, ALPHAS, relative)
        assert all(low <= c <= high for low, c, high in zip(bands["low"], bands["curve"], bands["high"]))
        assert bands["low"] != bands["high"]  # 300 items per task do leave room
        star = bands["alpha_star"]
        assert star["value"] == critical_tolerance(*means, target, relative)
        assert star["low"] <= star["value"] <= star["high"]
    assert win_tie_bands(student, teacher, ALPHAS, iters=200, seed=7) == win_tie_bands(student, teacher, ALPHAS,
                                                                                       iters=200, seed=7)


def test_identical_items_give_a_band_that_is_the_point_curve():
    items = bernoulli_items(4, {"a": 0.3, "b": 0.6, "c": 0.8}, 50)
    bands = win_tie_bands(items, {task: scores.copy() for task, scores in items.items()}, ALPHAS, iters=300)
    assert bands["low"] == bands["high"] == bands["curve"] == [1.0] * len(ALPHAS)
    assert bands["alpha_star"] == {"value": 0.0, "low": 0.0, "high": 0.0}


def test_bands_refuse_nan_items_and_unpaired_tasks():
    student = {"a": [1.0, 0.0], "b": [1.0, math.nan]}
    teacher = {"a": [1.0, 1.0], "b": [1.0, 0.0]}
    with pytest.raises(ValueError, match="task 'b': the student score of item 1 is nan"):
        win_tie_bands(student, teacher, ALPHAS)
    with pytest.raises(ValueError, match="task 'a'.*2 student and 3 teacher items"):
        win_tie_bands({"a": [1, 0]}, {"a": [1, 0, 1]}, ALPHAS)
    with pytest.raises(ValueError, match="not in both: c"):
        win_tie_bands({"a": [1]}, {"a": [1], "c": [0]}, ALPHAS)


def test_relative_bands_refuse_a_teacher_at_chance_and_survive_replicates_at_chance():
    student = {"easy": [1.0, 1.0, 0.0, 1.0], "hard": [0.0, 0.0, 0.0, 1.0]}
    teacher = {"easy": [1.0, 1.0, 1.0, 1.0], "hard": [0.0, 0.0, 0.0, 1.0]}
    # the full-data teacher mean of 'hard' (0.25) is at its chance score: the point estimate is refused
    with pytest.raises(ValueError, match=r"'hard'.*teacher score 0\.25 .*chance score 0\.25"):
        win_tie_bands(student, teacher, ALPHAS, relative=True, chance={"hard": 0.25})
    # above chance on all items, but a replicate that draws no 1 (chance (3/4)^4 = 32 %) falls to 0:
    # that task is counted as not tied there instead of crashing
    bands = win_tie_bands(student, teacher, ALPHAS, relative=True, chance={"hard": 0.2}, iters=400)
    assert bands["curve"][0] == 0.5 and bands["low"][0] == 0.0
    assert bands["alpha_star"]["value"] == 0.25 and bands["alpha_star"]["high"] == math.inf


def test_bands_go_to_the_csv_and_the_figure(tmp_path):
    rates = {"a": 0.6, "b": 0.5, "c": 0.7}
    student, teacher = bernoulli_items(8, rates, 200), bernoulli_items(9, rates, 200)
    bands = win_tie_bands(student, teacher, ALPHAS, iters=200)
    other = [1.0] * len(ALPHAS)
    band = (bands["low"], bands["high"])

    write_curve_csv(tmp_path / "win_tie.csv", ALPHAS, {"student": bands["curve"], "other": other},
                    bands={"student": band})
    rows = list(csv.DictReader((tmp_path / "win_tie.csv").open()))
    assert list(rows[0]) == ["alpha", "student", "student_low", "student_high", "other"]
    assert [float(r["student_low"]) for r in rows] == pytest.approx(bands["low"])
    assert [float(r["student_high"]) for r in rows] == pytest.approx(bands["high"])

    star = bands["alpha_star"]
    figure = plot_curves(tmp_path / "win_tie.png", ALPHAS, {"student": bands["curve"], "other": other},
                         {"student": star["value"], "other": 0.0}, bands={"student": band},
                         star_intervals={"student": (star["low"], star["high"])})
    assert (tmp_path / "win_tie.png").read_bytes()[:4] == b"\x89PNG"
    labels = figure.axes[0].get_legend_handles_labels()[1]
    assert labels[0] == f"student (α*={star['value']:.3f} [{star['low']:.2f}, {star['high']:.2f}])"
    assert labels[1] == "other (α*=0.000)"
    with pytest.raises(ValueError, match="bands given for runs without a curve: ghost"):
        write_curve_csv(tmp_path / "x.csv", ALPHAS, {"student": other}, bands={"ghost": band})
