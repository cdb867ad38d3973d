"""The shared floor: a student reduced to its q/k/v/o products, and put back afterwards."""

import pytest
import torch

from experiments.bench_runners import projections_only
from models import HybridConfig, convert_to_hybrid, load_teacher
from tests.conftest import TINY
from tests.fixtures import write_teacher

HYBRID = HybridConfig(window=8, sink_tokens=2, chunk_size=16)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return write_teacher(tmp_path_factory.mktemp("runners") / "teacher")


def test_projections_only_is_undone_and_skips_attention(teacher_dir):
    student = convert_to_hybrid(load_teacher(str(teacher_dir)), HYBRID).eval()
    originals = [layer.self_attn for layer in student.lm.model.layers]
    ids = torch.randint(0, TINY["vocab_size"], (1, 12))
    with torch.no_grad(), projections_only(student):
        floor = student(ids).logits
        # no attention: each position sees itself only, so changing an earlier token changes nothing later
        changed = ids.clone()
        changed[0, 0] = (changed[0, 0] + 1) % TINY["vocab_size"]
        assert torch.equal(student(changed).logits[:, 1:], floor[:, 1:])
    assert [layer.self_attn for layer in student.lm.model.layers] == originals
