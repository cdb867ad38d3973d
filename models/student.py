"""The hybrid student: a copy of the teacher whose attention modules are hybrid layers."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

from .adapters import attention_shape, get_adapter
from .compiled_step import LayerStep, compiled_layer_step, eager_layer_step
from .config import HybridConfig
from .head_loss import DEFAULT_CHUNK_TOKENS, ChunkLoss, head_loss
from .hybrid_layer import FullAttention, HybridAttention
from .state import DecodeState
from .targets import IGNORE
from .teacher import teacher_fingerprint


@dataclass
class HybridCausalLMOutput(ModelOutput):
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    hidden_states: tuple | None = None
    decode_state: DecodeState | None = None
    # with ``chunk_loss``: each component's detached total (the logits were never held at once)
    loss_components: dict | None = None


def decoder_stack(lm: nn.Module):
    base = getattr(lm, "model", None)
    if base is None or not hasattr(base, "layers") or not hasattr(lm, "lm_head"):
        raise ValueError(
            f"{type(lm).__name__} is not a supported causal LM: expected .model.layers and .lm_head "
            "(a transformers *ForCausalLM of a supported family)"
        )
    return base


def _left_align(attention_mask: torch.Tensor):
    """Gather indices that move each row's real tokens to the front, and their inverse.

    A causal model does not see tokens after a position, so right padding is harmless; left
    padding would shift positions, sinks and the memory. Rolling every row to start at 0 makes
    the result of a padded row exactly that of the unpadded sequence.
    """
    mask = attention_mask.bool()
    B, T = mask.shape
    lengths = mask.sum(1)
    first = torch.where(lengths > 0, mask.float().argmax(1), torch.zeros_like(lengths))
    ar = torch.arange(T, device=mask.device)
    contiguous = ((ar[None] >= first[:, None]) & (ar[None] < (first + lengths)[:, None])) == mask
    if not bool(contiguous.all()):
        raise ValueError(
            "attention_mask must mark one contiguous block of real tokens per row (left or right padding); "
            "masks with holes are not supported"
        )
    gather = (ar[None] + first[:, None]) % T
    scatter = (ar[None] - first[:, None]) % T
    return gather, scatter, lengths


class StudentLM(nn.Module):
    """What every student family shares: the Hugging Face-style call (padding, labels, hidden
    states, ``logits_to_keep``, a loss over the head in chunks) and recurrent decoding through
    ``decode_state``. A family implements ``skeleton``, ``_body``, ``new_parameters``, ``describe``
    and the properties ``head`` (the vocabulary-sized linear layer), ``config`` (the teacher's model
    config), ``family_config`` and ``num_layers``."""

    family = "student"
    tokenizer = None  # set by load_student when the folder has one
    teacher_fingerprint: str | None = None  # of the teacher it was converted from (models.teacher)

    @classmethod
    def skeleton(cls, model_config, family_config, dtype: torch.dtype = torch.float32) -> "StudentLM":
        """An untrained student of this family for a teacher's model config (weights to be loaded)."""
        raise NotImplementedError(f"{cls.__name__} must implement skeleton")

    def new_decode_state(self) -> DecodeState:
        return DecodeState.new(self.num_layers)

    def forward(self, input_ids, attention_mask=None, position_ids=None, decode_state: DecodeState | None = None,
                labels=None, output_hidden_states: bool = False, use_cache: bool | None = None,
                return_dict: bool | None = None, logits_to_keep: int = 0, chunk_loss: ChunkLoss | None = None,
                chunk_tokens: int = DEFAULT_CHUNK_TOKENS):
        # use_cache / return_dict are accepted so Hugging Face-style callers work unchanged: the
        # output is always a ModelOutput, and decoding state travels in ``decode_state``.
        # logits_to_keep (as in Hugging Face): 0 computes logits at every position, n > 0 only at
        # the last n; a prefill needs one row of the vocabulary-sized head, not T.
        # chunk_loss (training): the loss it defines over the logits, computed chunk_tokens positions
        # at a time with its gradient (models.head_loss); ``logits`` is then None.
        if logits_to_keep and labels is not None:
            raise ValueError("logits_to_keep and labels cannot be combined: the loss needs every position's logits")
        if chunk_loss is not None and (labels is not None or logits_to_keep or decode_state is not None):
            raise ValueError("chunk_loss is the whole loss over every position's logits: it cannot be combined with "
                             "labels, logits_to_keep or decode_state; put the cross-entropy inside chunk_loss")
        if chunk_loss is not None and attention_mask is not None and not bool(attention_mask.bool().all()):
            raise ValueError("chunk_loss needs an unpadded batch (every attention_mask entry 1); mark padded positions "
                             "IGNORE in the targets chunk_loss reads instead of padding the attention")
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            if decode_state is not None:
                raise ValueError("decode_state with a padded attention_mask is not supported; use models.generate")
            gather, scatter, _ = _left_align(attention_mask)
            right_padded = bool((gather == torch.arange(gather.shape[1], device=gather.device)).all())
            if logits_to_keep and right_padded:
                # causal: the real tokens before the padding see none of it, so the last n positions
                # of the padded batch are those of the unpadded forward (no vocabulary head on the rest)
                return self._forward_unpadded(input_ids, None, output_hidden_states, logits_to_keep)
            if logits_to_keep:
                raise ValueError("logits_to_keep needs an unpadded or right-padded batch (left padding moves "
                                 "the last positions); use models.generate for left-padded prompts")
            out = self._forward_unpadded(input_ids.gather(1, gather), None, output_hidden_states, 0)
            index = scatter.unsqueeze(-1)
            logits = out.logits.gather(1, index.expand(-1, -1, out.logits.shape[-1]))
            hidden = None
            if out.hidden_states is not None:
                hidden = tuple(h.gather(1, index.expand(-1, -1, h.shape[-1])) for h in out.hidden_states)
            loss = self._loss(logits, labels, attention_mask) if labels is not None else None
            return HybridCausalLMOutput(loss=loss, logits=logits, hidden_states=hidden)
        out = self._forward_unpadded(input_ids, decode_state, output_hidden_states, logits_to_keep, position_ids,
                                     chunk_loss, chunk_tokens)
        if labels is not None:
            out.loss = self._loss(out.logits, labels, attention_mask)
        return out

    def _forward_unpadded(self, input_ids, decode_state, output_hidden_states, logits_to_keep, position_ids=None,
                          chunk_loss=None, chunk_tokens=DEFAULT_CHUNK_TOKENS):
        hidden, all_hidden = self._body(input_ids, decode_state, output_hidden_states, position_ids)
        if output_hidden_states:
            all_hidden = (*all_hidden[:-1], hidden)  # as Hugging Face: the last entry is after the final norm
        if chunk_loss is not None:
            loss, components = head_loss(hidden, self.head, chunk_loss, chunk_tokens)
            return HybridCausalLMOutput(loss=loss, loss_components=components, decode_state=decode_state,
                                        hidden_states=all_hidden)
        logits = self.head(hidden[:, -logits_to_keep:] if logits_to_keep else hidden)
        return HybridCausalLMOutput(logits=logits, decode_state=decode_state, hidden_states=all_hidden)

    def _body(self, input_ids, decode_state, output_hidden_states, position_ids=None):
        """(the final-normed hidden states [B, T, d] the head reads, every layer's hidden states
        (embeddings first) or None)."""
        raise NotImplementedError(f"{type(self).__name__} must implement _body")

    @property
    def head(self) -> nn.Linear:
        raise NotImplementedError(f"{type(self).__name__} must implement head")

    @staticmethod
    def _loss(logits, labels, attention_mask):
        labels = labels.clone()
        if attention_mask is not None:
            labels[~attention_mask.bool()] = IGNORE
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE)


