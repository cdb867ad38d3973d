"""experiments.bench_ab: the benchmark's --out_dir placed before its subcommand, the checkouts'
alternating order, and each row of the second checkout against the first's, paired by round
(hand-made rows, hand-computed ratios; the commands are recorded, not run)."""

import json
import statistics
import subprocess
from pathlib import Path

import pytest

from experiments import bench_ab
from experiments.bench_ab import paired_rows, round_order, with_out_dir


def test_out_dir_goes_before_the_subcommand_and_after_the_config():
    args = ["--config", "c.yaml", "--seed", "1", "train", "--stages", "[kd]"]
    assert with_out_dir(args, Path("o")) == ["--config", "c.yaml", "--seed", "1", "--out_dir", "o", "train",
                                             "--stages", "[kd]"]
    with pytest.raises(ValueError, match="--bench must not set --out_dir"):
        with_out_dir(["--out_dir=x", "train"], Path("o"))
    with pytest.raises(ValueError, match="--bench names no benchmark; allowed values: decode, decode_layers"):
        with_out_dir(["--config", "c.yaml"], Path("o"))


def test_the_checkouts_take_turns_going_first():
    assert [round_order(r, ["a", "b"]) for r in range(3)] == [["a", "b"], ["b", "a"], ["a", "b"]]


def row(stage, ms, peak, over_floor=None, plan="lean"):
    out = {"stage": stage, "plan": plan, "allocator": "tcmalloc_no_release", "backend": "torch",
           "ms_per_step": ms, "peak_bytes": peak, "peak_mib": peak / 2**20}
    return out if over_floor is None else {**out, "over_floor": over_floor}


def test_rows_are_paired_by_round_and_by_stage_plan_allocator_and_backend():
    before = {0: [row("kd", 100.0, 400, 1.5), row("align", 50.0, 200)],
              1: [row("kd", 120.0, 400, 1.6), row("align", 40.0, 200)],
              2: [row("kd", 110.0, 400, 1.5)]}
    after = {0: [row("kd", 90.0, 300, 1.4), row("align", 45.0, 210)],
             1: [row("kd", 96.0, 320, 1.2), row("align", 44.0, 190), row("kd", 1.0, 1, plan="plain")],
             3: [row("kd", 1.0, 1, 1.0)]}  # round 3 has no "before": left out
    rows = {r["stage"]: r for r in paired_rows(before, after)}
    assert set(rows) == {"kd", "align"}  # the plain row has no "before" row
    kd = rows["kd"]
    assert kd["rounds"] == 2 and kd["after_ms_per_step"] == [90.0, 96.0] and kd["before_ms_per_step"] == [100.0, 120.0]
    assert kd["ms_per_step_ratio"] == pytest.approx(statistics.median([0.9, 0.8]))
    assert kd["peak_ratio"] == pytest.approx(statistics.median([0.75, 0.8]))
    assert kd["over_floor_ratio"] == pytest.approx(statistics.median([1.4 / 1.5, 1.2 / 1.6]))
    assert kd["ms_per_step_ratio_text"] == "0.85 [0.80, 0.90] 50 %"  # two rounds: the range, its coverage
    assert rows["align"]["ms_per_step_ratio"] == pytest.approx(statistics.median([0.9, 1.1]))
    assert "over_floor_ratio" not in rows["align"]  # neither side has a floor


def test_main_runs_the_rounds_alternating_and_compares_what_they_wrote(tmp_path, monkeypatch):
    calls = []
    times = {"aaa": iter([100.0, 110.0, 105.0]), "bbb": iter([90.0, 88.0, 99.0])}

    def fake_run(command, cwd=None, capture_output=False, text=False, check=False):
        label = "aaa" if str(cwd or command[2]).endswith("a") else "bbb"
        if command[0] == "git":
            return subprocess.CompletedProcess(command, 0, stdout=f"{label}\n", stderr="")
        out = Path(command[command.index("--out_dir") + 1])
        calls.append((label, out.name, command[command.index("--out_dir") + 2]))
        out.mkdir(parents=True)
        (out / "train.json").write_text(json.dumps({"rows": [row("kd", next(times[label]), 100)]}))
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(bench_ab.subprocess, "run", fake_run)
    payload = bench_ab.main([tmp_path / "a", tmp_path / "b"], tmp_path / "out", bench="--config c.yaml train", rounds=3)
    assert calls == [("aaa", "round0", "train"), ("bbb", "round0", "train"), ("bbb", "round1", "train"),
                     ("aaa", "round1", "train"), ("aaa", "round2", "train"), ("bbb", "round2", "train")]
    (kd,) = payload["rows"]
    assert kd["ms_per_step_ratio"] == pytest.approx(statistics.median([0.9, 0.8, 99 / 105]))
    assert (payload["before"], payload["after"]) == ("aaa", "bbb")
    assert json.loads((tmp_path / "out" / "ab.json").read_text()) == json.loads(json.dumps(payload))
    assert "bbb against aaa" in (tmp_path / "out" / "ab.md").read_text()
    again = bench_ab.main([tmp_path / "a", tmp_path / "b"], tmp_path / "out", rounds=3, compare_only=True)
    assert again["rows"] == payload["rows"] and len(calls) == 6  # nothing ran again
    with pytest.raises(ValueError, match="--checkouts takes two checkouts"):
        bench_ab.main([tmp_path / "a"], tmp_path / "out")
