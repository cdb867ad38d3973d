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
    assert reason == f"{tmp_path / 'file'} is a file where a folder is needed (move or rename it, or choose another folder)"


def test_a_permission_error_is_said_as_one_naming_the_folder(tmp_path, monkeypatch):
    """(Root writes anywhere, so the refusal is simulated at the open the probe makes.)"""
    import builtins
    import errno

    real_open = builtins.open

    def denied(path, *args, **kwargs):
        if "write-probe" in str(path):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", denied)
    assert unwritable_reason(tmp_path) == (f"permission denied: {tmp_path} is not writable by this user (a read-only "
                                           "folder or one owned by someone else; fix its permissions or choose "
                                           "another folder)")


def _version_folder(path, version: str, files: int = 6):
    from models.storage import atomic_directory_write

    def write(tmp):
        for i in range(files):
            (tmp / f"part{i}.bin").write_bytes(version.encode() * 1000)
    return atomic_directory_write(path, write)


def test_every_folder_written_carries_a_manifest_that_names_a_changed_file(tmp_path):
    from models.storage import MANIFEST_NAME, ArtifactMismatch, file_digest, verify_directory

    folder = _version_folder(tmp_path / "artifact", "a")
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    assert manifest["files"]["part0.bin"] == file_digest(folder / "part0.bin")
    assert manifest["files"]["part0.bin"]["bytes"] == 1000 and set(manifest["files"]) == {f"part{i}.bin" for i in range(6)}
    assert verify_directory(folder, "advice") == manifest
    (folder / "part3.bin").write_bytes(b"b" * 1000)  # same size, other bytes
    with pytest.raises(ArtifactMismatch, match=r"part3.bin does not match .*SHA-256.*advice"):
        verify_directory(folder, "advice")
    (folder / "part3.bin").unlink()
    with pytest.raises(ArtifactMismatch, match=r"part3.bin does not match .*missing"):
        verify_directory(folder, "advice")


def test_the_fallback_restores_the_complete_old_folder_not_the_newest_half_deleted_one(tmp_path):
    """The issue's sequence on a file system without RENAME_EXCHANGE: a kill while the replaced
    folder is being deleted leaves it half-deleted (and, deletion touching it, the newest); a kill
    between the two renames of a later write leaves no folder under the name."""
    import os
    import time

    from models.storage import directory_verifies, previous_versions, recover_directory

    path = tmp_path / "student"
    complete = _version_folder(tmp_path / "staging-a", "a")
    half = _version_folder(tmp_path / "staging-b", "b")
    os.replace(complete, tmp_path / ".student.old-aaaaaaaa")
    time.sleep(0.02)
    os.replace(half, tmp_path / ".student.old-bbbbbbbb")
    for name in ("part0.bin", "part1.bin", "part2.bin"):  # the kill came mid-rmtree
        (tmp_path / ".student.old-bbbbbbbb" / name).unlink()
    assert previous_versions(path)[0].name == ".student.old-bbbbbbbb"  # the newest is the broken one
    assert not directory_verifies(tmp_path / ".student.old-bbbbbbbb")
    recover_directory(path)
    assert (path / "part5.bin").read_bytes() == b"a" * 1000 and directory_verifies(path)
    # the next writer of the same artifact clears what is left
    _version_folder(path, "c")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student"]


def test_no_folder_is_restored_when_no_previous_version_verifies(tmp_path):
    import os

    from models.checkpoint import read_config_json
    from models.storage import recover_directory

    half = _version_folder(tmp_path / "staging", "a")
    os.replace(half, tmp_path / ".student.old-cccccccc")
    (tmp_path / ".student.old-cccccccc" / "part4.bin").unlink()
    assert not recover_directory(tmp_path / "student").exists()
    with pytest.raises(FileNotFoundError, match=r"\.student\.old-cccccccc beside it is a previous version .*did not verify"):
        read_config_json(tmp_path / "student")


def test_the_next_writer_removes_dead_writers_temporaries_and_keeps_live_ones(tmp_path):
    import os
    import socket
    import subprocess
    import sys

    from models.storage import atomic_file_write

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid, host = int(dead.stdout), socket.gethostname()
    names = {
        "dead": f".student.tmp-{host}-{dead_pid}-0123abcd",
        "alive": f".student.tmp-{host}-{os.getpid()}-0123abce",
        "elsewhere": f".student.tmp-other-host-{dead_pid}-0123abcf",
        "other_artifact": f".teacher.tmp-{host}-{dead_pid}-0123abd0",
    }
    for name in names.values():
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"x" * 100)
    legacy = tmp_path / ".student.tmp-0123abd1"
    legacy.mkdir()
    os.utime(legacy, (0, 0))  # a writer from before pids were recorded, long gone
    _version_folder(tmp_path / "student", "a")
    left = {p.name for p in tmp_path.iterdir()}
    assert left == {"student", names["alive"], names["elsewhere"], names["other_artifact"]}
    # files too: a checkpoint's temporary from a killed save
    stale_file = tmp_path / f".last.tmp-{host}-{dead_pid}-0123abd2.ckpt"
    stale_file.write_bytes(b"x" * 100)
    atomic_file_write(tmp_path / "last.ckpt", lambda tmp: tmp.write_bytes(b"new"), manifest=True)
    assert not stale_file.exists() and (tmp_path / "last.ckpt.sha256.json").is_file()


def test_a_file_manifest_is_removed_before_its_file_is_replaced(tmp_path, monkeypatch):
    """A crash between the rename and the new sidecar leaves a file without one, never a sidecar that
    contradicts the file."""
    import models.storage as st

    target = tmp_path / "shard.safetensors"
    st.atomic_file_write(target, lambda tmp: tmp.write_bytes(b"old"), manifest=True)
    assert st.verify_file(target, "x")
    real_write_json = st.write_json

    def killed(path, payload):
        raise KeyboardInterrupt("killed after the rename")

    monkeypatch.setattr(st, "write_json", killed)
    with pytest.raises(KeyboardInterrupt):
        st.atomic_file_write(target, lambda tmp: tmp.write_bytes(b"new!"), manifest=True)
    monkeypatch.setattr(st, "write_json", real_write_json)
    assert target.read_bytes() == b"new!" and st.verify_file(target, "x") is False
    with pytest.raises(st.ArtifactMismatch, match="sha256.json is missing"):
        st.verify_file(target, "x", required=True)
