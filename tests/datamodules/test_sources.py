"""Data sources name every parsing failure by file and line (or record) and what was expected;
records without text are refused, or skipped and counted with ``allow_missing_text``."""

import json

import pytest

from datamodules import DataSource, TextDataModule
from tests.fixtures import write_teacher


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    root = tmp_path_factory.mktemp("sources")
    write_teacher(root / "teacher")
    return root / "teacher"


def setup_with(teacher, tmp_path, source: DataSource, streaming=False):
    dm = TextDataModule(tokenizer=str(teacher), sources=[source], seq_len=8, batch_size=1,
                        cache_dir=str(tmp_path / "cache"), streaming=streaming)
    dm.setup("fit")
    if streaming:
        return list(dm.train_set)
    return dm


def lines(*records) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records)


GOOD = {"text": "alpha beta gamma delta epsilon zeta eta theta iota kappa"}
CHAT = {"messages": [{"role": "user", "content": "alpha beta"}, {"role": "assistant", "content": "gamma delta"}]}


@pytest.mark.parametrize("content, fmt, expected", [
    (b"", "text", r"data.jsonl has no records \(the file is empty or blank\)"),
    (b"\n  \n", "text", r"data.jsonl has no records"),
    (lines(GOOD).encode() + b'{"text": "caf\xe9"}\n', "text",
     r"data.jsonl, line 2: byte 0xe9 at column 14 is not UTF-8; re-encode the file as UTF-8"),
    (lines(GOOD, GOOD, '{"text": "unterminated}').encode(), "text",
     r"data.jsonl, line 3: not valid JSON: .* \(column 24\); each line of a .jsonl file must be one JSON object"),
    (lines(GOOD, ["a", "list"]).encode(), "text", r"data.jsonl, line 2: a JSON list, expected an object with field 'text'"),
    (lines(GOOD, {"body": "x"}).encode(), "text",
     r"data.jsonl, line 2: field 'text' is missing \(fields: 'body'\); set DataSource.text_field .*allow_missing_text"),
    (lines(GOOD, {"text": 3}).encode(), "text", r"line 2: field 'text' is a int, not a string"),
    (lines(CHAT, {"conversation": []}).encode(), "chat",
     r"data.jsonl, line 2: field 'messages' is missing; format 'chat' expects a non-empty list"),
    (lines({"messages": [{"content": "hi"}]}).encode(), "chat",
     r"data.jsonl, line 1: message 0 has 'role' missing; every message needs 'role' and 'content' strings"),
    (lines({"messages": ["hi"]}).encode(), "chat", r"line 1: message 0 is a str, expected an object"),
])
def test_a_bad_file_is_named_with_its_line_and_what_was_expected(teacher, tmp_path, content, fmt, expected):
    path = tmp_path / "data.jsonl"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=expected) as err:
        setup_with(teacher, tmp_path, DataSource(str(path), format=fmt))
    assert str(path) in str(err.value) and "data source 'data'" in str(err.value)


def test_a_json_array_file_names_the_record(teacher, tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps([GOOD, GOOD, {"txt": "x"}], indent=2))
    with pytest.raises(ValueError, match=r"data.json, record 3: field 'text' is missing"):
        setup_with(teacher, tmp_path, DataSource(str(path)))
    path.write_text(json.dumps({"txt": "x"}, indent=2))  # one pretty-printed record
    with pytest.raises(ValueError, match=r"data.json, record 1: field 'text' is missing"):
        setup_with(teacher, tmp_path, DataSource(str(path)))


def test_records_without_text_are_skipped_and_counted_only_when_allowed(teacher, tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(lines(GOOD, {"title": "no body"}, GOOD, {"text": None}, {"text": ""}, GOOD))
    with pytest.raises(ValueError, match=r"line 2: field 'text' is missing"):
        setup_with(teacher, tmp_path, DataSource(str(path)))
    with pytest.warns(UserWarning, match=r"data source 'data' \(.*data.jsonl\): skipped 2 without a string 'text' "
                                         r"\(first at line 2; allow_missing_text\) and 1 with an empty 'text' of 6"):
        dm = setup_with(teacher, tmp_path, DataSource(str(path), allow_missing_text=True))
    assert len(dm.train_set) + len(dm.val_set) > 0


def test_streaming_names_the_record_it_cannot_use(teacher, tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(lines(CHAT, CHAT, {"messages": [{"role": "user"}]}))
    with pytest.raises(ValueError, match=r"data source 'chat' \(.*chat.jsonl\), record 2: message 0 has 'content' missing"):
        setup_with(teacher, tmp_path, DataSource(str(path), format="chat"), streaming=True)


def test_a_txt_file_with_a_bad_byte_is_named(teacher, tmp_path):
    path = tmp_path / "notes.txt"
    path.write_bytes(b"first line\nsecond \xff line\n")
    with pytest.raises(ValueError, match=r"notes.txt, line 2: byte 0xff at column 8 is not UTF-8"):
        setup_with(teacher, tmp_path, DataSource(str(path)))
