"""Which memory allocator a CPU training process runs under, and what to change when it is glibc's.

The lean plan frees and reallocates most of a step's activations every step. glibc's malloc keeps
the freed blocks in its heaps, so a process's resident peak sits well above its live tensors: the
lean KD step of the SmolLM2 pair at batch 4 x 512 peaked at 6.1 GiB under glibc against 4.4 GiB
with tcmalloc preloaded at release rate 0, and ran slower (docs/performance.md, "Training step per
stage"). tcmalloc's default release rate hands freed pages back to the system, and the next step
faults them in again. The allocator is chosen when the process starts (``LD_PRELOAD``), before any
Python runs, so a fit can only say so, at its start, not switch.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import lightning as L
from lightning.pytorch.utilities import rank_zero_warn

PRELOAD = "LD_PRELOAD=libtcmalloc_minimal.so.4 TCMALLOC_RELEASE_RATE=0"


def mapped_libraries() -> str | None:
    """This process's memory map (Linux ``/proc/self/maps``): the shared libraries loaded into it;
    None where the system has no such file (the allocator cannot be told there)."""
    try:
        with open("/proc/self/maps") as maps:
            return maps.read()
    except OSError:
        return None


def allocator_name(mapped: str | None, environ: Mapping[str, str]) -> str | None:
    """The malloc a process runs under, from its memory map (``mapped_libraries()``) and environment:
    "jemalloc", "tcmalloc" (with its release rate where the environment sets one, as
    "tcmalloc (TCMALLOC_RELEASE_RATE=0)") or "glibc"; None where the map is unknown. Benchmarks
    record it beside their numbers: the same step's peak and speed move with it."""
    if mapped is None:
        return None
    if "libjemalloc" in mapped:
        return "jemalloc"
    if "libtcmalloc" in mapped:
        rate = environ.get("TCMALLOC_RELEASE_RATE")
        return "tcmalloc" if rate is None else f"tcmalloc (TCMALLOC_RELEASE_RATE={rate.strip()})"
    return "glibc"


def allocator_advice(mapped: str | None, environ: Mapping[str, str]) -> str | None:
    """What a CPU training process should change about its allocator, or None.

    ``mapped``: the process's memory map (``mapped_libraries()``; None: unknown, no advice);
    ``environ``: its environment. jemalloc, preloaded, is the user's choice and left alone (it kept
    the peak as low as tcmalloc but ran slower)."""
    name = allocator_name(mapped, environ)
    if name is None or name == "jemalloc":
        return None
    if name.startswith("tcmalloc"):
        if environ.get("TCMALLOC_RELEASE_RATE", "").strip() == "0":
            return None
        return ("tcmalloc is preloaded with its default release rate: it hands the pages a step frees back to the "
                "system and the next step faults them in again (about 490,000 page faults a lean KD step against "
                "2,000). Start the run with TCMALLOC_RELEASE_RATE=0 as well; the peak memory does not rise")
    return ("training on a CPU under glibc's malloc, which keeps freed blocks in its heaps: the lean KD step peaked "
            "at 6.1 GiB under it against 4.4 GiB with tcmalloc at release rate 0, and ran slower "
            f"(docs/performance.md). Start the run as `{PRELOAD} python -m experiments.run fit ...` (Debian/Ubuntu: "
            "apt install libgoogle-perftools4)")


class AllocatorAdvice(L.Callback):
    """At the start of a fit on a CPU: a warning naming the fix when the process runs under glibc's
    malloc or under tcmalloc with its default release rate (``allocator_advice``)."""

    def __init__(self, enabled: bool = True):
        """
        Args:
            enabled: warn at all (off: the allocator is a deliberate choice).
        """
        self.enabled = enabled

    def setup(self, trainer, pl_module, stage: str) -> None:
        if not self.enabled or stage != "fit" or trainer.strategy.root_device.type != "cpu":
            return
        advice = allocator_advice(mapped_libraries(), os.environ)
        if advice:
            rank_zero_warn(advice)
