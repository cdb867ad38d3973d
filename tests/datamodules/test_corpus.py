"""The offline corpus: math answers recomputed, the eval suite kept out, teacher answers equal the
teacher's own generation, the build is cached and resumes per domain."""

import json
import re

import pytest
import torch

from datamodules import corpus as C
from datamodules.eval_suite import build_suite, is_eval_topic
from tests.fixtures import write_teacher

TINY = C.CorpusConfig(code_files=3, code_max_chars=1500, general_max_topics=6, math_problems=40, stem_prompts=3,
                      chat_prompts=2, answer_tokens=6, generation_batch_size=2, temperature=0.0)


def _recompute(question: str) -> int:
    """An independent solver for the generator's question forms."""
    nums = [int(n) for n in re.findall(r"\d+", question)]
    if "times" in question:
        return nums[0] * nums[1]
    if "sum of" in question:
        return nums[0] + nums[1]
    if "minus" in question:
        return nums[0] - nums[1]
    if "buys" in question:
        return nums[0] + nums[1] * nums[2]
    if "change" in question:
        price, paid, count = nums
        return paid - price * count
    if "shared equally" in question:
        return nums[0] // nums[1]
    if "percent" in question:
        return nums[0] * nums[1] // 100
    if "rectangle" in question:
        return nums[0] * nums[1]
    raise AssertionError(f"unknown question form: {question}")


def test_math_answers_are_right_and_avoid_the_suite_expressions():
    docs = C.math_documents(400, seed=3)
    for doc in docs:
        question, answer = doc["messages"][0]["content"], doc["messages"][1]["content"]
        assert answer.endswith(f"The answer is {_recompute(question)}."), (question, answer)
    # the suite's arithmetic, read back from its own files
    from models.storage import cache_dir

    suite = build_suite(cache_dir() / "eval_suite")
    asked = set()
    for task in ("xd_arith_mc", "xd_arith_gen"):
        for line in (suite / f"{task}.jsonl").read_text().splitlines():
            for a, op, b in re.findall(r"What is (-?\d+) ([-+*]|times) (-?\d+)\?", json.loads(line)["question"]):
                asked.add((int(a), "*" if op == "times" else op, int(b)))
    assert C.suite_arithmetic() == asked
    words = {"times": "*", "sum of": "+", "minus": "-"}
    for doc in docs:
        q = doc["messages"][0]["content"]
        for word, op in words.items():
            if word in q and "buys" not in q:
                a, b = map(int, re.findall(r"\d+", q)[:2])
                assert (a, op, b) not in asked


def test_general_text_skips_eval_topics_and_code_is_the_stdlib():
    docs = C.general_documents()
    import pydoc_data.topics as topics

    assert docs and all(not is_eval_topic(d["topic"]) for d in docs)
    assert len(docs) == sum(not is_eval_topic(n) for n in topics.topics)
    code = C.code_documents(5, 2000, seed=1)
    assert code == C.code_documents(5, 2000, seed=1) and len(code) == 5
    import sysconfig
    from pathlib import Path

    from datamodules.eval_suite import is_eval_file

    for doc in C.code_documents(60, 2000, seed=1):  # the suite's code files never train
        assert not is_eval_file(doc["file"])
    for doc in code:
        assert not doc["file"].startswith(("test", "_")) and len(doc["text"]) <= 2000
        real = (Path(sysconfig.get_paths()["stdlib"]) / doc["file"]).read_text()
        assert real.startswith(doc["text"])


def test_overlap_detection_removes_a_planted_cloze_sentence():
    signatures = C._suite_signatures()
    task, cloze = next(s for s in signatures if s[0] == "xd_cloze_mc")
    docs = [{"text": f"A harmless first sentence. {cloze} more words. A harmless last sentence."},
            {"text": "Nothing from the suite here."},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": f"so {cloze} indeed"}]}]
    assert {i for i, _ in C.eval_overlaps(docs, signatures)} == {0, 2}
    kept, removed = C._drop_overlaps(docs, signatures)
    assert removed == 2 and len(kept) == 2
    assert "harmless first" in kept[0]["text"] and cloze not in kept[0]["text"]
    assert not C.eval_overlaps(kept, signatures)


@pytest.fixture(scope="module")
def tiny_teacher_dir(tmp_path_factory):
    return write_teacher(tmp_path_factory.mktemp("corpus") / "teacher")


def test_teacher_answers_equal_the_teachers_own_generation(tiny_teacher_dir):
    from models import load_teacher, load_tokenizer

    teacher, tok = load_teacher(str(tiny_teacher_dir)), load_tokenizer(str(tiny_teacher_dir))
    prompts = ["w1 w2 w3", "w4", "w5 w6"]  # different lengths: batched with left padding
    rows = C.teacher_answers(teacher, tok, prompts, TINY, "test")
    for prompt, row in zip(prompts, rows):
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      tokenize=True, return_tensors="pt")
        ids = ids if torch.is_tensor(ids) else ids["input_ids"]
        alone = teacher.generate(ids, max_new_tokens=TINY.answer_tokens, do_sample=False,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
        if tok.eos_token_id in alone:
            alone = alone[: alone.index(tok.eos_token_id)]
        expected = tok.decode(alone, skip_special_tokens=True).strip()
        assert row["messages"][0]["content"] == prompt
        assert row["messages"][1]["content"] == C._complete_sentences(expected) or row["messages"][1]["content"] == expected


def test_build_is_cached_and_resumes_at_the_missing_domain(tiny_teacher_dir, tmp_path):
    out = C.build_corpus(str(tiny_teacher_dir), TINY, tmp_path / "corpus")
    manifest = C.read_manifest(out)
    assert set(manifest["domains"]) == set(C.DOMAINS)
    for domain, info in manifest["domains"].items():
        rows = [json.loads(line) for line in (out / info["file"]).read_text().splitlines()]
        assert len(rows) == info["documents"] and info["tokens"] > 0 and info["licence"]
        assert info["format"] == ("chat" if "messages" in rows[0] else "text")
        assert not C.eval_overlaps(rows)
    assert manifest["domains"]["math"]["documents"] == TINY.math_problems
    stamps = {d: (out / f"{d}.jsonl").stat().st_mtime_ns for d in C.DOMAINS}
    assert C.build_corpus(str(tiny_teacher_dir), TINY, tmp_path / "corpus") == out
    # a build killed while answering chat prompts: chat and the manifest are missing
    (out / "chat.jsonl").unlink()
    (out / C.MANIFEST).unlink()
    C.build_corpus(str(tiny_teacher_dir), TINY, tmp_path / "corpus")
    assert C.read_manifest(out)["domains"] == manifest["domains"] | {"chat": C.read_manifest(out)["domains"]["chat"]}
    for d in C.DOMAINS:
        if d != "chat":
            assert (out / f"{d}.jsonl").stat().st_mtime_ns == stamps[d], d
    assert (out / "chat.jsonl").read_text().count("\n") == manifest["domains"]["chat"]["documents"]
    # the same folder for other settings is refused, not silently reused
    other = C.CorpusConfig(**{**C.asdict(TINY), "math_problems": 41})
    with pytest.raises(ValueError, match="other settings"):
        C.build_corpus(str(tiny_teacher_dir), other, tmp_path / "corpus")


def test_bad_corpus_settings_and_missing_corpus_are_named(tmp_path):
    with pytest.raises(ValueError, match="math_problems"):
        C.CorpusConfig(math_problems=-1)
    with pytest.raises(FileNotFoundError, match="experiments.corpus"):
        C.read_manifest(tmp_path)
