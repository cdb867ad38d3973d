"""How the benchmarks measure: the machine they ran on, the clock, peak memory, allocation failures.

Held apart from ``experiments.bench`` because none of it knows about teachers, students or
benchmarks: a description of the machine (CPU, threads, GPU, library and code versions), a
device-drained clock (``timed``), the peak memory of a block (``PeakMemory``: the CUDA allocator's
peak, or on a CPU the resident-set high-water mark read from ``/proc/self/status`` after a reset
through ``/proc/self/clear_refs``), the test for an out-of-memory error, and a model's weight bytes.
"""

from __future__ import annotations

import gc
import os
import platform
import time
from pathlib import Path

import torch
from torch import nn

MiB = 2**20


# ---- the machine and its clocks ---------------------------------------------------------------------

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_description(device: torch.device) -> dict:
    """What the numbers were measured on: CPU, threads, GPU, library versions, code version."""
    import transformers

    from callbacks.allocator import allocator_name, mapped_libraries
    from experiments.runner import provenance

    info = {"cpu": cpu_model(), "logical_cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "device": str(device), "torch": torch.__version__, "transformers": transformers.__version__,
            "platform": platform.platform(), "allocator": allocator_name(mapped_libraries(), os.environ),
            **provenance()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_bytes=props.total_memory, cuda=torch.version.cuda)
    return info


def describe_machine(info: dict) -> str:
    gpu = f", GPU {info['gpu']} ({info['gpu_memory_bytes'] / 2**30:.0f} GiB)" if info.get("gpu") else ""
    allocator = f"; malloc: {info['allocator']}" if info.get("allocator") else ""
    return (f"{info['cpu']} ({info['logical_cpus']} logical CPUs, torch threads {info['torch_threads']}){gpu}; "
            f"torch {info['torch']}, transformers {info['transformers']}, triton {info['triton']}{allocator}")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device):
    """(result, seconds) of one call, the device drained before and after."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - start


# What running out of memory raises: CUDA's own error, and the CPU allocator's RuntimeError
# ("DefaultCPUAllocator: can't allocate memory"); out_of_memory() tells the latter from other errors.
OUT_OF_MEMORY = (torch.OutOfMemoryError, RuntimeError)


def out_of_memory(err: BaseException) -> str:
    """The row's error text for an allocation failure; any other error is raised again."""
    text = str(err)
    if isinstance(err, torch.OutOfMemoryError) or "can't allocate memory" in text:
        return f"out of memory: {text.splitlines()[0][:200]}"
    raise err


# ---- peak memory -------------------------------------------------------------------------------------

_CLEAR_REFS = Path("/proc/self/clear_refs")


class PeakMemory:
    """Peak memory of the process while the block runs (``.bytes``; ``.kind`` says what was read).

    CUDA: the allocator's peak (``max_memory_allocated``). CPU on Linux: the resident-set high-water
    mark ``VmHWM``, reset to the current resident set on entry by writing 5 to ``clear_refs``; the
    peak therefore includes what was resident before (weights, caches) and any transient of the block.
    """

    def __init__(self, device: torch.device):
        self.device, self.bytes, self.kind = device, None, None

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.kind = "cuda max_memory_allocated"
        else:
            self.kind = ("resident set high-water mark" if _reset_vm_hwm()
                         else "process lifetime peak resident set")
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            self.bytes = _vm_hwm_bytes()
        return False


def proc_status_bytes(field: str) -> int | None:
    """A memory field of /proc/self/status (``VmHWM``, ``VmRSS``) in bytes; None where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# Pages the resident set may shrink by between the reset and the read (allocator trimming).
_RESET_SLACK_BYTES = 8 * 2**20


def _reset_vm_hwm() -> bool:
    """Reset the resident-set high-water mark to the current resident set; True if it took effect.

    Some kernels and sandboxes (gVisor, seen on CI) accept the write to ``clear_refs`` and leave
    ``VmHWM`` where it was, so the reset is checked: right after it the mark must not stand above
    the resident set. Where it does, callers get the lifetime peak and must say so.
    """
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    peak, resident = proc_status_bytes("VmHWM"), proc_status_bytes("VmRSS")
    return peak is not None and resident is not None and peak <= resident + _RESET_SLACK_BYTES


def _vm_hwm_bytes() -> int:
    peak = proc_status_bytes("VmHWM")
    if peak is not None:
        return peak
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if platform.system() == "Darwin" else peak * 1024  # macOS reports bytes, Linux KiB


def peak_in_fresh_process(module: str, function: str, *args) -> int:
    """``module.function(*args)`` (a peak in bytes, an int) run in a new interpreter: a long-lived
    process reuses freed pages without growing its resident set, which would hide what the measured
    code allocates. Every block of 64 KiB or more gets its own mapping there, returned to the system
    when freed (glibc's mmap threshold), so the resident set follows the live tensors instead of
    whichever freed pages glibc reuses."""
    import subprocess
    import sys

    code = f"from {module} import {function}; print({function}(*{args!r}))"
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    return int(done.stdout.strip().splitlines()[-1])


def parameter_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())
