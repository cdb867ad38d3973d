"""The offline suite: answers recomputed independently, no repeated item, one space before the
answer, needles planted far outside any window shorter than half the context."""

import json
import re

import pytest

from datamodules.eval_suite import (NUMBER_WORDS, TASKS, SuiteSize, asked, build_suite, is_eval_file, is_eval_topic,
                                    needle_task, reserved_code_files, task_info)

SIZE = SuiteSize(mc_items=120, gen_items=60, needle_items=4, needle_lengths=[128, 256])


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    from tests.fixtures import make_tokenizer

    folder = build_suite(tmp_path_factory.mktemp("suite"), SIZE, make_tokenizer())
    tasks = SIZE.tasks()
    return {t: [json.loads(line) for line in (folder / f"{t}.jsonl").open()] for t in tasks}, folder


def answer_of(item):
    return item["choices"][item["label"]] if "choices" in item else item["answer"]


def test_every_task_has_its_items_a_yaml_and_no_repeats(suite):
    items, folder = suite
    for task in SIZE.tasks():
        want = SIZE.needle_items if task.startswith("xd_needle_") else SIZE.gen_items if task.endswith("_gen") else SIZE.mc_items
        assert len(items[task]) == want, task
        identity = (lambda i: i["answer"]) if task.startswith("xd_needle_") else (lambda i: asked(i["question"]))
        assert len({identity(i) for i in items[task]}) == want, task  # no item asked twice
        assert (folder / f"{task}.yaml").is_file()


def test_one_space_between_prompt_and_answer(suite):
    import yaml

    items, folder = suite
    for task in TASKS:
        spec = yaml.safe_load((folder / f"{task}.yaml").read_text())
        delimiter = spec.get("target_delimiter", " ")
        for item in items[task]:
            joined = item["question"] + delimiter + answer_of(item)
            assert "  " not in joined[len(item["question"]) - 1:len(item["question"]) + 2] or task == "xd_code_mc", task
            if "choices" in item:
                assert all(not c.startswith(" ") for c in item["choices"]), task
        if task == "xd_code_mc":
            assert delimiter == ""  # the identifier follows the code directly
        else:
            assert delimiter == " "


def test_lm_eval_requests_put_one_space_before_the_answer(suite):
    """What lm-eval itself sends the model (its target delimiter applies to multiple choice only)."""
    from lm_eval.tasks import TaskManager, get_task_dict

    items, folder = suite
    tasks = get_task_dict(SIZE.tasks(), TaskManager(include_path=str(folder), include_defaults=False))
    for name, task in tasks.items():
        doc = next(iter(task.test_docs()))
        if task.OUTPUT_TYPE == "generate_until":
            assert not task.doc_to_text(doc).endswith(" "), name  # the model writes the answer's space
            continue
        requests = task.construct_requests(doc, task.doc_to_text(doc), metadata=(name, 0, 1))
        requests = requests if isinstance(requests, list) else [requests]
        for request in requests:
            context, continuation = request.args
            if name == "xd_code_mc":  # the identifier follows the code directly, as written in it
                assert not continuation.startswith(" "), name
            else:
                assert not context.endswith(" "), name
                assert continuation.startswith(" ") and not continuation.startswith("  "), (name, continuation)
        if name.startswith("xd_needle_"):
            assert requests[0].args[1] == " " + doc["answer"]


def test_arithmetic_answers(suite):
    items, _ = suite
    value = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
    for item in items["xd_arith_mc"]:
        *shown, last = item["question"].split("\n\n")
        a, op, b = re.fullmatch(r"Question: What is (\d+) ([+*-]) (\d+)\?\nAnswer:", last).groups()
        assert int(answer_of(item)) == value[op](int(a), int(b))
        assert len(set(item["choices"])) == 4
        assert len(shown) == 2  # two solved problems, correct, and not the one asked
        for paragraph in shown:
            sa, sop, sb, sans = re.fullmatch(r"Question: What is (\d+) ([+*-]) (\d+)\?\nAnswer: (-?\d+)", paragraph).groups()
            assert int(sans) == value[sop](int(sa), int(sb)) and (sa, sop, sb) != (a, op, b)
    for item in items["xd_arith_gen"]:
        a, b = re.search(r"What is (\d+) times (\d+)\?", item["question"]).groups()
        assert int(item["answer"]) == int(a) * int(b)


