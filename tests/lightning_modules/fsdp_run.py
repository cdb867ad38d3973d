"""A 2-process CPU run of sparse KD under FSDP2 (Lightning's ModelParallelStrategy, gloo).
Launched by test_fsdp.py as ``python -m tests.lightning_modules.fsdp_run ROOT OUT STEPS [CKPT]``;
Lightning starts the second process itself. Rank 0 writes OUT/losses-<steps>.json. With
``XD_SINGLE_BATCH=B`` in the environment it runs one plain process with batch B instead (the
reference that 2 sharded processes of batch B / 2 must reproduce). With ``XD_STOP_AT=S`` the run is
planned for STEPS but stops after step S (a crash to resume from: the LR schedule depends on STEPS)."""

import json
import os
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy

from callbacks import StudentExportCallback
from datamodules import DataSource, TextDataModule
from lightning_modules import SparseKDModule


class StopAt(L.Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step:
            trainer.should_stop = True


class Recorder(L.Callback):
    def __init__(self):
        self.losses, self.shard_fraction = {}, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        # the mean loss over both ranks (each sees its own half of the data)
        loss = trainer.strategy.reduce(outputs["loss"].detach(), reduce_op="mean")
        self.losses[trainer.global_step] = float(loss)
        if self.shard_fraction is None:
            local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in pl_module.student.parameters())
            full = sum(p.numel() for p in pl_module.student.parameters())
            self.shard_fraction = local / full


def main():
    root, out, steps = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    ckpt = sys.argv[4] if len(sys.argv) > 4 else None
    single_batch = int(os.environ.get("XD_SINGLE_BATCH", 0))
    stop_at = int(os.environ.get("XD_STOP_AT", 0))
    L.seed_everything(0)
    data = TextDataModule(tokenizer=str(root / "teacher"), sources=[DataSource(str(root / "corpus" / "general.jsonl"))],
                          seq_len=32, batch_size=single_batch or 2, cache_dir=str(root / "cache"))
    # activation checkpointing on, as configs/trainer/fsdp.yaml runs it on GPUs
    # a 10-step ramp to 1e-2 (warm-up not capped to 10 % of these few steps): at Adam's full 1e-2 on the first
    # step, a weight whose gradient is ~0 moves by +-lr on the sign of float noise, which no order of sums fixes
    module = SparseKDModule(teacher=str(root / "teacher"), lr=1e-2, top_k=8, activation_checkpointing=True,
                            warmup_steps=10, max_warmup_fraction=1.0)
    recorder = Recorder()
    trainer = L.Trainer(
        accelerator="cpu", devices=1 if single_batch else 2, max_steps=steps, logger=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=1, val_check_interval=steps,
        strategy="auto" if single_batch else ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1,
                                                                    process_group_backend="gloo"),
        callbacks=[recorder, *([StopAt(stop_at)] if stop_at else []), StudentExportCallback(str(out / "student")),
                   L.pytorch.callbacks.ModelCheckpoint(dirpath=str(out / "ckpt"), save_last=True, every_n_train_steps=1)],
    )
    trainer.fit(module, datamodule=data, ckpt_path=ckpt)
    if trainer.is_global_zero:
        (out / f"losses-{stop_at or steps}.json").write_text(json.dumps({"losses": recorder.losses,
                                                               "shard_fraction": recorder.shard_fraction}))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