class HybridStudent(StudentLM):
    """Causal LM whose attention layers are ``HybridAttention`` (or kept ``FullAttention``).

    ``student(input_ids, attention_mask=None).logits`` is [B, T, vocab] like a Hugging Face
    causal LM. ``decode_state`` (``DecodeState.new(num_layers)``) turns on stateful prefill and
    recurrent steps; see ``models.generate``.
    """

    family = "hybrid"

    def __init__(self, lm: nn.Module, hybrid_config: HybridConfig):
        super().__init__()
        self.lm = lm
        self.hybrid_config = hybrid_config
        self.compiled_decode = False  # compile_decode_step

    @classmethod
    def skeleton(cls, model_config, family_config: HybridConfig, dtype: torch.dtype = torch.float32) -> "HybridStudent":
        return student_from_config(model_config, family_config, dtype)

    @property
    def config(self):
        return self.lm.config

    @property
    def family_config(self) -> HybridConfig:
        return self.hybrid_config

    @property
    def num_layers(self) -> int:
        return len(decoder_stack(self.lm).layers)

    def new_parameters(self):
        """(name, parameter) pairs that conversion added (gates, feature maps and norms of the hybrid
        layers)."""
        for name, module in self.named_modules():
            if isinstance(module, HybridAttention):
                for pname, p in module.new_named_parameters():
                    yield f"{name}.{pname}", p

    def describe(self) -> str:
        return self.hybrid_config.describe()

    def use_op_backend(self, backend: str) -> "HybridStudent":
        """Run every hybrid layer's op on ``backend`` (``kernels.BACKENDS``): an execution choice
        (the maths is the same), so a stage may set it on a student it loaded, e.g. ``compiled`` for
        training at a fixed length."""
        from kernels import BACKENDS

        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r} is not supported; allowed values: {', '.join(BACKENDS)}")
        configs = {id(self.hybrid_config): self.hybrid_config}
        configs.update({id(m.cfg): m.cfg for m in self.modules() if isinstance(m, HybridAttention)})
        for config in configs.values():
            config.backend = backend
        return self

    def compile_decode_step(self, enabled: bool = True) -> "HybridStudent":
        """Decode through the compiled decoder-layer step (``models.compiled_step``): the same maths
        as the eager step, several times fewer dispatches per token. The first step compiles (seconds
        on a CPU; a C++ compiler on a CPU, Triton on a GPU); worth it from a few dozen generated
        tokens on. Layers kept as full attention (a growing cache) step eagerly; prefill and
        training are unchanged. Returns the student."""
        self.compiled_decode = enabled
        return self

    @property
    def head(self) -> nn.Linear:
        return self.lm.lm_head

    def _body(self, input_ids, decode_state, output_hidden_states, position_ids=None):
        base = decoder_stack(self.lm)
        hidden_states = base.embed_tokens(input_ids)
        if position_ids is None:
            start = decode_state.positions if decode_state is not None and decode_state.started else None
            ar = torch.arange(input_ids.shape[1], device=input_ids.device)
            position_ids = ar[None].expand(input_ids.shape[0], -1) if start is None else start[:, None] + ar[None]
        position_embeddings = base.rotary_emb(hidden_states, position_ids=position_ids)
        all_hidden = [hidden_states] if output_hidden_states else None
        stepping = decode_state is not None and decode_state.started and input_ids.shape[1] == 1
        layer_step = compiled_layer_step(input_ids.device) if stepping and self.compiled_decode else eager_layer_step
        for index, layer in enumerate(base.layers):
            if stepping and isinstance(layer.self_attn, HybridAttention):
                # one token from a constant-size state: the whole decoder layer as one step (one
                # compiled graph when compile_decode_step is on)
                step = LayerStep(decode_state.layers[index], layer.self_attn.gate_folding())
                hidden_states, decode_state.layers[index] = layer_step(layer, hidden_states, position_embeddings, step)
            else:
                hidden_states = layer(hidden_states, attention_mask=None, position_ids=position_ids,
                                      position_embeddings=position_embeddings, decode_state=decode_state)
            if output_hidden_states:
                all_hidden.append(hidden_states)
        return base.norm(hidden_states), all_hidden


