"""experiments/runner.py: named stages skip once done, refuse changed settings, and copy what
another run finished with the same settings."""

import json

import pytest

from experiments.runner import StageRunner


def test_stage_runner_skips_finished_stages_and_refuses_changed_settings(tmp_path, capsys):
    calls = []
    runner = StageRunner(tmp_path, total=2)
    assert runner("a", {"x": 1}, lambda folder: calls.append(folder) or {"value": 7}) == {"value": 7}
    record = json.loads((tmp_path / "a" / "stage.json").read_text())
    assert record["settings"] == {"x": 1} and record["result"] == {"value": 7} and record["seconds"] >= 0
    again = StageRunner(tmp_path, total=2)
    assert again("a", {"x": 1}, lambda folder: calls.append(folder)) == {"value": 7}
    assert len(calls) == 1 and "skipped" in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"stage 'a' .*changed: x.*delete"):
        StageRunner(tmp_path, total=1)("a", {"x": 2}, lambda folder: {})
    # a stage that fails leaves no marker: the next run does it again
    with pytest.raises(RuntimeError):
        StageRunner(tmp_path, total=1)("b", {}, lambda folder: (_ for _ in ()).throw(RuntimeError("boom")))
    assert not (tmp_path / "b" / "stage.json").exists()


def test_stage_runner_copies_a_stage_another_run_finished_with_the_same_settings(tmp_path, capsys):
    def train(folder):
        (folder / "student").mkdir()
        (folder / "student" / "w.bin").write_bytes(b"12")
        return {"student": str(folder / "student"), "note": "kept"}

    first = StageRunner(tmp_path / "first", total=2)
    first("train", {"lr": 1}, train)
    first("other", {"x": 1}, lambda f: {"value": 1})
    calls = []
    second = StageRunner(tmp_path / "second", total=2, reuse=[tmp_path / "first", tmp_path / "second"])
    result = second("train", {"lr": 1}, lambda f: calls.append(f))
    assert not calls and "same settings finished in" in capsys.readouterr().out
    # the copy is this run's own: its files, and a result that names them
    assert result == {"student": str(tmp_path / "second" / "train" / "student"), "note": "kept"}
    assert (tmp_path / "second" / "train" / "student" / "w.bin").read_bytes() == b"12"
    record = json.loads((tmp_path / "second" / "train" / "stage.json").read_text())
    assert record["reused_from"] == str((tmp_path / "first" / "train").resolve()) and record["result"] == result
    # other settings: run here
    assert second("other", {"x": 2}, lambda f: {"value": 2}) == {"value": 2}
    # and a third run skips the copied stage as its own
    assert StageRunner(tmp_path / "second", total=1)("train", {"lr": 1}, lambda f: calls.append(f)) == result
    assert not calls
