"""Tensors the backward rebuilds instead of keeping (the lean plan, DESIGN §4).

A lean RMS norm (``models.lean_backward.LeanRMSNorm``) keeps its input and 1 / rms for its own
backward; its output, which the next products keep for their weight gradients, is one elementwise
pass away from those. Its output therefore carries what rebuilds it (``lean_norm_recipe``), and a
consumer either computes its own backward from the recipe (``LeanGatedMLP``) or runs its products
inside ``rebuilt_in_backward``, where autograd keeps the recipe in place of any tensor sharing the
output's memory and rebuilds it, bit for bit, when the backward reads it.
"""

from __future__ import annotations

import contextlib

import torch


def normed_again(x: torch.Tensor, rstd: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A lean norm's output from its input and 1 / rms, by the same ops as its forward (bit for bit)."""
    return weight * (x.to(torch.float32) * rstd).to(x.dtype)


def lean_norm_recipe(y: torch.Tensor):
    """(x, 1 / rms, weight) that rebuild ``y`` if it is a lean norm's output not modified since,
    else None."""
    recipe = getattr(y, "_lean_norm", None)
    if recipe is None or recipe[3] != y._version:
        return None
    return recipe[:3]


@contextlib.contextmanager
def rebuilt_in_backward(y: torch.Tensor):
    """Within the block, a tensor autograd would keep that is ``y`` or a view of it is kept as ``y``'s
    recipe and rebuilt when the backward reads it. Does nothing where ``y`` has no recipe."""
    recipe = lean_norm_recipe(y)
    if recipe is None or not y.is_contiguous() or y.storage_offset() != 0:
        yield
        return
    storage = y.untyped_storage()
    ptr, nbytes, version, dtype = storage.data_ptr(), storage.nbytes(), y._version, y.dtype

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() == ptr and s.nbytes() == nbytes and t._version == version and t.dtype == dtype:
            return _Rebuild(recipe, t.size(), t.stride(), t.storage_offset())
        return t

    def unpack(packed):
        if isinstance(packed, _Rebuild):
            return normed_again(*packed.recipe).as_strided(packed.size, packed.stride, packed.offset)
        return packed

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


class _Rebuild:
    """A kept view of a lean norm's output: the recipe and the view's geometry."""

    __slots__ = ("recipe", "size", "stride", "offset")

    def __init__(self, recipe, size, stride, offset):
        self.recipe, self.size, self.stride, self.offset = recipe, size, stride, offset
