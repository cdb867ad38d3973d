"""The training entry point (LightningCLI): one YAML per concern, combined by repeating --config.

    python -m experiments.run fit --config configs/stages/align.yaml --config configs/data/example.yaml
    python -m experiments.run fit --config configs/stages/kd.yaml --model.init_args.student_ckpt runs/align/version_0/student
    python -m experiments.run fit ... --ckpt_path runs/kd/version_0/checkpoints/last.ckpt   # resume
    tensorboard --logdir runs/
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.cli import LightningCLI

from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint

from callbacks import StudentExportCallback, TokensPerSecond
from datamodules import TextDataModule


class XDistillCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # the data is tokenised with the teacher's tokenizer unless the config says otherwise
        parser.link_arguments("model.init_args.teacher", "data.tokenizer", apply_on="parse")
        # always-on callbacks, each configurable under its own key (--checkpoint.monitor, ...)
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.monitor": "val/student_ce",
                             "checkpoint.mode": "min", "checkpoint.save_top_k": 1})
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.set_defaults({"lr_monitor.logging_interval": "step"})
        parser.add_lightning_class_args(StudentExportCallback, "student_export")
        parser.add_lightning_class_args(TokensPerSecond, "throughput")


def main(args=None, run: bool = True) -> XDistillCLI:
    return XDistillCLI(
        model_class=L.LightningModule,
        subclass_mode_model=True,
        datamodule_class=TextDataModule,
        parser_kwargs={"parser_mode": "omegaconf"},
        save_config_kwargs={"overwrite": True},
        trainer_defaults={
            "logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                       "init_args": {"save_dir": "runs", "name": "default"}},
        },
        args=args,
        run=run,
    )


if __name__ == "__main__":
    main()
