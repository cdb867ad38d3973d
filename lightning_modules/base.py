"""What every stage shares: the frozen teacher, the student, trainable-parameter selection, the
optimizer and learning-rate schedule, and the always-on validation metrics (DESIGN §4)."""

from __future__ import annotations

import dataclasses
import math

import lightning as L
import torch
from torchmetrics import MeanMetric

from models import (
    DistilXLSTMConfig, DistilXLSTMStudent, HybridConfig, HybridStudent, StudentLM, convert_to_hybrid,
    distil_xlstm_from_teacher, load_student, load_teacher,
)
from models.checkpoint import STUDENT_FAMILIES, StudentSettings, read_student_settings
from models.lean_backward import lean_backward
from models.student import check_student_matches_teacher

from .losses import IGNORE, heldout_metrics, next_token_targets

TRAINABLE = ("new", "attention", "all")
LR_SCHEDULES = ("cosine", "constant")


# Settings that choose how a student's layers run, not what they compute: a stage applies them to the
# student it loads (``HybridStudent.use_op_backend``) instead of refusing them.
EXECUTION_SETTINGS = {"hybrid": ("backend",), "distil_xlstm": ()}


def refuse_ignored_student_settings(student_ckpt: str, saved: StudentSettings, family: str = "hybrid",
                                    hybrid=None, distil_xlstm=None) -> None:
    """A stage that starts from ``student_ckpt`` trains the saved student as it is: its family and
    layer settings come from the folder, not from ``student_family`` / ``hybrid`` / ``distil_xlstm``.
    A setting given there (other than its default) that differs from the saved one would be silently
    ignored, so it is refused, naming both values."""
    if family != "hybrid" and family != saved.family:
        raise ValueError(f"model.init_args.student_family={family!r} but {student_ckpt} holds a {saved.family!r} "
                         "student, which the stage trains as saved: drop student_family (or start from a conversion, "
                         "without student_ckpt)")
    given, cls, name = ((hybrid, HybridConfig, "hybrid") if saved.family == "hybrid"
                        else (distil_xlstm, DistilXLSTMConfig, "distil_xlstm"))
    if given is None:
        return
    given = (given if isinstance(given, cls) else cls.from_dict(dict(given))).to_dict()
    default, stored = cls().to_dict(), saved.family_config.to_dict()
    clashes = [f"{key}={given[key]!r} (saved: {stored.get(key)!r})" for key in sorted(given)
               if given[key] != default[key] and given[key] != stored.get(key)
               and key not in EXECUTION_SETTINGS[name]]
    if clashes:
        raise ValueError(f"model.init_args.{name} sets {', '.join(clashes)}, but the stage trains the student saved "
                         f"in {student_ckpt} with its own settings, so these would be ignored: drop them (the saved "
                         "student's settings apply), or convert a new student without student_ckpt")


class NonFiniteLossError(ArithmeticError):
    """A loss component or gradient became NaN or Inf: training stops before the optimizer step, so
    no checkpoint ever holds the poisoned weights."""


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Learning-rate multiplier: linear warm-up, then cosine decay to ``min_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    frac = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * frac))


def warmup_constant(step: int, warmup_steps: int) -> float:
    """Learning-rate multiplier: linear warm-up, then the peak for the rest of the run (the paper's
    Stage II: "warm-up + constant LR")."""
    return (step + 1) / warmup_steps if step < warmup_steps else 1.0


# Device types with a fused AdamW kernel in torch: one kernel per parameter group instead of a handful
# of elementwise ops per parameter (on 2 CPU cores: 68 against 189 ms a step for SmolLM2's 272
# parameters, the same update within 1.5e-8 after three steps).
FUSED_ADAMW_DEVICES = ("cpu", "cuda")


