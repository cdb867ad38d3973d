"""Stage 1: every hybrid layer learns to reproduce its teacher layer's attention output from the
teacher's own attention input (all layers at once, mean over layers of MSE)."""

from __future__ import annotations

import torch

from models import HybridAttention, HybridStudent

from .base import DistillationModule
from .losses import alignment_mse


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
    match the teacher's attention output. Trainable: ``new`` (default), ``attention`` or ``all``."""

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
        loss = alignment_mse(student_out, [out for _, _, out in captured])
        if not torch.isfinite(loss):  # name the layers that broke
            self.check_finite(**{f"alignment_mse_layer_{i}": alignment_mse([s], [t])
                                 for i, s, (_, _, t) in zip(layers, student_out, captured)}, alignment_mse=loss)
        self.log("train/alignment_mse", loss, on_step=True, prog_bar=True)
        self.log("train/loss", loss, on_step=True)
        return loss
