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
        """The records, through ``datasets.load_dataset``; clear errors for missing files."""
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
            ds = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train", streaming=streaming)
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