def adamw(params, lr: float, weight_decay: float = 0.01) -> torch.optim.AdamW:
    """AdamW over ``params``, fused where every parameter is a floating tensor on a device type
    with the fused kernel (``FUSED_ADAMW_DEVICES``), torch's default implementation otherwise."""
    params = list(params)
    fused = bool(params) and all(p.device.type in FUSED_ADAMW_DEVICES and p.is_floating_point() for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)


def capped_warmup(warmup_steps: int, total_steps: int, max_fraction: float) -> int:
    """The warm-up a run of ``total_steps`` gets: at most ``max_fraction`` of its steps, so that a short
    stage still reaches its peak learning rate (10 warm-up steps in a 6-step stage never would)."""
    return max(0, min(warmup_steps, int(max_fraction * total_steps)))


class DistillationModule(L.LightningModule):
    """Base of the stages: builds teacher and student in ``configure_model`` (so instantiating a
    config is cheap and FSDP can shard them), keeps the teacher out of checkpoints."""

    def __init__(self, teacher: str = "smollm2-135m-instruct", student_ckpt: str | None = None,
                 hybrid: HybridConfig = HybridConfig(), trainable: str = "new", lr: float = 1e-3,
                 weight_decay: float = 0.0, warmup_steps: int = 10, min_lr_ratio: float = 0.1,
                 teacher_dtype: str = "float32", trust_remote_code: bool = False,
                 fsdp_param_dtype: str | None = None, activation_checkpointing: bool = False,
                 student_family: str = "hybrid", distil_xlstm: DistilXLSTMConfig = DistilXLSTMConfig(),
                 lr_schedule: str = "cosine", max_warmup_fraction: float = 0.1, recompute_activations: bool = True):
        """
        Args:
            lr: peak learning rate (after warm-up).
            warmup_steps: linear warm-up steps, capped to ``max_warmup_fraction`` of the run's steps.
            min_lr_ratio: ``cosine``: the final learning rate as a share of ``lr``.
            lr_schedule: ``cosine`` (warm-up, then cosine decay to ``min_lr_ratio * lr``) or ``constant``
                (warm-up, then ``lr``).
            max_warmup_fraction: the longest warm-up as a share of the run's optimizer steps, so that
                every run reaches its peak learning rate.
            recompute_activations: the backward recomputes what is cheap to recompute instead of
                keeping it: each hybrid layer keeps only its attention op's inputs (the Triton path
                always recomputes the op), each gated MLP its two projections and each RMS norm its
                input (``models.lean_backward``).
                Off (or with ``activation_checkpointing``): every intermediate is kept.
        """
        super().__init__()
        if lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule={lr_schedule!r} is not supported; allowed values: {', '.join(LR_SCHEDULES)}")
        if not 0.0 <= max_warmup_fraction <= 1.0 or warmup_steps < 0:
            raise ValueError(f"max_warmup_fraction={max_warmup_fraction} and warmup_steps={warmup_steps} are invalid; "
                             "allowed values: a fraction in [0, 1] and a step count >= 0")
        if student_family not in STUDENT_FAMILIES:
            raise ValueError(f"student_family={student_family!r} is not supported; allowed values: "
                             f"{', '.join(STUDENT_FAMILIES)}")
        if trainable not in TRAINABLE:
            raise ValueError(f"trainable={trainable!r} is not supported; allowed values: {', '.join(TRAINABLE)}")
        if not isinstance(getattr(torch, teacher_dtype, None), torch.dtype):
            raise ValueError(f"teacher_dtype={teacher_dtype!r} is not a torch dtype (float32, bfloat16, float16)")
        self.save_hyperparameters()
        # hparams keep plain dicts (for checkpoints and TensorBoard); the module uses the objects
        self.hybrid_config = hybrid if isinstance(hybrid, HybridConfig) else HybridConfig.from_dict(dict(hybrid))
        self.distil_config = (distil_xlstm if isinstance(distil_xlstm, DistilXLSTMConfig)
                              else DistilXLSTMConfig.from_dict(dict(distil_xlstm)))
        self.plain_hparams()
        # The teacher is deliberately not a registered submodule: it is frozen, reloads from its
        # source, and so stays out of checkpoints, the optimizer and DDP; the module places it.
        self._teacher: list = []
        self.student: StudentLM | None = None
        self.val_metrics = torch.nn.ModuleDict({name: MeanMetric() for name in (
            "student_ce", "teacher_ce", "kl_teacher_student", "top1_agreement")})

    def plain_hparams(self) -> None:
        """Store config objects in hparams as plain dicts, so checkpoints load with weights_only=True
        (call after every ``save_hyperparameters``)."""
        for key, value in list(self.hparams.items()):
            if dataclasses.is_dataclass(value):
                self.hparams[key] = value.to_dict() if hasattr(value, "to_dict") else dataclasses.asdict(value)

    # ---- models ------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.student is not None:
            return
        hp = self.hparams
        # (nn.Module.__setattr__ would register a module attribute, hence the list)
        self._teacher[:] = [load_teacher(hp.teacher, dtype=getattr(torch, hp.teacher_dtype),
                                         trust_remote_code=hp.trust_remote_code)]
        if hp.student_ckpt:
            refuse_ignored_student_settings(hp.student_ckpt, read_student_settings(hp.student_ckpt), hp.student_family,
                                            self.hybrid_config, self.distil_config)
            self.student = load_student(hp.student_ckpt)
            check_student_matches_teacher(self.student, self.teacher, source=hp.student_ckpt)
            if isinstance(self.student, HybridStudent) and self.hybrid_config.backend != HybridConfig.backend:
                self.student.use_op_backend(self.hybrid_config.backend)
        elif hp.student_family == "distil_xlstm":
            self.student = distil_xlstm_from_teacher(self.teacher, self.distil_config)
        else:
            self.student = convert_to_hybrid(self.teacher, self.hybrid_config)
        self.student.train()
        self.select_trainable()
        if hp.activation_checkpointing and isinstance(self.student, DistilXLSTMStudent):
            raise ValueError("activation_checkpointing is implemented for hybrid students (transformers' decoder "
                             "layers); a Distil-xLSTM student is small enough to train without it: set it to false")
        if hp.activation_checkpointing:
            # recompute each decoder layer in backward (transformers' GradientCheckpointingLayer)
            self.student.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # (a decoder layer recomputed whole needs no recompute inside it)
        if hp.recompute_activations and not hp.activation_checkpointing and isinstance(self.student, HybridStudent):
            lean_backward(self.student)
        if self.sharded:
            self.shard_models()

    @property
    def teacher(self):
        return self._teacher[0] if self._teacher else None

    def _place_teacher(self) -> None:
        if self.teacher is not None and not self.sharded:
            self.teacher.to(self.device)

    def on_fit_start(self) -> None:
        self._place_teacher()

    def on_validation_start(self) -> None:
        self._place_teacher()

    def on_test_start(self) -> None:
        self._place_teacher()

    @property
    def sharded(self) -> bool:
        """True under Lightning's ModelParallelStrategy (FSDP2: ``fully_shard`` per unit)."""
        from lightning.pytorch.strategies import ModelParallelStrategy

        return self._trainer is not None and isinstance(self.trainer.strategy, ModelParallelStrategy)

    def fsdp_units(self, model) -> list[torch.nn.Module]:
        """Modules that become FSDP units (before the root): the decoder layers."""
        if isinstance(model, DistilXLSTMStudent):
            return list(model.backbone.blocks)
        base = model.lm.model if isinstance(model, HybridStudent) else model.model
        return list(base.layers)

    def shard_models(self) -> None:
        """FSDP2: shard student and teacher over the data-parallel mesh, unit by unit, then the roots
        (the student's root is the HybridStudent, whose forward is the entry point)."""
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = self.device_mesh["data_parallel"]
        param_dtype = getattr(torch, self.hparams.fsdp_param_dtype) if self.hparams.fsdp_param_dtype else None
        policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
        for model in (self.teacher, self.student):
            for unit in self.fsdp_units(model):
                fully_shard(unit, mesh=mesh, mp_policy=policy)
            fully_shard(model, mesh=mesh, mp_policy=policy)

    def select_trainable(self) -> None:
        mode = self.hparams.trainable
        self.student.requires_grad_(mode == "all")
        # a Distil-xLSTM student has no teacher attention: its "new" parameters are the xLSTM blocks,
        # and only "all" also trains the copied embedding and head
        if mode == "attention" and isinstance(self.student, HybridStudent):
            for layer in self.student.lm.model.layers:
                layer.self_attn.requires_grad_(True)
        for _, p in self.student.new_parameters():
            p.requires_grad_(True)
        if mode == "new" and isinstance(self.student, HybridStudent) and self.student.hybrid_config.mode == "swa":
            raise ValueError("model.trainable='new' trains nothing when hybrid.mode='swa': without the memory branch "
                             "and the mix gate no new parameter reaches the output. Use trainable 'attention' (the "
                             "teacher's q/k/v/o projections re-tune to the window) or 'all'")

    def trainable_parameters(self):
        return [p for p in self.student.parameters() if p.requires_grad]

    def export_student(self) -> StudentLM | None:
        """The student as it should be saved: a plain, unsharded module. Under FSDP every rank must
        call this (it gathers the full weights); rank 0 gets the student, the others None."""
        if not self.sharded:
            return self.student
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self.student, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not self.trainer.is_global_zero:
            return None
        plain = type(self.student).skeleton(self.student.config, self.student.family_config,
                                            next(iter(full.values())).dtype)
        plain.load_state_dict(full)
        return plain.eval()

    # ---- optimisation ------------------------------------------------------------------------
    def configure_optimizers(self):
        hp = self.hparams
        params = self.trainable_parameters()
        if not params:
            raise ValueError("no trainable parameters: check model.trainable")
        optimizer = adamw(params, lr=hp.lr, weight_decay=hp.weight_decay)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = capped_warmup(hp.warmup_steps, total, hp.max_warmup_fraction)
        if hp.lr_schedule == "constant":
            multiplier = lambda step: warmup_constant(step, warmup)  # noqa: E731
        else:
            multiplier = lambda step: warmup_cosine(step, warmup, total, hp.min_lr_ratio)  # noqa: E731
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def optimizer_step(self, epoch, batch_idx, optimizer, optimizer_closure=None) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        # Lightning zeroes the gradients after the next step's forward (before its backward), so the
        # last step's gradients (the size of the trainable weights) would sit through that whole
        # forward, on top of its activations: released here, the forward's peak is lower by them.
        # Safe with gradient accumulation: this runs only on the window's last batch.
        optimizer.zero_grad(set_to_none=True)

    def on_before_optimizer_step(self, optimizer) -> None:
        named = [(n, p) for n, p in self.student.named_parameters() if p.requires_grad and p.grad is not None]
        if not named:
            return
        total = torch.stack([p.grad.detach().float().norm() for _, p in named]).norm()
        # with a loss scaler (fp16) overflowing steps are expected: the scaler skips them itself
        scaler = getattr(self.trainer.precision_plugin, "scaler", None) if self._trainer else None
        if scaler is None and not torch.isfinite(total):
            bad = next(n for n, p in named if not torch.isfinite(p.grad).all())
            raise NonFiniteLossError(self._stop_message(f"the gradient of {bad} is not finite (loss was finite)"))
        self.log("train/grad_norm", total, on_step=True)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        self.log_mix_gates()

    def log_mix_gates(self) -> None:
        """The mean mix gate o of each hybrid layer in this step's forward, as TensorBoard scalars
        ``gate/mean_o_layer_XX`` (and ``gate/mean_o`` over layers): near 0 a layer is its window,
        near 1 its memory, so a reader sees whether training uses the memory."""
        if not isinstance(self.student, HybridStudent):
            return
        values = []
        for idx, layer in enumerate(self.student.lm.model.layers):
            value = getattr(layer.self_attn, "mean_mix_gate", None)
            if value is None:
                continue
            layer.self_attn.mean_mix_gate = None  # each value is logged once
            values.append(value)
            self.log(f"gate/mean_o_layer_{idx:02d}", value, on_step=True)
        if values:
            self.log("gate/mean_o", torch.stack(values).mean(), on_step=True)

    def check_finite(self, **components: torch.Tensor) -> None:
        """Stop the run, naming the step and the component, if any loss component is NaN or Inf."""
        # one host sync per step when all is well; the per-component look only when it is not
        if torch.isfinite(torch.stack([v.detach().float().sum() for v in components.values()])).all():
            return
        bad = {name: value for name, value in components.items() if not torch.isfinite(value.detach()).all()}
        if bad:
            what = ", ".join(f"{name}={value.detach().float().flatten()[0].item()}" for name, value in bad.items())
            raise NonFiniteLossError(self._stop_message(f"loss component {what} is not finite"))

    def _stop_message(self, what: str) -> str:
        where = f"step {self.global_step}"
        if self._trainer is not None:
            where += f" (epoch {self.current_epoch}, batch {self.trainer.fit_loop.epoch_loop.batch_progress.current.completed})"
            callback = self.trainer.checkpoint_callback
            folder = getattr(callback, "dirpath", None)
            kept = (f"the last good checkpoint in {folder} is kept (nothing was saved for this step); "
                    if folder else "no checkpoint is written for this step; ")
        else:
            kept = ""
        return (f"training stopped at {where}: {what}. The optimizer step was not taken; {kept}"
                "lower model.init_args.lr, check the batch's data, or use float32 / bf16 instead of fp16, "
                "then resume with --ckpt_path last")

    def schedule_context(self) -> dict:
        """Inputs of the KD schedules: the run's total steps and steps per epoch."""
        total = int(self.trainer.estimated_stepping_batches) if self._trainer else None
        per_epoch = None
        if self._trainer and self.trainer.num_training_batches not in (None, float("inf")):
            per_epoch = max(int(self.trainer.num_training_batches) // self.trainer.accumulate_grad_batches, 1)
        return {"total_steps": total, "steps_per_epoch": per_epoch}

    # ---- validation and test (every stage) ---------------------------------------------------
    def validation_step(self, batch, batch_idx):
        self._score(batch)

    def test_step(self, batch, batch_idx):
        self._score(batch)

    def on_validation_epoch_end(self) -> None:
        self._log_scores("val")

    def on_test_epoch_end(self) -> None:
        self._log_scores("test")

    def _score(self, batch):
        """Student vs teacher on held-out text: CE of both, KL(teacher || student), top-1 agreement."""
        ids = batch["input_ids"]
        targets = next_token_targets(batch["labels"])
        n = (targets != IGNORE).sum()
        if n == 0:  # nothing to score: skip both forwards
            return
        with torch.no_grad():
            values = heldout_metrics(self.student(ids).logits, self.teacher(ids).logits, targets)
        for name, value in values.items():
            self.val_metrics[name].update(value, weight=n)

    def _log_scores(self, prefix: str) -> None:
        results = {name: metric.compute() for name, metric in self.val_metrics.items() if metric.update_called}
        for name, value in results.items():
            self.log(f"{prefix}/{name}", value, sync_dist=True)
        for who in ("student", "teacher"):
            if f"{who}_ce" in results:
                self.log(f"{prefix}/{who}_ppl", torch.exp(results[f"{who}_ce"]), sync_dist=True)
        for metric in self.val_metrics.values():
            metric.reset()
