"""Convert a teacher into a hybrid xLSTM student, save it, and show both answering a prompt.

    python -m experiments.convert --teacher smollm2-135m-instruct --out runs/smollm2-hybrid
    python -m experiments.convert --help        # every option, including --hybrid.window etc.
"""

from __future__ import annotations

import time

import torch
from jsonargparse import CLI

from models import HybridConfig, convert_to_hybrid, generate, load_teacher, load_tokenizer, save_student


def _prompt_ids(tokenizer, prompt: str) -> torch.Tensor:
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt")
        return ids if torch.is_tensor(ids) else ids["input_ids"]
    return tokenizer(prompt, return_tensors="pt")["input_ids"]


def convert(
    teacher: str = "smollm2-135m-instruct",
    out: str = "runs/smollm2-hybrid",
    hybrid: HybridConfig = HybridConfig(),
    prompt: str = "Explain in one sentence why the sky is blue.",
    max_new_tokens: int = 40,
    dtype: str = "float32",
    trust_remote_code: bool = False,
) -> str:
    """Convert ``teacher`` (hub id, local folder, or the embedded ``smollm2-135m-instruct``) and save
    the student to ``out`` (model.safetensors + config.json + tokenizer).

    Args:
        teacher: teacher to convert.
        out: folder for the saved student.
        hybrid: how attention layers become hybrid layers.
        prompt: a user message both models answer, to see what conversion alone keeps.
        max_new_tokens: length of both answers.
        dtype: parameter dtype (float32, bfloat16, float16).
        trust_remote_code: allow the teacher's own modelling code (off by default).
    """
    torch_dtype = getattr(torch, dtype)
    started = time.perf_counter()
    model = load_teacher(teacher, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    tokenizer = load_tokenizer(teacher, trust_remote_code=trust_remote_code)
    student = convert_to_hybrid(model, hybrid).eval()
    path = save_student(student, out, tokenizer=tokenizer)
    n_new = sum(p.numel() for _, p in student.new_parameters())
    print(f"student saved to {path} ({time.perf_counter() - started:.1f}s); "
          f"{n_new:,} new parameters on top of {sum(p.numel() for p in model.parameters()):,}")
    ids = _prompt_ids(tokenizer, prompt)
    eos = tokenizer.eos_token_id
    for name, m in (("teacher", model), ("student", student)):
        answer = generate(m, ids, max_new_tokens, eos_token_id=eos)[0, ids.shape[1]:]
        print(f"[{name}] {tokenizer.decode(answer, skip_special_tokens=True).strip()}")
    return str(path)


if __name__ == "__main__":
    CLI(convert, as_positional=False)