def test_code_items_are_the_next_identifier_of_reserved_files(suite):
    import sysconfig
    from pathlib import Path

    root = Path(sysconfig.get_paths()["stdlib"])
    items, _ = suite
    for item in items["xd_code_mc"]:
        assert is_eval_file(item["file"])
        text = "\n".join(line.rstrip() for line in (root / item["file"]).read_text().splitlines() if line.strip())
        assert item["question"] + answer_of(item) in text
        assert len(set(item["choices"])) == 4
    assert reserved_code_files()


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
    def expected(instruction):
        """(kind, answer) recomputed from the instruction's words."""
        if m := re.search(r"'(\w+)' in lowercase", instruction):
            return "lower", m.group(1).lower()
        if m := re.search(r"plural of the word '(\w+)'", instruction):
            return "plural", m.group(1) + "s"
        if m := re.search(r"number '(\w+)' as a digit", instruction):
            return "digit", str(NUMBER_WORDS.index(m.group(1)))
        return "word", NUMBER_WORDS[int(re.fullmatch(r"Write the number (\d+) as a word\.", instruction).group(1))]

    for item in items["xd_instruct_gen"]:
        *shown, last = item["question"].split("\n\n")
        kind, answer = expected(re.fullmatch(r"Instruction: (.+)\nResponse:", last).group(1))
        assert item["answer"] == answer
        assert len(shown) == 2
        for paragraph in shown:  # solved examples of the same kind, correct, other than the item
            instruction, response = re.fullmatch(r"Instruction: (.+)\nResponse: (\S+)", paragraph).groups()
            assert expected(instruction) == (kind, response) and paragraph.split("\n")[0] != last.split("\n")[0]


def test_cloze_answers_are_the_held_out_text(suite):
    import pydoc_data.topics as topics

    held_out = re.sub(r"\s+", " ", " ".join(v for k, v in topics.topics.items() if is_eval_topic(k)))
    items, _ = suite
    for item in items["xd_cloze_mc"]:
        assert item["question"] + " " + answer_of(item) in held_out
    assert 0 < sum(map(is_eval_topic, topics.topics)) < len(topics.topics) / 3


def test_needles_are_far_from_the_question_and_past_the_sinks(suite):
    from tests.fixtures import make_tokenizer

    tokenizer = make_tokenizer()
    items, _ = suite
    for length in SIZE.needle_lengths:
        for item in items[needle_task(length)]:
            prompt = item["question"]
            key = re.search(r"The secret number is (\d{5})\.", prompt).group(1)
            assert key == item["answer"] and prompt.endswith("Answer: The secret number is")
            before, _, after = prompt.partition(f"The secret number is {key}.")
            tokens_after = len(tokenizer(after, add_special_tokens=False)["input_ids"])
            assert tokens_after >= length // 2 - 2  # well outside any window shorter than length / 2
            assert len(tokenizer(before, add_special_tokens=False)["input_ids"]) >= 12  # past the sink tokens
            assert len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) >= length


def test_task_info_and_refusals():
    assert task_info("xd_arith_mc") == {"domain": "math", "kind": "loglikelihood", "chance": 0.25}
    assert task_info("xd_needle_512")["chance"] == 0.0 and task_info("xd_arith_gen")["kind"] == "generation"
    with pytest.raises(ValueError, match="xd_unknown"):
        task_info("xd_unknown")
    with pytest.raises(ValueError, match="mc_items"):
        SuiteSize(mc_items=0)
    with pytest.raises(ValueError, match="xd_arith_gen has only 121 distinct items"):
        build_suite("/tmp/never-written", SuiteSize(gen_items=200))
