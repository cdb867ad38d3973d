"""Where text comes from: local json/jsonl/parquet/txt files or Hugging Face hub datasets."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

FORMATS = ("text", "chat")
LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text"}


@dataclass
class DataSource:
    """One corpus of a mixture."""

    path: str
    """A local file or folder (.json, .jsonl, .parquet, .txt) or a Hugging Face hub dataset name."""
    name: str | None = None
    """Label of the source (its domain), used in logs; default: the file name."""
    format: str = "text"
    """``text``: plain documents; ``chat``: conversations rendered with the tokenizer's chat template,
    loss on assistant tokens only."""
    text_field: str = "text"
    """Column with the document text (format text)."""
    messages_field: str = "messages"
    """Column with a list of {role, content} messages (format chat)."""
    split: str = "train"
    """Split to read."""
    subset: str | None = None
    """Hub dataset configuration name."""
    weight: float = 1.0
    """Share of this source in the training mixture (relative to the others)."""
    max_documents: int | None = None
    """Read at most this many documents."""
    allow_missing_text: bool = False
    """Skip records whose ``text_field`` is missing or not a string (counted and reported) instead of
    refusing the source; empty strings are always skipped and counted."""

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ValueError(f"DataSource.format={self.format!r} is not supported; allowed values: {', '.join(FORMATS)}")
        if self.weight < 0:
            raise ValueError(f"DataSource.weight={self.weight} is invalid; allowed values: >= 0")

    @property
    def label(self) -> str:
        return self.name or Path(self.path).stem

    def is_local(self) -> bool:
        p = Path(self.path)
        return p.exists() or p.suffix in LOCAL_BUILDERS or self.path.startswith((".", "/", "~"))

    def fingerprint(self) -> str:
        """Identity of the data: the options plus, for local files, their sizes and modification times."""
        parts = [json.dumps(asdict(self), sort_keys=True)]
        if self.is_local():
            p = Path(self.path).expanduser()
            files = sorted(p.rglob("*")) if p.is_dir() else [p]
            parts += [f"{f}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files if f.is_file()]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]

    def load(self, streaming: bool = False):
        """The records, through ``datasets.load_dataset``; clear errors for missing files. Local json,
        jsonl and txt files are checked line by line first (not when streaming: a record's problem is
        then named when it is reached), so a bad byte, line or record is named with its file and line."""
        import datasets

        if self.is_local():
            p = Path(self.path).expanduser()
            if not p.exists():
                raise FileNotFoundError(f"data source {self.path!r} does not exist (DataSource.path: a local "
                                        f"{'/'.join(LOCAL_BUILDERS)} file or folder, or a hub dataset name)")
            files = sorted(f for f in p.rglob("*") if f.suffix in LOCAL_BUILDERS) if p.is_dir() else [p]
            if not files or files[0].suffix not in LOCAL_BUILDERS:
                raise ValueError(f"data source {self.path!r}: no file with a supported extension "
                                 f"({', '.join(LOCAL_BUILDERS)})")
            builder = LOCAL_BUILDERS[files[0].suffix]
            if not streaming:
                for f in files:
                    scan_local_file(f, self)
            try:
                ds = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train",
                                           streaming=streaming)
            except Exception as err:  # datasets buries the cause in a chain of its own errors
                cause = err
                while cause.__cause__ is not None or cause.__context__ is not None:
                    cause = cause.__cause__ or cause.__context__
                raise ValueError(f"data source {self.path!r} cannot be read by datasets' {builder!r} reader "
                                 f"({type(cause).__name__}: {str(cause)[:300]})") from err
        else:
            try:
                ds = datasets.load_dataset(self.path, self.subset, split=self.split, streaming=streaming)
            except Exception as err:  # hub errors come in many types; all mean "cannot read this source"
                raise ValueError(f"data source {self.path!r} could not be loaded from the Hugging Face hub "
                                 f"({type(err).__name__}: {err}); offline, use a local file instead") from err
        field = self.text_field if self.format == "text" else self.messages_field
        columns = ds.column_names if not streaming else None
        if columns is not None and field not in columns:
            raise ValueError(f"data source {self.path!r} has no column {field!r} "
                             f"(DataSource.{'text_field' if self.format == 'text' else 'messages_field'}); "
                             f"columns: {', '.join(columns)}")
        if self.max_documents is not None:
            ds = ds.take(self.max_documents) if streaming else ds.select(range(min(self.max_documents, len(ds))))
        return ds


def _line_problem(path: Path, line: int, what: str, source: DataSource, unit: str = "line") -> ValueError:
    return ValueError(f"{path}, {unit} {line}: {what} (data source {source.label!r})")


def scan_local_file(path: Path, source: DataSource) -> dict:
    """Check a local json/jsonl/txt file line by line before ``datasets`` reads it (one line in memory at
    a time): UTF-8, JSON syntax, one object per line, the text or messages field. Returns counts
    ({"records", "skipped", "empty"}); a problem raises ``ValueError`` naming the file, the line (the
    record, in a JSON array or object file) and what was expected."""
    path = Path(path)
    if path.suffix == ".json":
        raw = path.read_bytes()
        try:
            whole = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as err:
            line = raw[: err.start].count(b"\n") + 1
            raise _line_problem(path, line, f"byte {raw[err.start]:#04x} is not UTF-8; re-encode the file as UTF-8",
                                source) from None
        except json.JSONDecodeError:
            whole = None  # JSON lines under a .json name: read line by line below
        if isinstance(whole, (list, dict)):  # an array of records, or one (pretty-printed) record
            records = _RecordCheck(path, source, "record")
            for number, record in enumerate(whole if isinstance(whole, list) else [whole], 1):
                records.check(number, record)
            return records.finish()
    records = _RecordCheck(path, source, "line")
    with open(path, "rb") as f:
        for number, raw_line in enumerate(f, 1):
            try:
                text = raw_line.decode("utf-8")
            except UnicodeDecodeError as err:
                raise _line_problem(path, number, f"byte {raw_line[err.start]:#04x} at column {err.start + 1} is not "
                                    "UTF-8; re-encode the file as UTF-8", source) from None
            if not text.strip():
                continue
            if path.suffix == ".txt":
                records.counts["records"] += 1
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as err:
                raise _line_problem(path, number, f"not valid JSON: {err.msg} (column {err.colno}); each line "
                                    "of a .jsonl file must be one JSON object", source) from None
            records.check(number, record)
    return records.finish()


class _RecordCheck:
    """Checks records one at a time, counting what a source skips."""

    def __init__(self, path: Path, source: DataSource, unit: str):
        self.path, self.source, self.unit = path, source, unit
        self.counts = {"records": 0, "skipped": 0, "empty": 0}
        self.first_skipped = None

    def check(self, number: int, record) -> None:
        source = self.source
        self.counts["records"] += 1
        if not isinstance(record, dict):
            expected = source.text_field if source.format == "text" else source.messages_field
            raise _line_problem(self.path, number, f"a JSON {type(record).__name__}, expected an object with field "
                                f"{expected!r}", source, self.unit)
        verdict, problem = record_verdict(record, source)
        if verdict == "refused":
            raise _line_problem(self.path, number, problem, source, self.unit)
        if verdict != "usable":
            self.counts[verdict] += 1
        if verdict == "skipped":
            self.first_skipped = self.first_skipped or number

    def finish(self) -> dict:
        if not self.counts["records"]:
            raise ValueError(f"{self.path} has no records (the file is empty or blank): data source "
                             f"{self.source.label!r} needs at least one document; remove the source or fill the file")
        report_skipped(self.source, self.path, self.counts, self.first_skipped and f"{self.unit} {self.first_skipped}")
        return self.counts


def record_verdict(record: dict, source: DataSource) -> tuple[str, str | None]:
    """What a source does with one record: ("usable", None), ("empty", None) (an empty text: skipped),
    ("skipped", problem) (no usable text, and ``allow_missing_text``) or ("refused", problem)."""
    problem = record_problem(record, source)
    if problem is None:
        return "usable", None
    if problem == "empty":
        return "empty", None
    if source.format == "text" and source.allow_missing_text:
        return "skipped", problem
    return "refused", problem


def record_problem(record: dict, source: DataSource) -> str | None:
    """What is wrong with one record for this source (None: usable, "empty": an empty text)."""
    if source.format == "text":
        value = record.get(source.text_field)
        if isinstance(value, str):
            return "empty" if not value else None
        fields = ", ".join(map(repr, list(record)[:6])) or "none"
        got = "missing" if source.text_field not in record else f"a {type(value).__name__}, not a string"
        return (f"field {source.text_field!r} is {got} (fields: {fields}); set DataSource.text_field to the column "
                "holding the text, or allow_missing_text: true to skip such records")
    messages = record.get(source.messages_field)
    if not isinstance(messages, list) or not messages:
        got = "missing" if source.messages_field not in record else f"{type(messages).__name__} {str(messages)[:40]!r}"
        return (f"field {source.messages_field!r} is {got}; format 'chat' expects a non-empty list of "
                "{\"role\": ..., \"content\": ...} messages (DataSource.messages_field names the field)")
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            return f"message {index} is a {type(message).__name__}, expected an object with 'role' and 'content'"
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                got = "missing" if key not in message else f"a {type(message.get(key)).__name__}"
                return f"message {index} has {key!r} {got}; every message needs 'role' and 'content' strings"
    return None


def report_skipped(source: DataSource, where, counts: dict, first) -> None:
    """Say how many records a source lost (no text, or an empty one)."""
    import warnings

    if counts["skipped"] or counts["empty"]:
        parts = []
        if counts["skipped"]:
            parts.append(f"{counts['skipped']} without a string {source.text_field!r} (first at {first}; "
                         "allow_missing_text)")
        if counts["empty"]:
            parts.append(f"{counts['empty']} with an empty {source.text_field!r}")
        warnings.warn(f"data source {source.label!r} ({where}): skipped {' and '.join(parts)} of "
                      f"{counts['records']} records")
