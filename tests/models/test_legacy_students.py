"""Students saved before ``feature_map``, ``memory_norm`` and ``gate_input`` existed load as the
layer they were trained as (raw q/k, RMS norm on the memory, mix gate from x) and give exactly
the logits they gave then (folders and logits made at commit c08f7a9, see
``tests/models/legacy/make_legacy_students.py``)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from models import HybridConfig, generate, load_student, save_student

LEGACY = Path(__file__).parent / "legacy"


@pytest.mark.parametrize("name", ["hybrid_gate", "mlstm", "shared_norm"])
def test_legacy_student_gives_the_logits_it_gave_when_saved(name):
    saved = json.loads((LEGACY / name / "config.json").read_text())["hybrid_config"]
    assert not {"feature_map", "memory_norm", "gate_input"} & set(saved)  # really an old folder
    student = load_student(LEGACY / name)
    cfg = student.hybrid_config
    assert (cfg.feature_map, cfg.memory_norm, cfg.gate_input) == ("none", "rms", "hidden")
    expected = load_file(str(LEGACY / name / "expected.safetensors"))
    with torch.no_grad():
        logits = student(expected["input_ids"]).logits
    assert torch.allclose(logits, expected["logits"], rtol=1e-5, atol=1e-5), (logits - expected["logits"]).abs().max()


def test_legacy_student_saved_again_keeps_its_layer(tmp_path):
    """Re-saving writes the legacy values explicitly, so the folder no longer depends on defaults."""
    student = load_student(LEGACY / "hybrid_gate")
    save_student(student, tmp_path / "again")
    written = json.loads((tmp_path / "again" / "config.json").read_text())["hybrid_config"]
    assert (written["feature_map"], written["memory_norm"], written["gate_input"]) == ("none", "rms", "hidden")
    ids = load_file(str(LEGACY / "hybrid_gate" / "expected.safetensors"))["input_ids"][:1, :9]
    assert torch.equal(generate(load_student(tmp_path / "again"), ids, 5), generate(student, ids, 5))


def test_new_configs_default_to_the_papers_layer():
    cfg = HybridConfig()
    assert (cfg.feature_map, cfg.memory_norm, cfg.gate_input) == ("softmax", "none", "qkv")
    assert HybridConfig.from_dict({}).feature_map == "softmax"  # only saved folders read legacy values
    with pytest.raises(ValueError, match="HybridConfig.feature_map='relu' is not supported; allowed values: "
                                         "softmax, none"):
        HybridConfig(feature_map="relu")


def test_legacy_student_merges_with_its_resaved_copy(tmp_path):
    """A folder without the new fields and one that spells out their legacy values are the same layer."""
    from callbacks import merge_students

    save_student(load_student(LEGACY / "hybrid_gate"), tmp_path / "resaved")
    merged = merge_students([LEGACY / "hybrid_gate", tmp_path / "resaved"], out=tmp_path / "merged")
    expected = load_file(str(LEGACY / "hybrid_gate" / "expected.safetensors"))
    with torch.no_grad():
        assert torch.allclose(merged(expected["input_ids"]).logits, expected["logits"], rtol=1e-5, atol=1e-5)
