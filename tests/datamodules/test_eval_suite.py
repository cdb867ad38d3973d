"""The offline suite: enough items, answers recomputed independently, long contexts really long."""

import contextlib
import io
import json
import re

import pytest

from datamodules.eval_suite import TASKS, build_suite, is_eval_topic


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    folder = build_suite(tmp_path_factory.mktemp("suite"))
    return {t: [json.loads(line) for line in (folder / f"{t}.jsonl").open()] for t in TASKS}, folder


def answer_of(item):
    return item["choices"][item["label"]].strip() if "choices" in item else item["answer"]


def test_every_task_has_100_items_and_a_yaml(suite):
    items, folder = suite
    assert len(TASKS) >= 6
    for task in TASKS:
        assert len(items[task]) >= 100, task
        assert (folder / f"{task}.yaml").is_file()
    kinds = {("choices" in items[t][0]) for t in TASKS}
    assert kinds == {True, False}  # both multiple-choice and generative tasks


def test_arithmetic_answers(suite):
    items, _ = suite
    for task in ("xd_arith_mc", "xd_arith_gen"):
        for item in items[task]:
            a, op, b = re.search(r"What is (\d+) ([+*-]) (\d+)\?", item["question"]).groups()
            assert int(answer_of(item)) == {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]


def test_code_answers_by_running_the_programs(suite):
    items, _ = suite
    for item in items["xd_code_mc"]:
        program = item["question"].split("\n\n")[1]
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(program, {})
        assert out.getvalue().strip() == answer_of(item)
        assert len(set(item["choices"])) == 4


def test_stem_answers(suite):
    items, _ = suite
    factors = {("metres", "kilometres"): 1000, ("minutes", "hours"): 60, ("grams", "kilograms"): 1000,
               ("seconds", "minutes"): 60}
    for item in items["xd_stem_mc"]:
        q, ans = item["question"], int(answer_of(item))
        if m := re.search(r"How many (\w+) are there in (\d+) (\w+)\?", q):
            assert ans == int(m.group(2)) * factors[(m.group(1), m.group(3))]
        elif m := re.search(r"constant (\d+) km per hour for (\d+) hours", q):
            assert ans == int(m.group(1)) * int(m.group(2))
        else:
            name, formula = re.search(r"How many (\w+) atoms are in one molecule of (\w+)\?", q).groups()
            symbol = {"carbon": "C", "hydrogen": "H", "oxygen": "O", "nitrogen": "N"}[name]
            counts = {el: int(n or 1) for el, n in re.findall(r"([CHON])(\d*)", formula)}
            assert ans == counts[symbol]


def test_instruction_answers(suite):
    items, _ = suite
    for item in items["xd_instruct_gen"]:
        q = item["question"]
        word = re.search(r"'(\w+)'", q).group(1)
        if "capital letters" in q:
            assert item["answer"] == word.upper()
        elif m := re.search(r"(\d) times", q):
            assert item["answer"] == " ".join([word] * int(m.group(1)))
        else:
            assert item["answer"] == word[0]


def test_cloze_answers_are_the_held_out_text(suite):
    import pydoc_data.topics as topics

    held_out = re.sub(r"\s+", " ", " ".join(v for k, v in topics.topics.items() if is_eval_topic(k)))
    items, _ = suite
    for item in items["xd_cloze_mc"]:
        assert item["question"] + item["choices"][item["label"]] in held_out
    assert 0 < sum(map(is_eval_topic, topics.topics)) < len(topics.topics) / 3


def test_long_context_answers_and_lengths(suite):
    items, _ = suite
    for item in items["xd_kv_retrieval"]:
        pairs = dict(re.findall(r"key (\d+): (\d+)", item["question"]))
        asked = re.search(r"value of key (\d+)\?", item["question"]).group(1)
        assert pairs[asked] == item["answer"] and len(pairs) == 48
    for item in items["xd_passkey"]:
        key = re.search(r"The pass key is (\d+)\.", item["question"]).group(1)
        assert item["question"].endswith("The pass key is")
        assert answer_of(item) == key


@pytest.mark.slow
def test_long_contexts_are_several_windows_long_in_real_tokens(suite):
    from models import EMBEDDED_TEACHER, load_tokenizer

    tokenizer = load_tokenizer(EMBEDDED_TEACHER)
    items, _ = suite
    for task in ("xd_kv_retrieval", "xd_passkey"):
        shortest = min(len(tokenizer(item["question"])["input_ids"]) for item in items[task])
        assert shortest >= 5 * 64, (task, shortest)  # >= 5 default 64-token windows
