import json

import pytest
import torch
from transformers import PreTrainedTokenizerFast
from tokenizers import Tokenizer, models as tok_models

from models import HybridConfig, convert_to_hybrid, load_student, save_student
from tests.conftest import make_teacher


def tiny_tokenizer():
    vocab = {f"t{i}": i for i in range(97)}
    tok = Tokenizer(tok_models.WordLevel(vocab, unk_token="t0"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", pad_token="t1", eos_token="t2")


@pytest.mark.parametrize("family,tie", [("llama", True), ("qwen3", False), ("olmo2", False)])
def test_round_trip_gives_identical_logits(tmp_path, family, tie):
    teacher = make_teacher(family, tie_word_embeddings=tie)
    student = convert_to_hybrid(teacher, HybridConfig(mode="hybrid", combine="shared_norm", window=8,
                                                      full_attention_layers=[1]))
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.01 * torch.randn_like(p))  # make sure trained values, not init, round-trip
    ids = torch.randint(0, 97, (2, 30))
    save_student(student, tmp_path / "s", tokenizer=tiny_tokenizer())
    assert {"model.safetensors", "config.json", "tokenizer_config.json"} <= {p.name for p in (tmp_path / "s").iterdir()}
    loaded = load_student(tmp_path / "s")
    assert loaded.hybrid_config == student.hybrid_config
    assert loaded.tokenizer is not None and loaded.tokenizer.eos_token == "t2"
    student.eval()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, student(ids).logits)


def test_a_student_trained_with_the_compiled_op_is_saved_with_the_automatic_backend(tmp_path):
    """The compiled op is the training run's choice: a loaded student must not compile a graph for
    every request length of an evaluation."""
    student = convert_to_hybrid(make_teacher("llama"), HybridConfig(window=8, backend="compiled"))
    save_student(student, tmp_path / "s")
    loaded = load_student(tmp_path / "s")
    assert loaded.hybrid_config.backend == "auto"
    assert loaded.hybrid_config == HybridConfig(window=8)
    assert json.loads((tmp_path / "s" / "config.json").read_text())["hybrid_config"]["backend"] == "auto"


def test_save_replaces_existing_folder_completely(tmp_path):
    student = convert_to_hybrid(make_teacher("llama"), HybridConfig())
    save_student(student, tmp_path / "s", tokenizer=tiny_tokenizer())
    save_student(student, tmp_path / "s")  # no tokenizer this time
    assert not (tmp_path / "s" / "tokenizer_config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]  # no temporary folders left behind


@pytest.fixture
def saved(tmp_path):
    student = convert_to_hybrid(make_teacher("llama"), HybridConfig())
    return save_student(student, tmp_path / "s")


def edit_config(path, fn, record: bool = True):
    """Change config.json; ``record``: record the change in the manifest too (a folder written wrong
    on purpose, to reach the field checks), else leave the manifest as saved (a folder edited by hand)."""
    from models.storage import write_manifest

    cfg = json.loads((path / "config.json").read_text())
    fn(cfg)
    (path / "config.json").write_text(json.dumps(cfg))
    if record:
        write_manifest(path)


@pytest.mark.parametrize("field, value", [("mode", "swa"), ("combine", "shared_norm")])
def test_a_hand_edited_config_is_refused_naming_the_file(saved, field, value):
    edit_config(saved, lambda c: c["hybrid_config"].update({field: value}), record=False)
    for read in (load_student, __import__("models.checkpoint", fromlist=["x"]).read_student_settings):
        with pytest.raises(ValueError, match=r"s/config.json does not match .*xdistill-manifest.json.*rerun the stage"):
            read(saved)


def test_a_newer_format_version_is_refused(saved):
    edit_config(saved, lambda c: c.update(format_version=99))
    with pytest.raises(ValueError, match=r"'format_version' is 99; this xdistill reads versions 1..2.*upgrade"):
        load_student(saved)


def test_overwritten_weight_bytes_are_refused_before_they_load(saved):
    weights = saved / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-4000:] = b"\xff" * 4000  # same size: the safetensors header still parses, the values do not
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"model.safetensors does not match .*SHA-256 .*same size, different bytes"):
        load_student(saved)


def test_a_version_2_folder_without_its_manifest_is_refused(saved):
    (saved / "xdistill-manifest.json").unlink()
    with pytest.raises(ValueError, match=r"xdistill-manifest.json is missing.*cannot be verified"):
        load_student(saved)


def test_bad_hybrid_field_is_named(saved):
    edit_config(saved, lambda c: c["hybrid_config"].update(window=0))
    with pytest.raises(ValueError, match="window"):
        load_student(saved)


def test_unknown_hybrid_field_is_named(saved):
    edit_config(saved, lambda c: c["hybrid_config"].update(windw=3))
    with pytest.raises(ValueError, match="windw"):
        load_student(saved)


def test_config_that_does_not_match_weights_names_tensor(saved):
    edit_config(saved, lambda c: c["teacher_config"].update(intermediate_size=96))
    with pytest.raises(ValueError, match="mlp") as err:
        load_student(saved)
    assert "model.safetensors" in str(err.value) and "shape" in str(err.value)


def test_missing_and_broken_config(saved):
    (saved / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        load_student(saved)
    (saved / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_student(saved)


def test_missing_model_type_and_foreign_format(saved):
    edit_config(saved, lambda c: c["teacher_config"].pop("model_type"))
    with pytest.raises(ValueError, match="model_type"):
        load_student(saved)
    edit_config(saved, lambda c: c.update(format="something-else"))
    with pytest.raises(ValueError, match="format"):
        load_student(saved)


def test_truncated_weights_are_refused(saved):
    data = (saved / "model.safetensors").read_bytes()
    (saved / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors does not match .*truncated"):
        load_student(saved)


def test_folder_replacement_is_one_exchange_or_is_repaired_on_read(tmp_path, monkeypatch):
    import os

    import models.storage as st

    student = convert_to_hybrid(make_teacher("llama"), HybridConfig(window=8))
    target = save_student(student, tmp_path / "student")
    marker = lambda v: (lambda tmp: (tmp / "version").write_text(v))  # noqa: E731
    st.atomic_directory_write(target, marker("a"))
    # where the system offers it, old and new are swapped in one step: nothing else is left
    st.atomic_directory_write(target, marker("b"))
    assert (target / "version").read_text() == "b" and sorted(p.name for p in tmp_path.iterdir()) == ["student"]

    # without the exchange, a kill between the two renames leaves no folder under the name...
    save_student(student, target)
    monkeypatch.setattr(st, "exchange_paths", lambda a, b: False)
    real_replace, calls = os.replace, []

    def killed_on_second_rename(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed between the renames")
        real_replace(src, dst)

    monkeypatch.setattr(st.os, "replace", killed_on_second_rename)
    with pytest.raises(KeyboardInterrupt):
        save_student(student, target)
    monkeypatch.setattr(st.os, "replace", real_replace)
    assert not target.exists() and len(list(tmp_path.glob(".student.old-*"))) == 1
    # ...and the next reader puts the previous complete folder back
    ids = torch.randint(0, 97, (1, 12))
    with torch.no_grad():
        assert torch.equal(load_student(target)(ids).logits, student.eval()(ids).logits)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student"]
