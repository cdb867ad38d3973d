"""experiments.compare: finished runs side by side, numbers from their own files."""

import json
from pathlib import Path

import pytest

from experiments.compare import compare, main, training_tokens

TEACHER = {"a": 0.5, "b": 0.8}


def fake_run(folder: Path, family: str, merged: dict, kd: dict, ce: float, teacher=TEACHER, tokens=100):
    settings = {"teacher": "t", "seq_len": 10, "val_fraction": 0.1, "seed": 0, "corpus": {},
                "align": {"steps": 2, "batch_size": 1}, "kd": {"steps": 3, "batch_size": 2},
                "expert": {"steps": 1, "batch_size": 1}, "domains": ["math", "chat"]}
    if family == "distil_xlstm":
        settings["student_family"] = family
    files = {"pipeline.json": settings, "convert/stage.json": {"result": {"describe": f"{family} student"}},
             "heldout/heldout.json": {"tokens": tokens, **{k: {"student_ce": ce, "teacher_ce": 2.0, "kl_teacher_student": 0.5,
                                                                 "top1_agreement": 0.6} for k in ("merged", "kd")}},
             "eval_teacher/scores.json": teacher, "eval_merged/scores.json": merged, "eval_kd/scores.json": kd}
    if merged is None:  # a run without experts (domains: [])
        settings["domains"] = []
        del files["eval_merged/scores.json"]
    for name, payload in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(json.dumps(payload))
    return folder


def test_compare_tables_runs_and_refuses_other_references(tmp_path):
    hybrid = fake_run(tmp_path / "hybrid", "hybrid", {"a": 0.5, "b": 0.7}, {"a": 0.4, "b": 0.8}, 3.1)
    distil = fake_run(tmp_path / "distil", "distil_xlstm", {"a": 0.1, "b": 0.2}, {"a": 0.1, "b": 0.1}, 6.0)
    # hybrid: (align 2x1 + kd 3x2 + 2 experts 1x1) x 10 tokens; distil: no alignment
    assert training_tokens(json.loads((hybrid / "pipeline.json").read_text())) == 100
    assert training_tokens(json.loads((distil / "pipeline.json").read_text())) == 80
    md = main([str(hybrid), str(distil), "--out", str(tmp_path / "cmp")])  # the command line
    # hybrid merged: task a tied (0.5 >= 0.5), task b needs alpha 0.1 -> C_0 = C_0.02 = C_0.05 = 0.5,
    # C_0.1 = 1, alpha* = 0.1; mean 0.6 (columns: the shared TABLE_ALPHAS 0, 0.02, 0.05, 0.1)
    assert "| C_0 | C_0.02 | C_0.05 | C_0.1 | alpha* |" in md
    assert "| hybrid: merged | hybrid student | 100 | 3.100 | baseline | 0.500 | 0.600 | 0.600 | 0.500 | 0.500 | 0.500 | 1.000 | 0.100 |" in md
    # distil merged: needs alpha 0.4 (a) and 0.6 (b) -> alpha* = 0.6
    # (these fake runs kept no per-block sums, so nothing is paired)
    assert "| distil: merged | distil_xlstm student | 80 | 6.000 | n/a |" in md and "| 0.600 |" in md
    for name in ("compare.md", "win_tie.csv", "win_tie.png"):
        assert (tmp_path / "cmp" / name).is_file()
    header = (tmp_path / "cmp" / "win_tie.csv").read_text().splitlines()[0]
    assert header == "alpha,hybrid: merged,hybrid: stage-2,distil: merged,distil: stage-2"
    other = fake_run(tmp_path / "other", "hybrid", TEACHER, TEACHER, 3.0, teacher={"a": 0.6, "b": 0.8})
    with pytest.raises(ValueError, match="different teacher scores"):
        compare([str(hybrid), str(other)], out=str(tmp_path / "cmp2"))
    with pytest.raises(FileNotFoundError, match="finished pipeline run"):
        compare([str(hybrid), str(tmp_path / "missing")], out=str(tmp_path / "cmp3"))


def test_a_run_without_experts_shows_its_stage_2_student(tmp_path):
    hybrid = fake_run(tmp_path / "hybrid", "hybrid", {"a": 0.5, "b": 0.7}, {"a": 0.4, "b": 0.8}, 3.1)
    short = fake_run(tmp_path / "short", "hybrid", None, {"a": 0.5, "b": 0.8}, 2.9)
    md = compare([str(hybrid), str(short)], out=str(tmp_path / "cmp"))
    # no experts: align 2x1 + kd 3x2 blocks of 10 tokens; ties both tasks -> alpha* 0
    assert "| short: stage-2 | hybrid student | 80 | 2.900 | n/a |" in md and "short: merged" not in md
    header = (tmp_path / "cmp" / "win_tie.csv").read_text().splitlines()[0]
    assert header == "alpha,hybrid: merged,hybrid: stage-2,short: stage-2"


def test_the_pipelines_scores_format_is_read_and_held_out_ce_is_paired_block_by_block(tmp_path):
    """Runs as the pipeline writes them: eval stages' scores.json hold {"scores", "items"}, and
    heldout.json keeps per-block sums, so the CE difference to the first run is paired."""
    runs = {}
    for name, family, per_token in (("hybrid", "hybrid", [3.0, 3.2, 3.1]), ("distil", "distil_xlstm", [6.0, 6.4, 6.1])):
        folder = fake_run(tmp_path / name, family, {"a": 0.5, "b": 0.7}, {"a": 0.4, "b": 0.8}, sum(per_token) / 3)
        for key in ("merged", "kd", "teacher"):  # every scores file in the pipeline's format
            path = folder / f"eval_{key}" / "scores.json"
            path.write_text(json.dumps({"scores": json.loads(path.read_text()), "items": {}}))
        heldout = json.loads((folder / "heldout" / "heldout.json").read_text())
        blocks = [{"student_ce": 10 * ce, "kl_teacher_student": 5.0, "top1_agreement": 6, "n": 10} for ce in per_token]
        heldout["per_block"] = {key: {"general": blocks} for key in ("merged", "kd", "teacher")}
        (folder / "heldout" / "heldout.json").write_text(json.dumps(heldout))
        runs[name] = folder
    md = compare([str(runs["hybrid"]), str(runs["distil"])], out=str(tmp_path / "cmp"))
    # per block: +3.0, +3.2, +3.0 nats per token -> mean +3.067, every resample within [3.0, 3.2]
    row = next(line for line in md.splitlines() if line.startswith("| distil: merged"))
    cells = [c.strip() for c in row.split("|")]
    diff, interval = cells[5].split(" ", 1)
    assert float(diff) == pytest.approx(3.067, abs=1e-3)
    low, high = (float(x) for x in interval.strip("[]").split(", "))
    assert 3.0 - 1e-9 <= low <= float(diff) <= high <= 3.2 + 1e-9
    # the wrapped scores were read: task a, teacher then merged and stage-2 of each run
    assert "| a | 0.500 | 0.500 | 0.400 | 0.500 | 0.400 |" in md
