"""The training entry point (LightningCLI): one YAML per concern, combined by repeating --config.

    python -m experiments.run fit --config configs/stages/align.yaml --config configs/data/example.yaml
    python -m experiments.run fit --config configs/stages/kd.yaml --model.init_args.student_ckpt runs/align/version_0/student
    python -m experiments.run fit ... --ckpt_path last      # resume this run's newest checkpoint (or start fresh)
    tensorboard --logdir runs/

Before any model is loaded the configuration is checked as a whole (``check_stage_config``):
combinations the parser cannot see (a window that covers every position while sinks are on, k
larger than the teacher's vocabulary, FSDP on one CPU, a missing student folder or top-k cache)
are refused naming the key and its allowed values, and the checkpoint to resume is checked.
"""

from __future__ import annotations

import dataclasses

import re
from pathlib import Path

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI

from callbacks import StudentExportCallback, TokensPerSecond
from callbacks.allocator import AllocatorAdvice
from callbacks.safeguards import AtomicCheckpointIO, OutputCheck, check_checkpoint_file
from datamodules import TextDataModule


def _get(namespace, dotted: str, default=None):
    """A value from a parsed (possibly nested) jsonargparse namespace or dict, or ``default``."""
    value = namespace
    for part in dotted.split("."):
        if value is None:
            return default
        value = value.get(part) if isinstance(value, dict) else getattr(value, part, None)
    return default if value is None else value


