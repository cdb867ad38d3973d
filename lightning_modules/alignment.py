"""Stage 1: every hybrid layer learns to reproduce its teacher layer's attention output from the
teacher's own attention input (MSE per layer, summed or averaged over layers). Under the lean plan
the layers run forward and backward one after another (``layer_by_layer_alignment``)."""

from __future__ import annotations

import torch

from models import HybridAttention, HybridStudent
from models.head_loss import HandOverGradients

from models import DistilXLSTMConfig, HybridConfig

from .base import DistillationModule
from .losses import LAYER_REDUCTIONS, alignment_mse, check_layer_reduction, combine_layer_losses


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


def layer_by_layer_alignment(attention_modules, captured, reduction: str):
    """The alignment loss (``alignment_mse`` over the layers) with each layer's forward and backward
    run in turn here: one layer's activations exist at a time and nothing is recomputed, since every
    layer's input is the teacher's and no layer's error reaches another. Returns (the loss, whose
    backward delivers the trainable parameters' gradients, [each layer's MSE, detached])."""
    check_layer_reduction(reduction)
    weight = 1.0 if reduction == "sum" else 1.0 / len(attention_modules)
    params = list(dict.fromkeys(p for m in attention_modules for p in m.parameters() if p.requires_grad))
    index = {id(p): i for i, p in enumerate(params)}
    grads: list[torch.Tensor | None] = [None] * len(params)
    per_layer = []
    for attn, (x, pe, target) in zip(attention_modules, captured):
        with torch.enable_grad():
            mse = alignment_mse([attn(hidden_states=x, position_embeddings=pe)[0]], [target])
            mine = [p for p in attn.parameters() if p.requires_grad]
            layer_grads = torch.autograd.grad(mse * weight, mine, allow_unused=True) if mine else ()
        for p, g in zip(mine, layer_grads):
            if g is not None:
                i = index[id(p)]
                grads[i] = g if grads[i] is None else grads[i].add_(g)
        per_layer.append(mse.detach())
    return HandOverGradients.apply(combine_layer_losses(per_layer, reduction), grads, *params), per_layer


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
        if self.layer_by_layer:  # each layer's backward runs right after its forward: nothing to recompute
            for i in self.hybrid_layers():
                self.student.lm.model.layers[i].self_attn.recompute_in_backward = False

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

    @property
    def layer_by_layer(self) -> bool:
        """The lean plan's alignment: each layer's forward and backward in turn
        (``layer_by_layer_alignment``) instead of recomputing the hybrid op. Not under FSDP, whose
        gradient reduction runs from the one backward of the whole step."""
        return bool(self.hparams.recompute_activations) and not self.sharded

    def training_step(self, batch, batch_idx):
        layers = self.hybrid_layers()
        captured = capture_teacher_attention(self.teacher, batch["input_ids"], layers)
        modules = [self.student.lm.model.layers[i].self_attn for i in layers]
        if self.layer_by_layer:
            loss, per_layer = layer_by_layer_alignment(modules, captured, self.hparams.layer_loss)
        else:
            student_out = [attn(hidden_states=x, position_embeddings=pe)[0] for attn, (x, pe, _) in zip(modules, captured)]
            per_layer = [alignment_mse([s], [t]) for s, (_, _, t) in zip(student_out, captured)]
            loss = combine_layer_losses(per_layer, self.hparams.layer_loss)
        if not torch.isfinite(loss):  # name the layers that broke
            self.check_finite(**{f"alignment_mse_layer_{i}": mse for i, mse in zip(layers, per_layer)},
                              alignment_mse=loss)
        self.log("train/alignment_mse", loss, on_step=True, prog_bar=True)
        self.log("train/loss", loss, on_step=True)
        return loss
