"""The training benchmark: tokens per second and peak memory of one optimizer step of each stage
(alignment, KD with the teacher online, KD from a top-k cache, the Distil-xLSTM student's KD).

One module per benchmark keeps ``experiments.bench`` an entry point; this one builds each stage's
Lightning module outside a Trainer, times its optimizer steps and draws the per-stage bars.
"""

from __future__ import annotations

import gc
import statistics

import torch

from experiments.bench_base import BenchBase
from experiments.bench_report import markdown_table
from experiments.measure import MiB, OUT_OF_MEMORY, PeakMemory, out_of_memory, timed
from models.storage import write_json


TRAIN_STAGES = ("align", "kd", "kd_cached", "distil_xlstm_kd")


def _train_steps(module, batch: dict, steps: int, warmup: int, device: torch.device) -> dict:
    """Median time of ``steps`` optimizer steps (after ``warmup``) and the peak memory over them."""
    module.train()
    module.log = module.log_dict = lambda *args, **kwargs: None  # no Trainer here: nothing to log to
    optimizer = torch.optim.AdamW(module.trainable_parameters(), lr=1e-6)

    def one_step():
        loss = module.training_step(batch, 0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(warmup):
        one_step()
    with PeakMemory(device) as peak:
        times = [timed(one_step, device)[1] for _ in range(steps)]
    median = statistics.median(times)
    return {"ms_per_step": 1e3 * median, "tokens_per_s": batch["input_ids"].numel() / median,
            "peak_bytes": peak.bytes, "peak_kind": peak.kind}


def _train_figure(rows):
    """Bars per stage: tokens/s and peak memory (a figure-drawing callback for ``figure``)."""
    measured = [r for r in rows if "tokens_per_s" in r]

    def draw(axes):
        names = [r["stage"] for r in measured]
        for ax, key, label in zip(axes, ("tokens_per_s", "peak_mib"), ("tokens per second", "peak memory (MiB)")):
            ax.bar(names, [r[key] for r in measured], color="tab:blue")
            ax.set_ylabel(label)
            ax.tick_params(axis="x", labelrotation=20)
    return draw


class TrainBenchmark(BenchBase):
    """``train``."""

    # -- training ----------------------------------------------------------------------------------

    def train(self, seq_len: int = 256, batch: int = 4, steps: int = 3, warmup: int = 1, top_k: int = 64,
              stages: list[str] = ["align", "kd", "kd_cached", "distil_xlstm_kd"]) -> dict:
        """Tokens per second and peak memory of one optimizer step (forward, backward, AdamW) of each stage.

        Stages: ``align`` (stage 1, new parameters, per-layer MSE against the frozen teacher),
        ``kd`` (stage 2/3: all parameters, the teacher's top-k computed online), ``kd_cached``
        (the same with the teacher's top-k read from a cache, so no teacher forward), and
        ``distil_xlstm_kd`` (the Distil-xLSTM student's KD step).

        Args:
            seq_len: tokens per sequence.
            batch: sequences per step.
            steps: timed optimizer steps per stage (the median is reported).
            warmup: untimed steps before them.
            top_k: teacher tokens kept per position.
            stages: which of the stages to measure.
        """
        unknown = sorted(set(stages) - set(TRAIN_STAGES))
        if unknown:
            raise ValueError(f"unknown stage(s) {', '.join(unknown)}; allowed values: {', '.join(TRAIN_STAGES)}")
        teacher, _ = self._loaded()
        vocab = teacher.config.vocab_size
        gen = torch.Generator().manual_seed(self.seed)
        ids = torch.randint(min(100, vocab // 2), vocab, (batch, seq_len), generator=gen).to(self.device)
        rows = []
        for stage in stages:
            module, inputs = self._stage_module(stage, ids, top_k)
            row = {"stage": stage, "seq_len": seq_len, "batch": batch,
                   "trainable_parameters": sum(p.numel() for p in module.trainable_parameters())}
            try:
                row.update(_train_steps(module, inputs, steps, warmup, self.device))
            except OUT_OF_MEMORY as err:
                row["error"] = out_of_memory(err)
            rows.append(row)
            del module, inputs
            gc.collect()
            write_json(self.out_dir / "train.json", self._payload("train", rows, {"steps": steps, "warmup": warmup}))
        for row in rows:
            if "peak_bytes" in row:
                row["peak_mib"] = row["peak_bytes"] / MiB
        payload = self._payload("train", rows, {"steps": steps, "warmup": warmup})
        columns = [("stage", "stage", ""), ("trainable_parameters", "trainable parameters", ",d"),
                   ("tokens_per_s", "tokens/s", ".0f"), ("ms_per_step", "ms/step", ".0f"),
                   ("peak_mib", "peak MiB", ".0f")]
        title = (f"Training step per stage: batch {batch} x {seq_len} tokens, {self.settings['dtype']}, "
                 f"top-{top_k}")
        return self._finish("train", payload, markdown_table(rows, columns), title, _train_figure(rows))

    def _stage_module(self, stage: str, ids, top_k: int):
        from lightning_modules import AlignmentModule, SparseKDModule
        from lightning_modules.losses import teacher_topk

        dtype = str(self.dtype).removeprefix("torch.")
        common = dict(teacher=self.teacher_name, teacher_dtype=dtype, hybrid=self.hybrid)
        if stage == "align":
            module = AlignmentModule(**common)
        elif stage == "distil_xlstm_kd":
            module = SparseKDModule(top_k=top_k, student_family="distil_xlstm", **common)
        else:
            module = SparseKDModule(top_k=top_k, student_ckpt=self.student_path, **common)
        module.configure_model()
        module.to(self.device)
        batch = {"input_ids": ids, "labels": ids.clone()}
        if stage == "kd_cached":
            with torch.no_grad():
                top_ids, top_logprobs = teacher_topk(module.teacher(ids).logits, top_k)
            batch.update(topk_ids=top_ids, topk_logprobs=top_logprobs)
        return module, batch
