"""Kernel tests: Triton runs compiled on CUDA, else in its CPU interpreter.

TRITON_INTERPRET must be set before anything imports Triton ("0 active drivers" otherwise); the
root tests/conftest.py sets it first thing, because tests outside this folder import Triton
modules too. The interpreter computes bf16 ``tl.dot`` wrongly (triton issue 11584), so
interpreted tests use float32 and float16 and bf16 tests are ``gpu``-marked.
"""

import os

import pytest
import torch


def triton_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session", autouse=True)
def triton_runs_somewhere():
    if not torch.cuda.is_available():
        assert os.environ.get("TRITON_INTERPRET") == "1", "TRITON_INTERPRET=1 must be set before Triton loads"


@pytest.fixture
def nan_filled_empty(monkeypatch):
    """torch.empty / empty_like filled with NaN, so memory a kernel should write but does not fails
    the comparison instead of passing on zeros left by the allocator."""
    empty, empty_like = torch.empty, torch.empty_like

    def fill(x):
        return x.fill_(float("nan")) if x.is_floating_point() else x

    monkeypatch.setattr(torch, "empty", lambda *a, **k: fill(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: fill(empty_like(*a, **k)))
