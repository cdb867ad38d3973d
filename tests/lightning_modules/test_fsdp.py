"""Sharded training on CPU: FSDP2 (ModelParallelStrategy + fully_shard) over 2 gloo processes."""

import json
import os
import subprocess
import sys

import pytest
import torch

from models import load_student
from tests.fixtures import write_corpus, write_teacher

pytestmark = pytest.mark.slow


def run(root, out, steps, ckpt=None):
    cmd = [sys.executable, "-m", "tests.lightning_modules.fsdp_run", str(root), str(out), str(steps)]
    if ckpt:
        cmd.append(str(ckpt))
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((out / f"losses-{steps}.json").read_text())


def test_fsdp2_shards_trains_checkpoints_and_resumes(tmp_path):
    write_teacher(tmp_path / "teacher")
    write_corpus(tmp_path / "corpus")
    straight = run(tmp_path, tmp_path / "a", 4)
    assert straight["shard_fraction"] == pytest.approx(0.5, abs=0.01)  # each rank holds half of the student
    run(tmp_path, tmp_path / "b", 2)
    resumed = run(tmp_path, tmp_path / "b", 4, ckpt=tmp_path / "b" / "ckpt" / "last.ckpt")
    assert sorted(resumed["losses"]) == ["3", "4"]
    for step in ("3", "4"):
        assert resumed["losses"][step] == pytest.approx(straight["losses"][step], rel=1e-6)
    # the gathered, exported students of both runs are the same model
    a, b = load_student(tmp_path / "a" / "student"), load_student(tmp_path / "b" / "student")
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.allclose(pa, pb, rtol=1e-5, atol=1e-7), name
