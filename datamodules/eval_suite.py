"""The offline evaluation suite: lm-eval task YAMLs over local jsonl files, built deterministically.

Every item's answer is computed by the program that writes it (arithmetic, executing a generated
Python snippet, counting atoms, a planted key or pass key) or is the original text (cloze); no
answer comes from a model. Items use their own seed and templates, and the cloze task reads only
the Python documentation topics that ``is_eval_topic`` reserves for evaluation, so a training
corpus that skips those topics cannot overlap the suite.

Tasks (100 items each unless ``items`` says otherwise):
    xd_arith_mc        math      multiple choice  "What is 37 * 8?" with four candidate numbers
    xd_arith_gen       math      generation       the number, exact match
    xd_code_mc         code      multiple choice  what a short generated Python program prints
    xd_stem_mc         STEM      multiple choice  unit conversions, speed/distance/time, atom counts
    xd_instruct_gen    chat      generation       follow a checkable instruction (uppercase, repeat, first letter)
    xd_cloze_mc        general   multiple choice  the true next word of held-out documentation text
    xd_kv_retrieval    long ctx  generation       the value of one key among 48 key/value lines (~600 tokens)
    xd_passkey         long ctx  generation       a pass key planted in 360-1180 tokens of filler text
(The long-context tasks are generative: one long prefill per item instead of one per choice.)
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import random
import re
from pathlib import Path

SUITE_VERSION = 4
TASKS = ("xd_arith_mc", "xd_arith_gen", "xd_code_mc", "xd_stem_mc", "xd_instruct_gen", "xd_cloze_mc",
         "xd_kv_retrieval", "xd_passkey")
DOMAINS = {"xd_arith_mc": "math", "xd_arith_gen": "math", "xd_code_mc": "code", "xd_stem_mc": "stem",
           "xd_instruct_gen": "chat", "xd_cloze_mc": "general", "xd_kv_retrieval": "long-context",
           "xd_passkey": "long-context"}
SEED = 20261123


def is_eval_topic(name: str) -> bool:
    """Python documentation topics reserved for evaluation (one in five, by a stable hash)."""
    return int(hashlib.sha256(name.encode()).hexdigest(), 16) % 5 == 0


def _choices(rng: random.Random, answer: int, spread: int = 10) -> tuple[list[str], int]:
    options = {answer}
    while len(options) < 4:
        delta = rng.randint(1, spread) * rng.choice([-1, 1])
        options.add(answer + delta)
    options = sorted(options, key=lambda _: rng.random())
    return [f" {o}" for o in options], options.index(answer)


def _arith(rng):
    op = rng.choice(["+", "-", "*"])
    a, b = (rng.randint(10, 99), rng.randint(2, 9)) if op == "*" else (rng.randint(10, 999), rng.randint(10, 999))
    return a, op, b, {"+": a + b, "-": a - b, "*": a * b}[op]


def arith_mc(rng):
    a, op, b, ans = _arith(rng)
    choices, label = _choices(rng, ans)
    return {"question": f"Question: What is {a} {op} {b}?\nAnswer:", "choices": choices, "label": label}


def arith_gen(rng):
    a, op, b, ans = _arith(rng)
    return {"question": f"Question: What is {a} {op} {b}? Answer with the number only.\nAnswer:", "answer": str(ans)}


def code_mc(rng):
    start, n, mul, sub = rng.randint(1, 9), rng.randint(2, 5), rng.randint(2, 3), rng.randint(0, 3)
    kind = rng.choice(["loop", "list", "string"])
    if kind == "loop":
        src = f"x = {start}\nfor i in range({n}):\n    x = x * {mul} - {sub}\nprint(x)"
    elif kind == "list":
        src = f"values = [i * {mul} for i in range({n + 2})]\nprint(sum(values) - {sub})"
    else:
        word = rng.choice(["python", "kernel", "matrix", "tensor", "window", "memory"])
        src = f"word = {word!r}\nprint(len(word) * {mul} + word.count({word[1]!r}))"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(src, "<xd_code_mc>", "exec"), {})  # our own generated program: the ground truth
    ans = int(out.getvalue().strip())
    choices, label = _choices(rng, ans, spread=max(3, abs(ans) // 4))
    return {"question": f"What does this Python program print?\n\n{src}\n\nAnswer:", "choices": choices, "label": label}


ATOMS = {"C": "carbon", "H": "hydrogen", "O": "oxygen", "N": "nitrogen"}


def stem_mc(rng):
    kind = rng.choice(["convert", "speed", "atoms"])
    if kind == "convert":
        value, (unit, big, factor) = rng.randint(2, 90), rng.choice([("metres", "kilometres", 1000),
                                                                     ("minutes", "hours", 60),
                                                                     ("grams", "kilograms", 1000),
                                                                     ("seconds", "minutes", 60)])
        q, ans = f"How many {unit} are there in {value} {big}?", value * factor
    elif kind == "speed":
        speed, hours = rng.randint(20, 120), rng.randint(2, 6)
        q, ans = f"A train moves at a constant {speed} km per hour for {hours} hours. How many km does it travel?", speed * hours
    else:
        counts = {"C": rng.randint(1, 6), "H": rng.randint(2, 14), "O": rng.randint(0, 3), "N": rng.randint(0, 2)}
        formula = "".join(f"{el}{c if c > 1 else ''}" for el, c in counts.items() if c)
        el = rng.choice([e for e, c in counts.items() if c])
        q, ans = f"How many {ATOMS[el]} atoms are in one molecule of {formula}?", counts[el]
    choices, label = _choices(rng, ans, spread=max(2, ans // 5))
    return {"question": f"Question: {q}\nAnswer:", "choices": choices, "label": label}


WORDS = ["river", "garden", "planet", "yellow", "bridge", "silver", "forest", "window", "candle", "rocket",
         "button", "pencil", "orange", "castle", "winter", "mirror", "tunnel", "basket", "dragon", "violin"]


def instruct_gen(rng):
    word = rng.choice(WORDS)
    kind = rng.choice(["upper", "repeat", "first"])
    if kind == "upper":
        instruction, answer = f"Write the word '{word}' in capital letters.", word.upper()
    elif kind == "repeat":
        n = rng.randint(2, 4)
        instruction, answer = f"Repeat the word '{word}' {n} times, separated by spaces.", " ".join([word] * n)
    else:
        instruction, answer = f"What is the first letter of the word '{word}'? Reply with the letter only.", word[0]
    return {"question": f"Instruction: {instruction}\nResponse:", "answer": answer}


def _cloze_items(rng, n):
    import pydoc_data.topics as topics

    text = " ".join(topics.topics[name] for name in sorted(topics.topics) if is_eval_topic(name))
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", re.sub(r"\s+", " ", text))]
    sentences = [s for s in sentences if 8 <= len(s.split()) <= 50 and re.fullmatch(r"[A-Za-z0-9 ,.;:'\"()-]+", s)]
    vocab = sorted({w for s in sentences for w in s.split() if w.isalpha() and len(w) > 3})
    items = []
    for s in rng.sample(sentences, len(sentences)):
        if len(items) == n:
            break
        words = s.rstrip(".").split()
        cut = rng.randint(len(words) // 2, len(words) - 1)
        target = words[cut]
        if not target.isalpha():
            continue
        options = {target}
        while len(options) < 4:
            options.add(rng.choice(vocab))
        options = sorted(options, key=lambda _: rng.random())
        items.append({"question": " ".join(words[:cut]), "choices": [f" {o}" for o in options],
                      "label": options.index(target)})
    return items


def kv_retrieval(rng):
    keys = rng.sample(range(1000, 9999), 48)
    values = [rng.randint(100, 999) for _ in keys]
    lines = "\n".join(f"key {k}: {v}" for k, v in zip(keys, values))
    i = rng.randrange(len(keys))
    return {"question": f"Here is a list of keys and their values.\n{lines}\n\nQuestion: What is the value of key {keys[i]}?\n"
                        f"Answer: The value of key {keys[i]} is",
            "answer": str(values[i])}


FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")


def passkey(rng):
    key = rng.randint(10000, 99999)
    before, after = rng.randint(6, 24), rng.randint(6, 24)
    text = FILLER * before + f"The pass key is {key}. Remember it. {key} is the pass key. " + FILLER * after
    return {"question": f"There is important information hidden in this text. Find it.\n{text}\nQuestion: What is the pass key?\n"
                        "Answer: The pass key is",
            "answer": str(key)}


def _mc_yaml(task, path):
    return {"task": task, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(path)}},
            "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "{{question}}",
            "doc_to_choice": "choices", "doc_to_target": "label",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
            "metadata": {"version": SUITE_VERSION, "domain": DOMAINS[task]}}


NUMBER_FILTER = [{"function": "regex", "regex_pattern": r"(-?\d+)"}, {"function": "take_first"}]
STRIP_FILTER = [{"function": "regex", "regex_pattern": r"^\s*(.*?)\s*$"}, {"function": "take_first"}]


def _gen_yaml(task, path, max_gen_toks, num_fewshot=0, numeric=False):
    return {"task": task, "num_fewshot": num_fewshot, "fewshot_delimiter": "\n\n", "target_delimiter": " ", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(path)}},
            "test_split": "test", "output_type": "generate_until", "doc_to_text": "{{question}}",
            "doc_to_target": "{{answer}}",
            "generation_kwargs": {"until": ["\n"], "max_gen_toks": max_gen_toks, "do_sample": False},
            # numeric answers: the first number generated (as GSM8K-style tasks grade); text: stripped
            "filter_list": [{"name": "number" if numeric else "strip", "filter": NUMBER_FILTER if numeric else STRIP_FILTER}],
            "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                             "ignore_case": False, "ignore_punctuation": False}],
            "metadata": {"version": SUITE_VERSION, "domain": DOMAINS[task]}}


def build_suite(out_dir, items: int = 100) -> Path:
    """Write every task's jsonl and YAML under ``out_dir`` (idempotent); returns the folder to give
    lm-eval as ``include_path``."""
    import yaml

    out = Path(out_dir) / f"v{SUITE_VERSION}-{items}"
    if (out / "complete").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    makers = {"xd_arith_mc": arith_mc, "xd_arith_gen": arith_gen, "xd_code_mc": code_mc, "xd_stem_mc": stem_mc,
              "xd_instruct_gen": instruct_gen, "xd_kv_retrieval": kv_retrieval, "xd_passkey": passkey}
    for index, task in enumerate(TASKS):
        rng = random.Random(SEED * 100 + index)
        rows = _cloze_items(rng, items) if task == "xd_cloze_mc" else [makers[task](rng) for _ in range(items)]
        data = out / f"{task}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        # the short generative tasks show three solved items first, so the answer format is clear;
        # the long-context prompts end in a sentence the answer completes instead
        spec = (_mc_yaml(task, data) if "choices" in rows[0]
                else _gen_yaml(task, data, 24 if task == "xd_instruct_gen" else 8,
                               num_fewshot=3 if task in ("xd_arith_gen", "xd_instruct_gen") else 0,
                               numeric=task != "xd_instruct_gen"))
        (out / f"{task}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    (out / "complete").write_text("ok")
    return out
