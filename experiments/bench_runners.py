"""The teacher's and the student's decoding, as the benchmarks drive it.

``TeacherRunner`` and ``StudentRunner`` give both models one interface (prefill a prompt, take a
greedy step from a cache or state, repeat that cache over a batch, count its bytes), so that a
benchmark times them with the same loop; ``projections_only`` turns a hybrid student into the
part of decoding that teacher and student share (the shared floor of the decode benchmark).
Separate from the benchmarks themselves because it is about the models, not about measuring.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from models import HybridStudent, StudentLM, prefill
from models.adapters import project_qkv


def kv_cache_bytes(cache) -> int:
    """Bytes of a Hugging Face cache's keys and values (every layer)."""
    total = 0
    for layer in cache.layers:
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


def _teacher_forward(teacher, ids, cache=None):
    # transformers 5 names the cache argument ``cache`` (``past_key_values`` is deprecated)
    out = teacher(ids, cache=cache, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1], out.cache


class TeacherRunner:
    """Prefill and greedy steps of a Hugging Face teacher with its own (dynamic) KV cache."""

    kind = "teacher"

    def __init__(self, model):
        self.model = model

    def prefill(self, ids):
        return _teacher_forward(self.model, ids)

    def step(self, token, cache):
        logits, cache = _teacher_forward(self.model, token[:, None], cache)
        return logits, cache

    @staticmethod
    def repeat(cache, batch: int):
        cache.batch_repeat_interleave(batch)
        return cache

    @staticmethod
    def state_bytes(cache) -> int:
        return kv_cache_bytes(cache)


class StudentRunner:
    """Prefill (chunkwise form) and recurrent greedy steps of a student from its decode state."""

    kind = "student"

    def __init__(self, model: StudentLM):
        self.model = model

    def prefill(self, ids):
        return prefill(self.model, ids)

    def step(self, token, state):
        return self.model(token[:, None], decode_state=state).logits[:, -1], state

    @staticmethod
    def repeat(state, batch: int):
        return state.index_select(torch.zeros(batch, dtype=torch.long, device=state.positions.device))

    @staticmethod
    def state_bytes(state) -> int:
        return state.nbytes()


class _ProjectionsOnly(nn.Module):
    """A layer's q/k/v/o products and nothing else: the part of attention that teacher and student
    share, so that a student running these in place of its attention decodes at the shared floor."""

    def __init__(self, attention):
        super().__init__()
        self.inner = attention

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, decode_state=None, **kwargs):
        inner = self.inner
        q, _, _ = project_qkv(inner.adapter, inner, inner.shape, hidden_states)
        B, H, T, D = q.shape
        return inner.o_proj(q.transpose(1, 2).reshape(B, T, H * D)), None


@contextlib.contextmanager
def projections_only(student: HybridStudent):
    """Temporarily replace every attention module of ``student`` by its q/k/v/o products alone."""
    layers = student.lm.model.layers
    originals = [layer.self_attn for layer in layers]
    try:
        for layer in layers:
            layer.self_attn = _ProjectionsOnly(layer.self_attn)
        yield student
    finally:
        for layer, attention in zip(layers, originals):
            layer.self_attn = attention
