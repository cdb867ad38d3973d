"""Artifacts are never half-written: a writer killed at any moment leaves the previous complete
version or the new complete one. A writer process rewrites an artifact in a loop through the
project's own writers (students, merged students, training checkpoints, eval scores and their
report files); the test freezes it (SIGSTOP) at many random moments, which leaves on disk exactly
what a SIGKILL at that moment would, checks every file, lets it go on, and finally kills it for real.
The top-k cache is killed mid-build and must resume to the same shards as an uninterrupted build."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

PROJECT = Path(__file__).resolve().parents[2]
PROBES = 25
KILLS = 2


def done_versions(log: Path) -> list[int]:
    return [int(line) for line in log.read_text().split()] if log.is_file() else []


def check(kind: str, path: Path, last_done: int) -> int | None:
    """The version on disk (None if nothing yet), after checking every file is complete."""
    from models import load_student

    if kind in ("student", "merged"):
        if not path.exists():
            return None
        values = {float(v) for p in load_student(path).parameters() for v in p.detach().flatten()[:1]}
        assert len(values) == 1, f"tensors of different versions in {path}: {values}"
        return int(values.pop())
    if kind == "checkpoint":
        if not path.exists():
            return None
        state = torch.load(path, weights_only=True)
        assert torch.equal(state["w"], torch.full_like(state["w"], float(state["global_step"])))
        return state["global_step"]
    if kind == "scores":
        files = [path / name for name in ("scores.json", "win_tie.csv", "win_tie.png")]
        if not files[0].exists():
            return None
        scores = json.loads(files[0].read_text())["student"]
        assert len(scores) == 8 and len(set(scores.values())) == 1
        if files[1].exists():
            rows = files[1].read_text().splitlines()
            assert len(rows) == 52 and all(len(r.split(",")) == 2 for r in rows), rows[-3:]
        if files[2].exists():
            from PIL import Image

            with Image.open(files[2]) as image:
                image.load()  # decodes every byte: a truncated PNG raises
        return round(next(iter(scores.values())) * 1000)
    raise ValueError(kind)


@pytest.mark.slow
@pytest.mark.parametrize("kind, name", [("student", "student"), ("merged", "merged"),
                                        ("checkpoint", "last.ckpt"), ("scores", "eval")])
def test_a_writer_killed_at_random_moments_leaves_the_old_or_the_new_complete_artifact(kind, name, tmp_path):
    rng = random.Random(kind)
    path, log = tmp_path / name, tmp_path / "log.txt"
    env = {**os.environ, "PYTHONPATH": str(PROJECT)}
    checked = 0
    for _ in range(KILLS):
        proc = subprocess.Popen([sys.executable, "-m", "tests.atomic_writer", kind, str(path), str(log)],
                                cwd=PROJECT, env=env, stderr=subprocess.PIPE)
        start = len(done_versions(log))
        deadline = time.time() + 120
        while len(done_versions(log)) < start + 2:  # a write of its own before the probes
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.time() < deadline
            time.sleep(0.05)
        for probe in range(PROBES + 1):
            time.sleep(rng.uniform(0, 0.15))
            last = probe == PROBES
            proc.send_signal(signal.SIGKILL if last else signal.SIGSTOP)
            if last:
                proc.wait()
            versions = done_versions(log)
            on_disk = check(kind, path, versions[-1])
            # the last version it reported, or the next one (renamed, not yet reported)
            assert on_disk in (versions[-1], versions[-1] + 1), (on_disk, versions[-1])
            checked += 1
            if not last:
                proc.send_signal(signal.SIGCONT)
    assert checked == KILLS * (PROBES + 1)
    # the next writer completes over whatever a kill left behind
    assert len(done_versions(log)) > 2 * KILLS


@pytest.mark.slow
def test_a_killed_topk_cache_build_resumes_to_the_same_shards(tmp_path):
    from tests.fixtures import write_teacher

    write_teacher(tmp_path / "teacher")
    code = (
        "import sys, torch\n"
        "from models import load_teacher, load_tokenizer\n"
        "from datamodules.topk_cache import write_topk_cache\n"
        "t = load_teacher(sys.argv[1]); tok = load_tokenizer(sys.argv[1])\n"
        "g = torch.Generator().manual_seed(0)\n"
        "ids = torch.randint(0, 97, (240, 64), generator=g)\n"
        "write_topk_cache(t, tok, ids, ids.clone(), 8, sys.argv[2], shard_blocks=8, batch_size=4)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(PROJECT)}
    command = [sys.executable, "-c", code, str(tmp_path / "teacher")]
    killed = tmp_path / "killed"
    proc = subprocess.Popen(command + [str(killed)], cwd=PROJECT, env=env)
    deadline = time.time() + 120
    while len(list(killed.glob("shard-*.safetensors"))) < 6:
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    shards = sorted(killed.glob("shard-*.safetensors"))
    assert 6 <= len(shards) < 30 and not (killed / "manifest.json").exists()
    for shard in shards:  # every shard that exists under its name is complete
        assert load_file(str(shard))["topk_ids"].shape == (8, 64, 8)
    subprocess.run(command + [str(killed)], cwd=PROJECT, env=env, check=True)  # resumes
    subprocess.run(command + [str(tmp_path / "straight")], cwd=PROJECT, env=env, check=True)
    manifest = json.loads((killed / "manifest.json").read_text())
    assert manifest == json.loads((tmp_path / "straight" / "manifest.json").read_text())
    for name in manifest["shards"]:
        a, b = load_file(str(killed / name)), load_file(str(tmp_path / "straight" / name))
        assert all(torch.equal(a[k], b[k]) for k in a), name
