"""Per-item scores, paired gaps, teacher recovery and both Win-and-Tie presets in the report."""

import json

import pytest

import callbacks.scoring as ev


def test_item_scores_follow_document_order_and_the_primary_metric():
    results = {"configs": {"t": {"metric_list": [{"metric": "acc"}]}}, "higher_is_better": {"t": {"acc": True}},
               "samples": {"t": [{"doc_id": 1, "acc": 0.0}, {"doc_id": 0, "acc": 1.0}, {"doc_id": 2, "acc": 1.0}]}}
    assert ev.item_scores(results) == {"t": [1.0, 0.0, 1.0]}


def test_comparison_sees_a_broken_student_and_leaves_out_tasks_the_teacher_fails(tmp_path):
    import random

    rng = random.Random(0)
    teacher = {"xd_arith_mc": [float(rng.random() < 0.8) for _ in range(300)],
               "xd_cloze_mc": [float(rng.random() < 0.9) for _ in range(300)],
               "xd_stem_mc": [float(rng.random() < 0.3) for _ in range(300)]}  # below chance + 0.2: excluded
    same = {t: list(v) for t, v in teacher.items()}
    broken = {t: [0.0 if rng.random() < 0.5 else x for x in v] for t, v in teacher.items()}  # loses half its hits
    alphas = [0.0, 0.1, 0.5]
    c_same = ev.compare_with_teacher(same, teacher, alphas, iters=200)
    c_broken = ev.compare_with_teacher(broken, teacher, alphas, iters=200)
    assert c_same["excluded"] == ["xd_stem_mc"] and c_same["kept"] == ["xd_arith_mc", "xd_cloze_mc"]
    for task, row in c_same["tasks"].items():
        assert row["gap"] == 0.0 and row["low"] == 0.0 and row["high"] == 0.0 and row["recovery"] == 1.0
    assert c_same["presets"]["strict"]["alpha_star"] == {"value": 0.0, "low": 0.0, "high": 0.0}
    for task, row in c_broken["tasks"].items():
        assert row["high"] < 0, task  # the interval excludes a tie: the metric sees the broken student
        assert row["recovery"] == pytest.approx(sum(broken[task]) / sum(teacher[task]))
    paper = c_broken["presets"]["paper"]
    assert paper["relative"] and paper["target"] == 0.5
    assert paper["alpha_star"]["low"] <= paper["alpha_star"]["value"] <= paper["alpha_star"]["high"]
    assert paper["alpha_star"]["value"] > 0.3  # half the hits lost: a relative gap near 0.5

    scores = {t: sum(v) / len(v) for t, v in broken.items()}
    teacher_scores = {t: sum(v) / len(v) for t, v in teacher.items()}
    report = ev.write_report(tmp_path, scores, teacher_scores, alphas, items={"student": broken}, teacher_items=teacher)
    header = (tmp_path / "win_tie.csv").read_text().splitlines()[0]
    assert header == "alpha,student,student_low,student_high"
    assert "comparisons" in json.loads((tmp_path / "scores.json").read_text())
    assert report["alpha_star"] == c_broken["presets"]["strict"]["alpha_star"]["value"]


def test_students_are_cached_by_their_weights_not_their_teachers_embeddings(tmp_path, monkeypatch):
    import callbacks.scoring as ev
    import torch
    from safetensors.torch import save_file

    calls = []
    monkeypatch.setattr(ev, "evaluate_model", lambda *a, **k: (calls.append(1) or {"task": 0.5}, {}))
    folders = []
    for name, value in (("a", 1.0), ("b", 2.0)):  # same config, different weights
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text("{}")
        save_file({"w": torch.full((4,), value)}, str(folder / "model.safetensors"))
        folders.append(folder)
    prints = [ev.weights_fingerprint(f) for f in folders]
    assert prints[0] != prints[1]
    # the same tensors saved with other metadata (safetensors orders it differently run to run)
    same = tmp_path / "a-again"
    same.mkdir()
    (same / "config.json").write_text("{}")
    save_file({"w": torch.full((4,), 1.0)}, str(same / "model.safetensors"), metadata={"format": "x", "other": "y"})
    assert ev.weights_fingerprint(same) == prints[0]
    for fingerprint in (*prints, prints[0]):
        ev.cached_evaluation(None, None, ["task"], cache_dir=tmp_path, fingerprint=fingerprint, role="student")
    assert len(calls) == 2  # the third call was the first student again: read from the cache
    assert len(list((tmp_path / "eval").glob("student-*.json"))) == 2
    with pytest.raises(FileNotFoundError, match="no .safetensors"):
        ev.weights_fingerprint(tmp_path)