def _plain_dict(value) -> dict | None:
    """A parsed dataclass argument (jsonargparse Namespace, dict or dataclass) as a plain dict, without
    jsonargparse's bookkeeping (``__path__``: the YAML file it was read from)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        value = value.as_dict() if hasattr(value, "as_dict") else dataclasses.asdict(value)
    return {k: v for k, v in value.items() if not k.startswith("__")}


def _teacher_config(name: str, trust_remote_code: bool):
    """The teacher's Hugging Face config, read without loading weights; None where it cannot be read
    cheaply (the embedded teacher not yet unpacked, a hub id offline): the model loader reports those."""
    from transformers import AutoConfig

    from models.storage import cache_dir
    from models.teacher import EMBEDDED_ALIASES

    if str(name) in EMBEDDED_ALIASES:
        folder = cache_dir() / "teachers" / "SmolLM2-135M-Instruct"
        if not (folder / "config.json").is_file():
            return None
        name = str(folder)
    try:
        return AutoConfig.from_pretrained(str(name), trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        return None


def _strategy_name(strategy) -> str:
    """``fsdp``, ``ddp``, ... or the class name, lower case, of a strategy given by name or class path."""
    name = strategy if isinstance(strategy, str) else str(_get(strategy, "class_path", ""))
    return name.rsplit(".", 1)[-1].lower()


def check_stage_config(cfg, training: bool = True, students_exist: bool = True) -> None:
    """Refuse impossible combinations of a parsed stage configuration before any model is loaded
    (``training``: the ``fit`` subcommand, where the window must leave something to remember;
    ``students_exist`` False: a pipeline plans a stage whose student folder an earlier stage will
    write, and ``model.init_args.hybrid`` stands for it)."""
    from lightning_modules.base import refuse_ignored_student_settings
    from models.checkpoint import read_student_settings

    model = _get(cfg, "model.init_args", {})
    seq_len = _get(cfg, "data.seq_len")
    teacher_name, teacher_cfg = _get(model, "teacher"), None
    if teacher_name:
        from models.adapters import get_adapter
        from models.teacher import check_teacher_source

        check_teacher_source(teacher_name)  # a path that is not there, named as one (not as a bad hub id)
        teacher_cfg = _teacher_config(teacher_name, bool(_get(model, "trust_remote_code", False)))
        if teacher_cfg is not None:
            get_adapter(teacher_cfg)  # an unsupported family, from its config, before its weights load
    student_ckpt = _get(model, "student_ckpt")
    family = _get(model, "student_family", "hybrid")
    hybrid = _get(model, "hybrid", {})
    callbacks = _get(cfg, "trainer.callbacks", []) or []
    merged_here = {str(Path(_get(cb, "init_args.out"))) for cb in callbacks
                   if str(_get(cb, "class_path", "")).endswith("ModelMergeCallback") and _get(cb, "init_args.out")}
    if student_ckpt and students_exist and str(Path(student_ckpt)) not in merged_here:  # (a merge writes it first)
        saved = read_student_settings(student_ckpt)  # a missing or foreign folder is named here
        refuse_ignored_student_settings(student_ckpt, saved, family, _plain_dict(hybrid),
                                        _plain_dict(_get(model, "distil_xlstm", None)))
        family, hybrid = saved.family, saved.family_config.to_dict()
    if training and family == "hybrid" and seq_len and seq_len >= 2:  # a bad seq_len: the data module names it
        from models import HybridConfig

        # the dataclass fills what was not given (its defaults are written in one place)
        layer = HybridConfig.from_dict(_plain_dict(hybrid) or {})
        window, sinks, mode = layer.window, layer.sink_tokens, layer.mode
        if mode != "mlstm" and sinks > 0 and window >= seq_len:
            raise ValueError(
                f"model.init_args.hybrid.window={window} is not smaller than data.seq_len={seq_len} while "
                f"hybrid.sink_tokens={sinks}: the window already covers every position, so the sinks and the "
                f"memory branch never see an evicted token. Allowed values: window < {seq_len} (or sink_tokens 0 "
                "for a student that is exactly its teacher)")
    top_k = _get(model, "top_k")
    preset = _get(model, "preset")
    if preset is not None:
        from lightning_modules.kd import KD_PRESETS

        top_k = KD_PRESETS.get(preset, {}).get("top_k", top_k)
    if top_k is not None and _get(cfg, "model.class_path", "").endswith(("SparseKDModule", "ExpertFinetuneModule")):
        vocab = getattr(teacher_cfg, "vocab_size", None)
        if vocab:
            from lightning_modules.kd import kd_top_k

            top_k = kd_top_k(top_k, preset, vocab)
        cache = _get(cfg, "data.topk_cache")
        if cache:
            from datamodules.topk_cache import read_manifest

            k = read_manifest(cache)["fingerprint"]["k"]
            if top_k > k:  # a cache of the top k serves every smaller k
                raise ValueError(f"model.init_args.top_k={top_k} but the top-k cache {cache} holds k={k}; "
                                 f"allowed values: 1..{k}, or rebuild the cache with --k {top_k}")
    strategy = _strategy_name(_get(cfg, "trainer.strategy", "auto"))
    accelerator = str(_get(cfg, "trainer.accelerator", "auto")).lower()
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    if strategy.startswith("fsdp") and on_cpu:
        raise ValueError(f"trainer.strategy={strategy!r} (Lightning's FSDPStrategy) needs CUDA GPUs and this run is on "
                         "the CPU; allowed on CPU: --config configs/trainer/fsdp-cpu.yaml (FSDP2 through "
                         "ModelParallelStrategy with gloo, 2 or more processes), or no strategy")
    devices = _get(cfg, "trainer.devices", "auto")
    if strategy == "modelparallelstrategy" and on_cpu and str(devices) in ("1", "auto", "[0]"):
        raise ValueError(f"trainer.strategy=ModelParallelStrategy (FSDP2) with trainer.devices={devices} on the CPU "
                         "shards over one process, which shards nothing; allowed values: trainer.devices >= 2 "
                         "(configs/trainer/fsdp-cpu.yaml), or drop the strategy")


def resolve_last_checkpoint(cfg) -> None:
    """``--ckpt_path last``: this run's newest ``last.ckpt`` (in ``checkpoint.dirpath``, or the newest
    ``version_*`` of the TensorBoard logger's folder, whose version is then reused so logs continue
    there), or a fresh start when there is none, so one command serves the first and every later
    submission of a preemptible job."""
    if _get(cfg, "ckpt_path") != "last":
        return
    dirpath = _get(cfg, "checkpoint.dirpath")
    found, version = None, None
    if dirpath:
        candidate = Path(dirpath) / "last.ckpt"
        found = candidate if candidate.exists() else None
    else:
        logger = _get(cfg, "trainer.logger.init_args")
        if logger is not None and _get(cfg, "trainer.logger.class_path", "").endswith("TensorBoardLogger"):
            root = Path(_get(logger, "save_dir", ".")) / str(_get(logger, "name", "lightning_logs") or "")
            fixed = _get(logger, "version")
            pattern = f"{fixed if isinstance(fixed, str) else f'version_{fixed}'}" if fixed is not None else "version_*"
            runs = [p for p in root.glob(f"{pattern}/checkpoints/last.ckpt")]
            number = lambda p: int(m.group(1)) if (m := re.fullmatch(r"version_(\d+)", p.parents[1].name)) else -1
            if runs:
                found = max(runs, key=number)
                version = found.parents[1].name
                if fixed is None:
                    logger.version = version
    if found is None:
        print("ckpt_path=last: no checkpoint of this run yet, starting from the beginning", flush=True)
        cfg.ckpt_path = None
    else:
        print(f"ckpt_path=last: resuming from {found}" + (f" (logger version {version})" if version else ""), flush=True)
        cfg.ckpt_path = str(found)


class XDistillCLI(LightningCLI):
    students_exist = True  # see check_stage_config

    def add_arguments_to_parser(self, parser) -> None:
        # the data is tokenised with the teacher's tokenizer unless the config says otherwise
        parser.link_arguments("model.init_args.teacher", "data.tokenizer", apply_on="parse")
        # a tokenizer that ships code is the teacher's: the same permission covers both
        parser.link_arguments("model.init_args.trust_remote_code", "data.trust_remote_code", apply_on="parse")
        # always-on callbacks, each configurable under its own key (--checkpoint.monitor, ...)
        # Checkpoints are for resuming (the stage's output is the student exported when fit ends): the
        # newest one every 100 steps. No monitored metric by default: Lightning defers a step-interval
        # checkpoint until its monitored metric exists, so monitoring a validation metric would leave
        # nothing to resume from between validations. (--checkpoint.monitor val/student_ce
        # --checkpoint.save_top_k 1 also keeps the best one.)
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True, "checkpoint.monitor": None, "checkpoint.mode": "min",
                             "checkpoint.save_top_k": 0, "checkpoint.every_n_train_steps": 100})
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.set_defaults({"lr_monitor.logging_interval": "step"})
        parser.add_lightning_class_args(StudentExportCallback, "student_export")
        parser.add_lightning_class_args(TokensPerSecond, "throughput")
        parser.add_lightning_class_args(OutputCheck, "output_check")
        parser.add_lightning_class_args(AllocatorAdvice, "allocator_advice")
        parser.add_argument("--checkpoint_manifest", type=bool, default=True,
                            help="write each checkpoint's size and SHA-256 beside it and check them before "
                                 "resuming (about 1 s per GB on one core per save; off: the zip CRCs are still "
                                 "checked on resume)")

    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        # before LightningCLI reads the checkpoint's hyperparameters: resolve "last", refuse a bad file
        cfg = self.config.get(self.config.get("subcommand") or "", None)
        if cfg is not None and "ckpt_path" in cfg:
            resolve_last_checkpoint(cfg)
            if cfg.ckpt_path:
                check_checkpoint_file(cfg.ckpt_path)

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        check_stage_config(cfg, training=self.subcommand in ("fit", None), students_exist=self.students_exist)
        if "weights_only" in cfg:
            cfg.weights_only = True  # checkpoints hold tensors and plain data only

    def instantiate_trainer(self, **kwargs) -> L.Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # a user's own plugin stays
            cfg = self.config[self.subcommand] if self.subcommand else self.config
            trainer.strategy.checkpoint_io = AtomicCheckpointIO(manifest=bool(cfg.get("checkpoint_manifest", True)))
        return trainer


class PlannedStageCLI(XDistillCLI):
    """Parses, checks and instantiates a stage's classes (no model is loaded, nothing runs) whose
    student folder does not exist yet."""

    students_exist = False


def check_planned_stage(args: list[str]) -> None:
    """Check a ``fit`` command (without the ``fit``) that a pipeline will run later."""
    main(args, run=False, cli_class=PlannedStageCLI)


def stage_config_yaml(args: list[str]) -> str:
    """The whole configuration of a ``fit`` command (given without the ``fit``) as one YAML, every
    default spelled out, so that ``python -m experiments.run fit --config <it>`` reruns the stage alone;
    the command is parsed and checked as a fit about to run (its student folder exists); no model is
    loaded."""
    cli = main(args, run=False)
    return cli.parser.dump(cli.config, skip_none=False)


def main(args=None, run: bool = True, cli_class: type[XDistillCLI] = XDistillCLI) -> XDistillCLI:
    return cli_class(
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
