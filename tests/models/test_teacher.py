"""Teachers with their own modelling code are refused unless the user turns trust_remote_code on:
the code in the folder never runs by default."""

import json

import pytest

from models import load_teacher
from tests.conftest import make_teacher

CUSTOM_CODE = '''
import pathlib
pathlib.Path({marker!r}).write_text("the folder's code ran")
from transformers import LlamaConfig, LlamaForCausalLM

class CustomConfig(LlamaConfig):
    model_type = "xd-custom"

class CustomModel(LlamaForCausalLM):
    config_class = CustomConfig
'''


def test_remote_code_runs_only_when_the_user_allows_it(tmp_path):
    folder, marker = tmp_path / "custom", tmp_path / "ran.txt"
    make_teacher("llama").save_pretrained(str(folder))
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="xd-custom", architectures=["CustomModel"],
                  auto_map={"AutoConfig": "custom.CustomConfig", "AutoModelForCausalLM": "custom.CustomModel"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "custom.py").write_text(CUSTOM_CODE.format(marker=str(marker)))
    with pytest.raises(ValueError, match=rf"teacher {folder} ships its own modelling code.*trust_remote_code true"):
        load_teacher(str(folder))
    assert not marker.exists()
    with pytest.raises(ValueError):  # allowed: the code runs, then the unknown family is refused by name
        load_teacher(str(folder), trust_remote_code=True)
    assert marker.exists()


def test_a_teacher_source_is_checked_for_what_it_will_be_read_from(tmp_path):
    from models.teacher import check_teacher_source

    (tmp_path / "gguf").mkdir()
    (tmp_path / "gguf" / "model.Q4.gguf").write_bytes(b"GGUF")
    assert check_teacher_source(tmp_path / "gguf", "model.Q4.gguf") == str(tmp_path / "gguf")  # no config.json needed
    with pytest.raises(FileNotFoundError, match=r"has no other.gguf \(gguf_file\)"):
        check_teacher_source(tmp_path / "gguf", "other.gguf")
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        check_teacher_source(tmp_path / "gguf")
    for hub_id in ("HuggingFaceTB/SmolLM2-135M-Instruct", "gpt2", "smollm2-135m-instruct"):
        assert check_teacher_source(hub_id) == hub_id  # left to the hub (or the embedded default)
    with pytest.raises(ValueError, match="is a file, not a model folder"):
        check_teacher_source(tmp_path / "gguf" / "model.Q4.gguf")
