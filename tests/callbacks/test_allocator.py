"""The allocator advice a CPU fit gives: read from the process's real memory map, glibc's malloc and
tcmalloc at its default release rate named with the fix, a preload that is right left alone."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from callbacks.allocator import PRELOAD, allocator_advice, allocator_name, mapped_libraries
from tests.fixtures import stage_cli_args, write_corpus, write_teacher

PROJECT = Path(__file__).resolve().parents[2]
GLIBC = "7f00-7f10 r-xp 00000000 08:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n"
TCMALLOC = GLIBC + "7f20-7f30 r-xp 00000000 08:01 2 /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4.5.10\n"
JEMALLOC = GLIBC + "7f20-7f30 r-xp 00000000 08:01 3 /usr/lib/x86_64-linux-gnu/libjemalloc.so.2\n"


def test_glibc_is_named_with_the_preload_that_fixes_it():
    advice = allocator_advice(GLIBC, {})
    assert "glibc's malloc" in advice and PRELOAD in advice and "apt install libgoogle-perftools4" in advice


@pytest.mark.parametrize("rate", [None, "1", "10"])
def test_tcmalloc_at_its_default_release_rate_is_told_to_keep_its_pages(rate):
    advice = allocator_advice(TCMALLOC, {} if rate is None else {"TCMALLOC_RELEASE_RATE": rate})
    assert "TCMALLOC_RELEASE_RATE=0" in advice and "glibc" not in advice


@pytest.mark.parametrize("mapped,environ", [(TCMALLOC, {"TCMALLOC_RELEASE_RATE": "0"}), (JEMALLOC, {}), (None, {})])
def test_a_right_preload_a_deliberate_one_and_an_unknown_map_get_no_advice(mapped, environ):
    assert allocator_advice(mapped, environ) is None


def advice_in_a_new_process(extra_env):
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "TCMALLOC_RELEASE_RATE")}
    code = ("import os; from callbacks.allocator import allocator_advice, mapped_libraries; "
            "print(repr(allocator_advice(mapped_libraries(), os.environ)))")
    done = subprocess.run([sys.executable, "-c", code], cwd=PROJECT, capture_output=True, text=True, timeout=300,
                          env={**env, **extra_env, "PYTHONPATH": str(PROJECT)})
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


@pytest.mark.skipif(mapped_libraries() is None, reason="no /proc/self/maps: the allocator cannot be told here")
def test_the_real_memory_map_tells_glibc_from_a_preloaded_tcmalloc():
    import ctypes.util

    assert "glibc's malloc" in advice_in_a_new_process({})
    if ctypes.util.find_library("tcmalloc_minimal") != "libtcmalloc_minimal.so.4":
        pytest.skip("tcmalloc is not installed here (apt install libgoogle-perftools4)")
    assert advice_in_a_new_process({"LD_PRELOAD": "libtcmalloc_minimal.so.4", "TCMALLOC_RELEASE_RATE": "0"}) == "None"
    assert "TCMALLOC_RELEASE_RATE=0" in advice_in_a_new_process({"LD_PRELOAD": "libtcmalloc_minimal.so.4"})


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("allocator")
    write_teacher(root / "teacher")
    return root, write_corpus(root / "corpus")


@pytest.mark.parametrize("enabled", [True, False])
def test_a_cpu_fit_warns_at_its_start_unless_turned_off(env, tmp_path, monkeypatch, recwarn, enabled):
    import callbacks.allocator as allocator
    from experiments.run import main

    monkeypatch.setattr(allocator, "mapped_libraries", lambda: GLIBC)
    main(stage_cli_args(*env, "align", tmp_path, 1, ["--allocator_advice.enabled", str(enabled).lower()]))
    said = [str(w.message) for w in recwarn if "glibc's malloc" in str(w.message)]
    assert len(said) == (1 if enabled else 0)


@pytest.mark.parametrize("mapped,environ,name", [
    (GLIBC, {}, "glibc"), (TCMALLOC, {}, "tcmalloc"),
    (TCMALLOC, {"TCMALLOC_RELEASE_RATE": "0"}, "tcmalloc (TCMALLOC_RELEASE_RATE=0)"),
    (JEMALLOC, {"TCMALLOC_RELEASE_RATE": "0"}, "jemalloc"), (None, {}, None)])
def test_the_allocator_is_named_from_the_memory_map_and_the_release_rate(mapped, environ, name):
    assert allocator_name(mapped, environ) == name


def test_benchmarks_record_the_malloc_their_numbers_ran_under(monkeypatch):
    import torch

    import callbacks.allocator as allocator
    from experiments.measure import describe_machine, machine_description

    monkeypatch.setattr(allocator, "mapped_libraries", lambda: TCMALLOC)
    monkeypatch.setenv("TCMALLOC_RELEASE_RATE", "0")
    info = machine_description(torch.device("cpu"))
    assert info["allocator"] == "tcmalloc (TCMALLOC_RELEASE_RATE=0)"
    assert describe_machine(info).endswith("; malloc: tcmalloc (TCMALLOC_RELEASE_RATE=0)")
