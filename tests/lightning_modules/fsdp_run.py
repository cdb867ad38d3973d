"""A 2-process CPU run of sparse KD under FSDP2 (Lightning's ModelParallelStrategy, gloo).
Launched by test_fsdp.py as ``python -m tests.lightning_modules.fsdp_run ROOT OUT STEPS [CKPT]``;
Lightning starts the second process itself. Rank 0 writes OUT/losses-<steps>.json. With
``XD_SINGLE_BATCH=B`` in the environment it runs one plain process with batch B instead (the
reference that 2 sharded processes of batch B / 2 must reproduce)."""

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
    L.seed_everything(0)
    data = TextDataModule(tokenizer=str(root / "teacher"), sources=[DataSource(str(root / "corpus" / "general.jsonl"))],
                          seq_len=32, batch_size=single_batch or 2, cache_dir=str(root / "cache"))
    # activation checkpointing on, as configs/trainer/fsdp.yaml runs it on GPUs
    module = SparseKDModule(teacher=str(root / "teacher"), lr=1e-2, top_k=8, activation_checkpointing=True)
    recorder = Recorder()
    trainer = L.Trainer(
        accelerator="cpu", devices=1 if single_batch else 2, max_steps=steps, logger=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=1, val_check_interval=steps,
        strategy="auto" if single_batch else ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1,
                                                                    process_group_backend="gloo"),
        callbacks=[recorder, StudentExportCallback(str(out / "student")),
                   L.pytorch.callbacks.ModelCheckpoint(dirpath=str(out / "ckpt"), save_last=True, every_n_train_steps=1)],
    )
    trainer.fit(module, datamodule=data, ckpt_path=ckpt)
    if trainer.is_global_zero:
        (out / f"losses-{steps}.json").write_text(json.dumps({"losses": recorder.losses,
                                                               "shard_fraction": recorder.shard_fraction}))


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
