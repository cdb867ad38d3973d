"""The integrity benchmark: what the manifests cost (each file's SHA-256 written with the artifact
and checked before it is read) on the student and a KD checkpoint of the configured teacher.

Each artifact is written and read both ways in one run, side by side, so the ratio holds where the
absolute times drift: a plain write against the write with its manifest, and a plain read against
the verified read. A checkpoint's moments are filled with random values (the AdamW state of a
trainable student: two float32 tensors per weight), which is what its size is made of.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import torch

from experiments.bench_base import BenchBase
from experiments.bench_report import markdown_table
from experiments.measure import MiB


def _median_seconds(run, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


class IntegrityBenchmark(BenchBase):
    """``integrity``."""

    def integrity(self, repeats: int = 3) -> dict:
        """Seconds to write and to read the student folder and a KD training checkpoint, without and
        with their manifests (write: + SHA-256 of every file; read: + checking it), and the SHA-256
        rate those imply.

        Args:
            repeats: timed repeats of each operation (the median is reported).
        """
        import models.checkpoint as checkpoint
        import models.storage as storage
        from callbacks.safeguards import AtomicCheckpointIO, check_checkpoint_file
        from models import load_student, save_student

        _, student = self._loaded()
        rows = []
        scratch = Path(tempfile.mkdtemp(prefix="xdistill-integrity-", dir=self.out_dir.parent
                                        if self.out_dir.parent.is_dir() else None))
        try:
            folder = scratch / "student"
            real_manifest, real_verify = storage.write_manifest, checkpoint.verify_student_folder

            def save_plain():
                storage.write_manifest = lambda tmp: None
                try:
                    save_student(student, folder)
                finally:
                    storage.write_manifest = real_manifest

            def load_plain():
                checkpoint.verify_student_folder = lambda path: None
                try:
                    load_student(folder)
                finally:
                    checkpoint.verify_student_folder = real_verify

            write = (_median_seconds(save_plain, repeats), _median_seconds(lambda: save_student(student, folder), repeats))
            read = (_median_seconds(load_plain, repeats), _median_seconds(lambda: load_student(folder), repeats))
            size = _folder_bytes(folder)
            rows += self._rows("student folder", size, write, read)

            trainable = [p for p in student.parameters()]
            state = {"pytorch-lightning_version": "bench", "global_step": 1,
                     "state_dict": {k: v.detach().clone() for k, v in student.state_dict().items()},
                     "optimizer_states": [{"state": {i: {"exp_avg": torch.randn_like(p, dtype=torch.float32),
                                                         "exp_avg_sq": torch.rand_like(p, dtype=torch.float32)}
                                                     for i, p in enumerate(trainable)}}]}
            ckpt, io = scratch / "last.ckpt", AtomicCheckpointIO()

            def save_ckpt_plain():
                storage.atomic_file_write(ckpt, lambda tmp: torch.save(state, tmp))

            def load_ckpt_plain():
                torch.load(ckpt, map_location="cpu", weights_only=True)

            def load_ckpt_verified():
                check_checkpoint_file(ckpt, again=True)
                torch.load(ckpt, map_location="cpu", weights_only=True)

            write = (_median_seconds(save_ckpt_plain, repeats),
                     _median_seconds(lambda: io.save_checkpoint(state, ckpt), repeats))
            read = (_median_seconds(load_ckpt_plain, repeats), _median_seconds(load_ckpt_verified, repeats))
            rows += self._rows("KD checkpoint (weights + AdamW moments)", ckpt.stat().st_size, write, read)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

        payload = self._payload("integrity", rows, {"repeats": repeats})
        columns = [("artifact", "artifact", ""), ("operation", "operation", ""), ("mib", "MiB", ".0f"),
                   ("plain_s", "plain s", ".2f"), ("verified_s", "with manifest s", ".2f"),
                   ("ratio", "ratio", ".2f"), ("sha256_mib_s", "implied SHA-256 MiB/s", ".0f")]
        title = f"Integrity: the cost of manifests (median of {repeats}; {self.settings['student_description']})"

        def draw(axes):
            labels = [f"{r['artifact'].split(' (')[0]}\n{r['operation']}" for r in rows]
            axes[0].bar(labels, [r["ratio"] for r in rows], color="tab:blue")
            axes[0].axhline(1.0, color="grey", linestyle="--")
            axes[0].set_ylabel("time with manifest / without")
            axes[1].axis("off")
        return self._finish("integrity", payload, markdown_table(rows, columns), title, draw)

    @staticmethod
    def _rows(artifact: str, size: int, write: tuple, read: tuple) -> list[dict]:
        rows = []
        for operation, (plain, verified) in (("write", write), ("read", read)):
            extra = max(verified - plain, 1e-9)
            rows.append({"artifact": artifact, "operation": operation, "bytes": size, "mib": size / MiB,
                         "plain_s": plain, "verified_s": verified, "ratio": verified / plain,
                         "sha256_mib_s": size / MiB / extra})
        return rows
