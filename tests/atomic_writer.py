"""A process that writes one kind of artifact over and over, version 1, 2, 3, ..., through the
project's own writers, and appends each finished version to a log. The atomic-write tests stop and
kill it at random moments and check what is on disk.

    python -m tests.atomic_writer student|merged|checkpoint|scores PATH LOG
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch


def filled(model, value: float):
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(value)
    return model


def writer(kind: str, path: Path):
    """A function of the version number that writes that version of the artifact to ``path``."""
    if kind in ("student", "merged"):
        from models import HybridConfig, convert_to_hybrid, save_student
        from tests.conftest import make_teacher

        student = convert_to_hybrid(make_teacher("llama"), HybridConfig(window=8, sink_tokens=2, chunk_size=16))
        if kind == "student":
            return lambda v: save_student(filled(student, float(v)), path)
        from callbacks import merge_students

        experts = [path.parent / "expert_a", path.parent / "expert_b"]

        def merge(v):
            save_student(filled(student, v - 0.5), experts[0])
            save_student(filled(student, v + 0.5), experts[1])
            merge_students(experts, "mean", out=path)
        return merge
    if kind == "checkpoint":
        from callbacks.safeguards import AtomicCheckpointIO

        io = AtomicCheckpointIO()
        return lambda v: io.save_checkpoint({"global_step": v, "w": torch.full((1 << 20,), float(v))}, path)
    if kind == "scores":
        from callbacks import write_report

        teacher = {f"task{i}": 0.5 for i in range(8)}
        return lambda v: write_report(path, {t: v / 1000 for t in teacher}, teacher, [0.01 * i for i in range(51)])
    raise ValueError(f"unknown kind {kind!r}")


def main(kind: str, path: str, log: str) -> None:
    write = writer(kind, Path(path))
    with open(log, "a") as out:
        version = 0
        while True:
            version += 1
            write(version)
            out.write(f"{version}\n")
            out.flush()


if __name__ == "__main__":
    main(*sys.argv[1:])
