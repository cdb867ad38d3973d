"""Decode state of a whole student: one entry per decoder layer."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch

from kernels import HybridState


@dataclass
class KVCacheState:
    """Growing KV cache of a layer kept as full attention. Columns are appended per step for the
    whole batch; ``valid`` marks which columns hold a real token of each row (rows prefilled at
    different lengths are right-padded)."""

    k: torch.Tensor  # [B, Hkv, N, D]
    v: torch.Tensor  # [B, Hkv, N, Dv]
    valid: torch.Tensor  # [B, N] bool
    pos: torch.Tensor  # [B] long

    def tensors(self):
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def index_select(self, index):
        return replace(self, **{k: t.index_select(0, index) for k, t in self.tensors().items()})

    @staticmethod
    def cat(states):
        width = max(s.k.shape[2] for s in states)

        def pad(t, value):
            extra = width - t.shape[2 if t.dim() == 4 else 1]
            if extra == 0:
                return t
            shape = list(t.shape)
            shape[2 if t.dim() == 4 else 1] = extra
            return torch.cat([t, t.new_full(shape, value)], 2 if t.dim() == 4 else 1)

        return KVCacheState(
            k=torch.cat([pad(s.k, 0) for s in states]), v=torch.cat([pad(s.v, 0) for s in states]),
            valid=torch.cat([pad(s.valid, False) for s in states]), pos=torch.cat([s.pos for s in states]),
        )


@dataclass
class DecodeState:
    """What recurrent decoding carries between calls: ``layers[i]`` is None before the prefill."""

    layers: list = field(default_factory=list)

    @classmethod
    def new(cls, num_layers: int) -> "DecodeState":
        return cls(layers=[None] * num_layers)

    @property
    def started(self) -> bool:
        return any(s is not None for s in self.layers)

    @property
    def positions(self) -> torch.Tensor:
        return next(s.pos for s in self.layers if s is not None)

    def nbytes(self) -> int:
        return sum(s.nbytes() for s in self.layers if s is not None)

    def index_select(self, index: torch.Tensor) -> "DecodeState":
        return DecodeState([s.index_select(index) for s in self.layers])

    @staticmethod
    def cat(states: list["DecodeState"]) -> "DecodeState":
        out = []
        for per_layer in zip(*(s.layers for s in states)):
            kind = type(per_layer[0])
            out.append(kind.cat(list(per_layer)))
        return DecodeState(out)


__all__ = ["DecodeState", "HybridState", "KVCacheState"]