def student_from_config(model_config, hybrid_config: HybridConfig, dtype: torch.dtype = torch.float32) -> HybridStudent:
    """An untrained student skeleton from a teacher's model config (weights to be loaded)."""
    from transformers import AutoModelForCausalLM

    # a random model's fingerprint would be meaningless: the loader sets the saved one
    return _swap_attention(AutoModelForCausalLM.from_config(model_config, dtype=dtype), hybrid_config)


def convert_to_hybrid(teacher: nn.Module, cfg: HybridConfig | None = None) -> HybridStudent:
    """A new hybrid student from ``teacher`` (left untouched): every attention module becomes a
    ``HybridAttention`` on copies of the teacher's q/k/v/o, except ``cfg.full_attention_layers``.
    The student records the teacher's fingerprint."""
    student = _swap_attention(teacher, cfg)
    student.teacher_fingerprint = teacher_fingerprint(teacher)
    return student


def _swap_attention(teacher: nn.Module, cfg: HybridConfig | None) -> HybridStudent:
    cfg = cfg or HybridConfig()
    if not isinstance(cfg, HybridConfig):
        raise TypeError(f"cfg must be a models.HybridConfig, got {type(cfg).__name__}")
    adapter = get_adapter(teacher.config)
    num_layers = len(decoder_stack(teacher).layers)
    out_of_range = [i for i in cfg.full_attention_layers if i >= num_layers]
    if out_of_range:
        raise ValueError(
            f"HybridConfig.full_attention_layers has {out_of_range}, but the teacher has {num_layers} layers "
            f"(allowed values: 0..{num_layers - 1})"
        )
    lm = copy.deepcopy(teacher)
    lm.requires_grad_(True)
    for idx, layer in enumerate(decoder_stack(lm).layers):
        shape = attention_shape(lm.config, layer.self_attn, idx)
        if idx in cfg.full_attention_layers:
            layer.self_attn = FullAttention(layer.self_attn, adapter, shape, idx)
        else:
            layer.self_attn = HybridAttention(layer.self_attn, adapter, shape, cfg, idx)
    student = HybridStudent(lm, copy.deepcopy(cfg))
    student.train(teacher.training)
    return student


# Fields that decide whether a student's weights line up with a teacher's.
_MATCH_FIELDS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "intermediate_size", "rope_theta", "tie_word_embeddings")


def check_student_matches_teacher(student: HybridStudent, teacher: nn.Module, source: str = "student") -> None:
    """Refuse a student converted from a different teacher, naming the first differing field."""
    for field in _MATCH_FIELDS:
        mine, theirs = getattr(student.config, field, None), getattr(teacher.config, field, None)
        if mine != theirs:
            raise ValueError(f"{source} was made from another teacher: config field {field!r} is {mine!r} in the "
                             f"student but {theirs!r} in the loaded teacher; load the teacher it was converted from")
