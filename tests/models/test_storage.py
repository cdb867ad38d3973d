"""The crash-safe file layer every artifact goes through (models/storage.py)."""

import json

import pytest

from models.storage import atomic_file_write, cache_dir, json_text, unwritable_reason, write_json


def test_atomic_file_write_keeps_the_old_file_when_the_writer_fails(tmp_path):
    target = tmp_path / "scores.json"
    atomic_file_write(target, lambda tmp: tmp.write_text("old"))

    def half_then_crash(tmp):
        tmp.write_text("half")
        raise KeyboardInterrupt("killed mid-write")

    with pytest.raises(KeyboardInterrupt):
        atomic_file_write(target, half_then_crash)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores.json"]  # no temporary left behind


def test_write_json_is_one_format_sorted_indented_and_newline_terminated(tmp_path):
    from pathlib import Path

    path = write_json(tmp_path / "a" / "scores.json", {"b": 1, "a": Path("/x"), "c": [0.5]})
    text = path.read_text()
    assert text == '{\n  "a": "/x",\n  "b": 1,\n  "c": [\n    0.5\n  ]\n}\n'
    assert json.loads(text) == {"a": "/x", "b": 1, "c": [0.5]}
    # the same content is the same bytes, whatever the insertion order
    assert json_text({"c": [0.5], "b": 1, "a": "/x"}) == text


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("XDISTILL_CACHE", str(tmp_path / "cache"))
    assert cache_dir() == tmp_path / "cache"
    monkeypatch.delenv("XDISTILL_CACHE")
    assert cache_dir().parts[-2:] == (".cache", "xdistill")


def test_unwritable_reason_names_the_error_and_leaves_no_probe(tmp_path):
    assert unwritable_reason(tmp_path / "new") is None and list((tmp_path / "new").iterdir()) == []
    (tmp_path / "file").write_text("x")
    reason = unwritable_reason(tmp_path / "file" / "below")  # a file where a folder should be
    assert reason is not None and "errno" in reason
