"""The benchmarks' summary arithmetic: the paired per-round ratio and its interval for the median,
against hand-computed order statistics, scipy's binomial distribution and a simulation of its
coverage."""

import numpy as np
import pytest
from scipy import stats

from experiments.bench_report import interval_text, paired_ratio, round_ratio


def test_nine_rounds_give_the_second_smallest_and_second_largest_ratio_at_96_percent():
    teacher = [1.0, 2.0, 0.5, 1.0, 4.0, 1.0, 2.0, 1.0, 1.0]
    ratios = [1.10, 0.90, 1.30, 1.00, 0.80, 1.05, 1.20, 0.95, 1.15]  # sorted: .80 .90 .95 1.0 1.05 1.10 1.15 1.20 1.30
    result = paired_ratio([r * t for r, t in zip(ratios, teacher)], teacher)
    assert result["median"] == pytest.approx(1.05)
    assert result["low"] == pytest.approx(0.90) and result["high"] == pytest.approx(1.20)
    assert result["coverage"] == pytest.approx(1 - 2 * (1 + 9) / 512)  # 1 - 2 P(Bin(9, 1/2) <= 1)
    assert result["pairs"] == 9
    assert interval_text(result) == "1.05 [0.90, 1.20] 96 %"


@pytest.mark.parametrize("n", range(1, 41))
def test_the_interval_is_the_narrowest_pair_of_order_statistics_reaching_the_level(n):
    """Against scipy's binomial: coverage of [x_(k), x_(n+1-k)] is 1 - 2 P(Bin(n, 1/2) <= k - 1);
    the chosen k reaches 95 % and k + 1 would not (or the range is all there is)."""
    values = list(np.linspace(1.0, 2.0, n))
    result = paired_ratio(values, [1.0] * n)
    k = values.index(result["low"]) + 1
    assert result["high"] == values[n - k]
    assert result["coverage"] == pytest.approx(1 - 2 * stats.binom.cdf(k - 1, n, 0.5))
    if n < 6:  # no pair of order statistics reaches 95 % below six rounds: the whole range
        assert k == 1 and result["coverage"] < 0.95
    else:
        assert result["coverage"] >= 0.95
        assert k + 1 > (n + 1) / 2 or 1 - 2 * stats.binom.cdf(k, n, 0.5) < 0.95


def test_the_interval_covers_the_true_median_ratio_as_often_as_it_says():
    """Rounds with a drift shared by both models (a factor of up to 1.5 from round to round) and a
    true median ratio of 1.1: 4,000 simulated runs of 9 rounds."""
    rng = np.random.default_rng(0)
    true_ratio, runs, covered = 1.1, 4000, 0
    for _ in range(runs):
        drift = rng.uniform(1.0, 1.5, 9)
        teacher = drift * rng.lognormal(0.0, 0.05, 9)
        student = teacher * true_ratio * rng.lognormal(0.0, 0.1, 9)
        result = paired_ratio(list(student), list(teacher))
        covered += result["low"] <= true_ratio <= result["high"]
    assert covered / runs == pytest.approx(1 - 2 * 10 / 512, abs=0.015)


def test_pairing_only_the_rounds_both_models_ran():
    student = {"times_s": [2.0, 3.0]}  # ran out of memory in round 2
    teacher = {"times_s": [1.0, 2.0, 5.0, 5.0]}
    assert round_ratio(student, teacher, "times_s")["median"] == pytest.approx((2.0 + 1.5) / 2)
    assert round_ratio(student, {"error": "out of memory"}, "times_s") is None
    assert interval_text(None) is None


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="as many numerators as denominators"):
        paired_ratio([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="level"):
        paired_ratio([1.0], [1.0], level=1.0)


def test_the_figure_draws_each_cells_interval_as_error_bars_around_its_median(tmp_path, monkeypatch):
    import matplotlib.axes

    from experiments.bench_report import figure, interval_series

    summary = [{"batch": 1, "prompt": 1024, "paired_ratio": {"median": 0.95, "low": 0.9, "high": 1.0}},
               {"batch": 1, "prompt": 256, "paired_ratio": {"median": 1.2, "low": 1.1, "high": 1.4}},
               {"batch": 8, "prompt": 256, "paired_ratio": None}]  # a cell without a pair: no point
    series = interval_series(summary, "paired_ratio")
    assert series == [("batch 1", [256, 1024], [1.2, 0.95], "s-", ([1.1, 0.9], [1.4, 1.0]))]
    drawn, original = [], matplotlib.axes.Axes.errorbar

    def recording(self, x, y, yerr=None, **kwargs):
        drawn.append((list(x), list(y), [list(side) for side in yerr]))
        return original(self, x, y, yerr=yerr, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "errorbar", recording)
    figure(tmp_path / "f.png", "title", [("ratio", series, False, 1.0)])
    [(x, y, (below, above))] = drawn
    assert x == [256, 1024] and y == [1.2, 0.95]
    assert below == pytest.approx([0.1, 0.05]) and above == pytest.approx([0.2, 0.05])
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
