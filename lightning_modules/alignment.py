"""Stage 1: every hybrid layer learns to reproduce its teacher layer's attention output from the
teacher's own attention input (all layers at once, mean over layers of MSE)."""

from __future__ import annotations

import torch

from models import HybridAttention, HybridStudent

from models import DistilXLSTMConfig, HybridConfig

from .base import DistillationModule
from .losses import LAYER_REDUCTIONS, alignment_mse


def capture_teacher_attention(teacher, input_ids: torch.Tensor, layers: list[int]):
    """One frozen teacher forward; per requested layer the attention module's input hidden states,
    position embeddings and output, captured with forward hooks."""
    captured: dict[int, tuple] = {}
    handles = []
    for idx in layers:
        attn = teacher.model.layers[idx].self_attn

        def hook(module, args, kwargs, output, idx=idx):
            captured[idx] = (kwargs["hidden_states"], kwargs["position_embeddings"], output[0])

        handles.append(attn.register_forward_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            teacher(input_ids, logits_to_keep=1)  # the hooks need the layers, not the vocabulary-sized head
    finally:
        for h in handles:
            h.remove()
    return [captured[i] for i in layers]


class AlignmentModule(DistillationModule):
    """Teacher frozen; each student hybrid layer gets the teacher's layer input and is trained to
    match the teacher's attention output. Trainable: ``new`` (default), ``attention`` or ``all``.

    Teacher-forced (the paper's Stage I, LoLCATs-style): one frozen teacher forward per batch
    captures every attention layer's input and output, then each hybrid attention module runs
    forward and backward on its own teacher input. No MLP, norm, embedding or LM head of the
    student runs, and no error of one layer reaches the next. Defaults are the paper's: peak LR
    1e-2 after a linear warm-up, cosine decay to 1e-5 (``min_lr_ratio`` 1e-3), loss summed over layers.
    """

    def __init__(self, teacher: str = "smollm2-135m-instruct", student_ckpt: str | None = None,
                 hybrid: HybridConfig = HybridConfig(), trainable: str = "new", lr: float = 1e-2,
                 weight_decay: float = 0.0, warmup_steps: int = 10, min_lr_ratio: float = 1e-3,
                 teacher_dtype: str = "float32", trust_remote_code: bool = False,
                 fsdp_param_dtype: str | None = None, activation_checkpointing: bool = False,
                 student_family: str = "hybrid", distil_xlstm: DistilXLSTMConfig = DistilXLSTMConfig(),
                 lr_schedule: str = "cosine", max_warmup_fraction: float = 0.1, layer_loss: str = "sum",
                 recompute_activations: bool = True):
        """
        Args:
            layer_loss: how the per-layer MSEs combine: ``sum`` (the paper's Eq. 12) or ``mean``.
        """
        super().__init__(teacher=teacher, student_ckpt=student_ckpt, hybrid=hybrid, trainable=trainable, lr=lr,
                         weight_decay=weight_decay, warmup_steps=warmup_steps, min_lr_ratio=min_lr_ratio,
                         teacher_dtype=teacher_dtype, trust_remote_code=trust_remote_code,
                         fsdp_param_dtype=fsdp_param_dtype, activation_checkpointing=activation_checkpointing,
                         student_family=student_family, distil_xlstm=distil_xlstm, lr_schedule=lr_schedule,
                         max_warmup_fraction=max_warmup_fraction, recompute_activations=recompute_activations)
        if layer_loss not in LAYER_REDUCTIONS:
            raise ValueError(f"layer_loss={layer_loss!r} is not supported; allowed values: {', '.join(LAYER_REDUCTIONS)}")
        self.save_hyperparameters()
        self.plain_hparams()

    def configure_model(self) -> None:
        if self.student is not None:
            return
        if self.hparams.student_family == "distil_xlstm" and not self.hparams.student_ckpt:
            raise ValueError(self._no_layers_message("student_family='distil_xlstm'"))
        super().configure_model()
        if not isinstance(self.student, HybridStudent):
            raise ValueError(self._no_layers_message(f"model.student_ckpt={self.hparams.student_ckpt!r} "
                                                     f"(a {self.student.family} student)"))

    @staticmethod
    def _no_layers_message(what: str) -> str:
        return (f"AlignmentModule aligns hybrid layers with the teacher's attention layers, but {what} has none; "
                "train a Distil-xLSTM student with SparseKDModule (its beta schedule adds the Frobenius "
                "hidden-state term)")

    def fsdp_units(self, model):
        # training calls the student's attention modules directly, so they are the units
        if model is self.student:
            return [layer.self_attn for layer in self.student.lm.model.layers]
        return super().fsdp_units(model)

    def hybrid_layers(self) -> list[int]:
        return [i for i, layer in enumerate(self.student.lm.model.layers) if isinstance(layer.self_attn, HybridAttention)]

    def training_step(self, batch, batch_idx):
        layers = self.hybrid_layers()
        captured = capture_teacher_attention(self.teacher, batch["input_ids"], layers)
        student_out = [
            self.student.lm.model.layers[i].self_attn(hidden_states=x, position_embeddings=pe)[0]
            for i, (x, pe, _) in zip(layers, captured)
        ]
        loss = alignment_mse(student_out, [out for _, _, out in captured], reduction=self.hparams.layer_loss)
        if not torch.isfinite(loss):  # name the layers that broke
            self.check_finite(**{f"alignment_mse_layer_{i}": alignment_mse([s], [t])
                                 for i, s, (_, _, t) in zip(layers, student_out, captured)}, alignment_mse=loss)
        self.log("train/alignment_mse", loss, on_step=True, prog_bar=True)
        self.log("train/loss", loss, on_step=True)
        return loss
