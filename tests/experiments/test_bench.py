"""The benchmark commands run at tiny sizes and write well-formed results (no timing assertions):
cache and state sizes against hand-computed bytes. The parts have their own tests: the FLOP models
in test_flops.py, peak memory in test_measure.py, the runners in test_bench_runners.py, the KD
loss's peak in test_bench_kd_memory.py."""

import json
from pathlib import Path

import pytest
import torch

from experiments.bench import Bench, main
from experiments.flops import training_step_flops
from models import HybridConfig, load_teacher
from tests.conftest import TINY
from tests.fixtures import write_teacher

HYBRID = HybridConfig(window=8, sink_tokens=2, chunk_size=16)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return write_teacher(tmp_path_factory.mktemp("bench") / "teacher")


def bench(teacher_dir, out, **overrides):
    # eager decoding steps unless a test asks for the compiled one: compiling costs seconds per test
    settings = dict(teacher=str(teacher_dir), hybrid=HYBRID, device="cpu", prompt_lengths=[8, 40],
                    batch_sizes=[1, 2], out_dir=str(out), student_decode_step="eager")
    return Bench(**{**settings, **overrides})


def read_outputs(out: Path, what: str) -> dict:
    payload = json.loads((out / f"{what}.json").read_text())
    assert (out / f"{what}.png").read_bytes()[:8] == PNG_MAGIC
    table = (out / f"{what}.md").read_text()
    assert "Machine:" in table and "| " in table
    for key in ("cpu", "logical_cpus", "torch_threads", "torch", "transformers", "git_commit"):
        assert key in payload["machine"], key
    assert payload["benchmark"] == what
    return payload


D = TINY["hidden_size"] // TINY["num_attention_heads"]
H, HKV, LAYERS = TINY["num_attention_heads"], TINY["num_key_value_heads"], TINY["num_hidden_layers"]


def teacher_kv_bytes(batch, tokens):
    return LAYERS * 2 * batch * HKV * tokens * D * 4  # keys and values, float32


def student_state_bytes(batch):
    slots = HYBRID.sink_tokens + HYBRID.window
    per_layer = (batch * H * D * D * 4 + batch * H * D * 4 + batch * H * 4  # C, n, m (float32)
                 + batch * 8  # pos (int64)
                 + 2 * batch * HKV * slots * D * 4 + batch * slots * 8)  # window keys, values, their positions
    return LAYERS * per_layer


def test_decode_layers_times_two_layers_side_by_side(teacher_dir, tmp_path):
    payload = bench(teacher_dir, tmp_path).decode_layers(steps=3, warmup=1)
    written = read_outputs(tmp_path, "decode_layers")
    assert written["baseline"]["feature_map"] == "none" and written["settings"]["hybrid"]["feature_map"] == "softmax"
    rows = payload["rows"]
    assert {(r["batch"], r["prompt"]) for r in rows} == {(b, p) for b in (1, 2) for p in (8, 40)}
    for r in rows:
        for name in ("student", "baseline"):
            assert r[f"{name}_ms_p25"] <= r[f"{name}_ms"] <= r[f"{name}_ms_p75"]
        assert r["ratio"] == pytest.approx(r["student_ms"] / r["baseline_ms"])
        # feature maps add nothing to the state (gate combination): the same constant size
        assert r["student_state_mib"] == r["baseline_state_mib"] > 0


def test_decode_writes_rows_for_every_cell_with_exact_state_sizes(teacher_dir, tmp_path):
    payload = bench(teacher_dir, tmp_path, student_decode_step="compiled").decode(steps=2, warmup=1)
    assert payload == json.loads(json.dumps(payload))  # what was returned is what JSON holds
    written = read_outputs(tmp_path, "decode")
    assert written["settings"]["student_decode_step"] == "compiled"
    rows = written["rows"]
    assert {(r["model"], r["batch"], r["prompt"]) for r in rows} == {
        (m, b, p) for m in ("teacher", "student") for b in (1, 2) for p in (8, 40)}
    for r in rows:
        assert r["ms_per_step"] > 0 and r["ms_p25"] <= r["ms_per_step"] <= r["ms_p75"]
        assert r["tokens_per_s"] == pytest.approx(r["batch"] / (r["ms_per_step"] / 1e3))
        assert r["peak_bytes"] > 0
        if r["model"] == "teacher":  # the prompt, the warm-up step and the timed steps are cached
            assert r["state_bytes"] == teacher_kv_bytes(r["batch"], r["prompt"] + 3)
        else:  # the same at every prompt length
            assert r["state_bytes"] == student_state_bytes(r["batch"])
    assert [f["batch"] for f in written["floor"]] == [1, 2]
    summary = {(s["batch"], s["prompt"]): s for s in written["summary"]}
    cell = summary[(2, 40)]
    assert cell["state_ratio"] == pytest.approx(student_state_bytes(2) / teacher_kv_bytes(2, 43))
    assert cell["speedup"] == pytest.approx(cell["teacher_ms"] / cell["student_ms"])
    teacher, student = (next(r for r in rows if (r["model"], r["batch"], r["prompt"]) == (m, 2, 40))
                        for m in ("teacher", "student"))
    assert len(teacher["times_s"]) == len(student["times_s"]) == 2
    assert cell["paired_speedup"]["median"] == pytest.approx(
        sum(t / s for t, s in zip(teacher["times_s"], student["times_s"])) / 2)
    assert cell["student_over_floor_ms"] == pytest.approx(cell["student_ms"] - cell["floor_ms"])


def test_decode_models_take_turns_step_by_step_and_an_allocation_failure_stops_one_model_only(
        teacher_dir, tmp_path, monkeypatch):
    """Warm-up and timed steps alternate between the models (who goes first alternating per round and
    per cell); each model's peak comes from steps of its own, the teacher's first. A teacher that runs
    out of memory in its prefill gets an error row, and the student is still measured."""
    from experiments.bench_runners import StudentRunner, TeacherRunner

    calls = []
    teacher_prefill, teacher_step, student_step = TeacherRunner.prefill, TeacherRunner.step, StudentRunner.step

    def failing_prefill(self, ids):
        if ids.shape[1] == 40:
            raise torch.OutOfMemoryError("out of memory (test)")
        return teacher_prefill(self, ids)

    def record(kind, original):
        def step(self, token, state):
            calls.append(kind)
            return original(self, token, state)
        return step

    monkeypatch.setattr(TeacherRunner, "prefill", failing_prefill)
    monkeypatch.setattr(TeacherRunner, "step", record("teacher", teacher_step))
    monkeypatch.setattr(StudentRunner, "step", record("student", student_step))
    bench(teacher_dir, tmp_path, prompt_lengths=[8, 40], batch_sizes=[1]).decode(steps=2, warmup=1)
    t, s = "teacher", "student"
    # cell 0 (8 tokens): rounds t s | s t | t s, then 2 peak steps each, the teacher's first
    assert calls[:10] == [t, s, s, t, t, s, t, t, s, s]
    # cell 1 (40 tokens): the teacher failed its prefill; the student decodes alone
    assert calls[10:] == [s] * 5
    rows = {(r["model"], r["prompt"]): r for r in read_outputs(tmp_path, "decode")["rows"]}
    assert "out of memory" in rows[t, 40]["error"] and "ms_per_step" not in rows[t, 40]
    assert rows[s, 40]["ms_per_step"] > 0 and rows[s, 40]["peak_bytes"] > 0 and rows[t, 8]["peak_bytes"] > 0


def test_prefill_rows_and_flops_from_the_models_own_weights(teacher_dir, tmp_path):
    bench(teacher_dir, tmp_path, max_batch_tokens=40).prefill(repeats=2, max_seconds=60.0, warmup_tokens=4)
    payload = read_outputs(tmp_path, "prefill")
    assert payload["skipped"] == [{"batch": 2, "prompt": 40}]
    assert len(payload["rows"]) == 2 * 3 and len(payload["summary"]) == 3
    for r in payload["rows"]:
        assert r["repeats"] == 2 and r["ttft_s"] > 0 and r["peak_bytes"] > 0
        assert r["prefill_tokens_per_s"] == pytest.approx(r["batch"] * r["prompt"] / r["ttft_s"])
        assert len(r["times_s"]) == 2 and r["ttft_s"] == pytest.approx(sum(r["times_s"]) / 2)
    for s in payload["summary"]:  # the per-round ratio: each round's student time over that round's teacher time
        teacher, student = (next(r for r in payload["rows"] if r["model"] == m and (r["batch"], r["prompt"]) ==
                                 (s["batch"], s["prompt"])) for m in ("teacher", "student"))
        per_round = sorted(a / b for a, b in zip(student["times_s"], teacher["times_s"]))
        assert s["paired_ratio"]["median"] == pytest.approx(sum(per_round) / 2)
        assert (s["paired_ratio"]["low"], s["paired_ratio"]["high"]) == pytest.approx(tuple(per_round))
        assert s["paired_ratio"]["pairs"] == 2 and s["paired_ratio_text"] in (tmp_path / "prefill.md").read_text()


def test_a_compiled_students_prefill_cells_start_with_an_untimed_forward(teacher_dir, tmp_path, monkeypatch):
    """With the op compiled, each cell's first student forward compiles a graph for its shape: it
    runs untimed, so the timed forwards are the compiled op's own."""
    from experiments.bench_runners import StudentRunner

    prefill, calls = StudentRunner.prefill, []
    monkeypatch.setattr(StudentRunner, "prefill", lambda self, ids: calls.append(ids.shape) or prefill(self, ids))
    compiled = HybridConfig(window=8, sink_tokens=2, chunk_size=16, backend="compiled")
    bench(teacher_dir, tmp_path, hybrid=compiled, prompt_lengths=[40], batch_sizes=[1]).prefill(
        repeats=2, max_seconds=60.0, warmup_tokens=4)
    # the warm-up prompt, then the cell's untimed forward and its 2 timed ones
    assert calls == [(1, 4), (1, 40), (1, 40), (1, 40)]
    [student] = [r for r in read_outputs(tmp_path, "prefill")["rows"] if r["model"] == "student"]
    assert student["repeats"] == 2


def test_train_measures_each_requested_stage_under_each_plan_in_fresh_processes(teacher_dir, tmp_path):
    bench(teacher_dir, tmp_path).train(seq_len=16, batch=2, steps=1, warmup=1, top_k=4,
                                       stages=["align", "kd_cached"], plans=["lean", "plain"])
    payload = read_outputs(tmp_path, "train")
    rows = payload["rows"]
    assert [(r["stage"], r["plan"]) for r in rows] == [("align", "lean"), ("align", "plain"), ("kd_cached", "lean"),
                                                       ("kd_cached", "plain")]
    assert all(r["allocator"] == "glibc" and r["allocator_loaded"] for r in rows)
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["peak_bytes"] > 0 and r["trainable_parameters"] > 0
    # alignment trains the new gate parameters only; KD trains the whole student
    assert rows[0]["trainable_parameters"] < rows[2]["trainable_parameters"]
    # the KD rows sit beside their FLOP floor; alignment has none
    assert "floor_ms" not in rows[0] and rows[2]["floor_ms"] > 0 and rows[2]["over_floor"] > 0
    assert payload["matmul_gflop_per_s"] > 0
    # the floor's rate is probed in each row's process, before the timed step and after it
    for r in rows:
        assert len(r["probe_gflop_per_s"]) == 2 and min(r["probe_gflop_per_s"]) > 0 and len(r["step_ms"]) == 1
    kd = rows[2]
    assert kd["floor_ms"] == pytest.approx(kd["step_gflop"] / kd["matmul_gflop_per_s"] * 1e3)
    # one step: its time over the floor at the mean rate of the probes before and after it
    around = sum(kd["probe_gflop_per_s"]) / 2
    assert kd["over_floor"] == pytest.approx(kd["ms_per_step"] / (kd["step_gflop"] / around * 1e3))
    assert kd["run_start_floor_ms"] == pytest.approx(kd["step_gflop"] / payload["matmul_gflop_per_s"] * 1e3)
    assert kd["over_run_start_floor"] == pytest.approx(kd["ms_per_step"] / kd["run_start_floor_ms"])
    assert [r["stage"] for r in payload["lean_against_plain"]] == ["align", "kd_cached"]
    assert "lean / plain tokens/s" in (tmp_path / "train.md").read_text()


def test_train_reads_each_kd_rows_floor_ratio_against_the_teachers_own_step(teacher_dir, tmp_path):
    payload = bench(teacher_dir, tmp_path).train(seq_len=16, batch=2, steps=1, warmup=1, top_k=4,
                                                 stages=["kd_cached", "teacher_lm"], plans=["lean", "plain"])
    rows = payload["rows"]
    # the teacher's own step runs once, plainly, without a hybrid op, whatever the plans asked for
    assert [(r["stage"], r["plan"], r["backend"]) for r in rows] == [
        ("kd_cached", "lean", "auto"), ("kd_cached", "plain", "auto"), ("teacher_lm", "plain", None)]
    teacher_row = rows[2]
    teacher = load_teacher(str(teacher_dir))
    assert teacher_row["trainable_parameters"] == sum(p.numel() for p in teacher.parameters())
    config = teacher.config
    assert teacher_row["step_gflop"] * 1e9 == pytest.approx(
        training_step_flops(config, HybridConfig.from_dict(payload["settings"]["hybrid"]), "teacher_lm", 2, 16))
    assert teacher_row["over_floor"] > 0
    against = payload["against_teachers_own_step"]
    assert [(a["stage"], a["plan"]) for a in against] == [("kd_cached", "lean"), ("kd_cached", "plain")]
    for a, row in zip(against, rows):
        assert a["over_teacher_floor_ratio"] == pytest.approx(row["over_floor"] / teacher_row["over_floor"])
    assert "teacher's own ms / floor" in (tmp_path / "train.md").read_text()


def test_train_rounds_alternate_the_rows_order_and_read_lean_against_plain_round_by_round(teacher_dir, tmp_path):
    payload = bench(teacher_dir, tmp_path).train(seq_len=16, batch=2, steps=1, warmup=0, top_k=4, stages=["align"],
                                                 plans=["lean", "plain"], rounds=2)
    rows = payload["rows"]
    # a stage's rows next to each other, in reverse order every other round
    assert [(r["round"], r["plan"]) for r in rows] == [(0, "lean"), (0, "plain"), (1, "plain"), (1, "lean")]
    [side] = payload["lean_against_plain"]
    by = {(r["round"], r["plan"]): r for r in rows}
    per_round = sorted(by[n, "lean"]["tokens_per_s"] / by[n, "plain"]["tokens_per_s"] for n in (0, 1))
    assert side["rounds"] == 2 and side["tokens_per_s_ratio"] == pytest.approx(sum(per_round) / 2)
    assert (side["tokens_per_s_ratio_rounds"]["low"], side["tokens_per_s_ratio_rounds"]["high"]) == pytest.approx(
        tuple(per_round))
    table = (tmp_path / "train.md").read_text()
    assert side["tokens_per_s_ratio_text"] in table and "| round |" in table


def test_train_comparisons_pair_rows_of_the_same_round():
    """Hand-made rows of two rounds: each comparison divides a row by its reference of the same round
    (allocator against the first, a KD row against the teacher's own step) and takes the median."""
    from experiments.bench_report import against_first, against_teachers_own_step

    def row(round_, stage, allocator, tokens_per_s, over_floor, plan="lean"):
        return {"round": round_, "stage": stage, "plan": plan, "allocator": allocator, "backend": "auto",
                "tokens_per_s": tokens_per_s, "peak_bytes": 100.0 * tokens_per_s, "over_floor": over_floor}

    rows = [row(0, "kd", "glibc", 10.0, 2.0), row(0, "kd", "tcmalloc", 15.0, 1.6),
            row(0, "teacher_lm", "glibc", 20.0, 1.25, "plain"), row(0, "teacher_lm", "tcmalloc", 22.0, 1.2, "plain"),
            row(1, "kd", "tcmalloc", 12.0, 1.8), row(1, "kd", "glibc", 6.0, 3.0),
            row(1, "teacher_lm", "tcmalloc", 21.0, 1.5, "plain"), row(1, "teacher_lm", "glibc", 20.0, 1.5, "plain")]
    against = {(a["stage"], a["allocator"]): a for a in against_first(rows, "allocator", ["glibc", "tcmalloc"])}
    kd = against["kd", "tcmalloc"]
    assert kd["rounds"] == 2 and kd["tokens_per_s_ratio"] == pytest.approx((15 / 10 + 12 / 6) / 2)
    assert kd["over_floor_ratio"] == pytest.approx((1.6 / 2.0 + 1.8 / 3.0) / 2)
    assert kd["tokens_per_s_ratio_text"] == "1.75 [1.50, 2.00] 50 %"  # two rounds: the range, covering 1/2
    teacher = {(a["stage"], a["allocator"]): a for a in against_teachers_own_step(rows)}
    assert set(teacher) == {("kd", "glibc"), ("kd", "tcmalloc")}
    assert teacher["kd", "glibc"]["over_teacher_floor_ratio"] == pytest.approx((2.0 / 1.25 + 3.0 / 1.5) / 2)
    assert teacher["kd", "tcmalloc"]["over_floor"] == pytest.approx((1.6 + 1.8) / 2)


def test_train_refuses_rounds_below_one(teacher_dir, tmp_path):
    with pytest.raises(ValueError, match="rounds=0 is invalid"):
        bench(teacher_dir, tmp_path).train(rounds=0)


def test_the_teachers_own_step_trains_on_hugging_faces_loss(teacher_dir):
    from experiments.bench_train import stage_module

    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    spec = {"teacher": str(teacher_dir), "dtype": "float32", "device": "cpu"}
    module, batch = stage_module(spec, "teacher_lm", "lean", ids)
    reference = load_teacher(str(teacher_dir))
    expected = reference(ids, labels=ids).loss
    loss = module.training_step(batch, 0)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    optimizer = torch.optim.SGD(module.trainable_parameters(), lr=0.1)

    def closure():
        optimizer.zero_grad()
        step_loss = module.training_step(batch, 0)
        step_loss.backward()
        return step_loss

    module.optimizer_step(0, 0, optimizer, closure)
    # every parameter moved: the whole teacher trains, its embedding and head included
    moved = [not torch.equal(p, q) for p, q in zip(module.trainable_parameters(), reference.parameters())]
    assert moved and all(moved)


def test_train_runs_each_row_with_each_op_backend_side_by_side(teacher_dir, tmp_path):
    payload = bench(teacher_dir, tmp_path).train(seq_len=16, batch=2, steps=1, warmup=1, top_k=4,
                                                 stages=["kd_cached"], plans=["lean"], backends=["torch", "compiled"])
    rows = payload["rows"]
    assert [r["backend"] for r in rows] == ["torch", "compiled"]
    # the compiled row traced the op (and only it) in its own process; the torch row compiled nothing
    assert rows[0]["compiled_graphs"] == 0 and rows[1]["compiled_graphs"] >= 1
    [against] = payload["against_first_backend"]
    assert (against["backend"], against["plan"]) == ("compiled", "lean")
    assert against["tokens_per_s_ratio"] == pytest.approx(rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"])
    assert against["over_floor_ratio"] == pytest.approx(rows[1]["over_floor"] / rows[0]["over_floor"])
    assert "tokens/s / torch" in (tmp_path / "train.md").read_text()
    with pytest.raises(ValueError, match="unknown backend.s. fused; allowed values: auto, torch, compiled"):
        bench(teacher_dir, tmp_path).train(stages=["kd_cached"], backends=["fused"])


def test_each_steps_floor_uses_the_rates_probed_around_it():
    from experiments.bench_train import step_floor_ratios

    # 100 GFLOP steps: 2 s at 50 GFLOP/s is 1.0x; 3 s between probes of 50 and 200 GFLOP/s (floor 0.8 s) 3.75x
    assert step_floor_ratios([2000.0, 3000.0], [50.0, 50.0, 200.0], 100.0) == pytest.approx([1.0, 3.75])
    with pytest.raises(ValueError, match="2 steps need 3 rate probes"):
        step_floor_ratios([2000.0, 3000.0], [50.0, 50.0], 100.0)


def test_train_runs_rows_under_a_preloaded_allocator_and_says_whether_it_was_mapped(teacher_dir, tmp_path,
                                                                                     monkeypatch):
    import os

    installed = [name for name in ("jemalloc", "tcmalloc") if _installed(name)]
    if not installed:
        pytest.skip("neither tcmalloc nor jemalloc is installed here (apt install libgoogle-perftools4 libjemalloc2)")
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    payload = bench(teacher_dir, tmp_path).train(seq_len=16, batch=2, steps=1, warmup=0, top_k=4,
                                                 stages=["kd_cached"], plans=["lean"],
                                                 allocators=["glibc", installed[0]])
    rows = payload["rows"]
    assert [(r["allocator"], r["allocator_loaded"]) for r in rows] == [("glibc", True), (installed[0], True)]
    assert [r["allocator"] for r in payload["against_first_allocator"]] == [installed[0]]
    assert "LD_PRELOAD" not in os.environ  # the benchmark's own process is left as it was


def test_an_allocator_rows_environment_reaches_its_process_and_only_it(teacher_dir, tmp_path, monkeypatch):
    import os

    if not _installed("tcmalloc_no_release"):
        pytest.skip("tcmalloc is not installed here (apt install libgoogle-perftools4)")
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.delenv("TCMALLOC_RELEASE_RATE", raising=False)
    payload = bench(teacher_dir, tmp_path).train(seq_len=16, batch=2, steps=1, warmup=0, top_k=4,
                                                 stages=["kd_cached"], plans=["lean"],
                                                 allocators=["glibc", "tcmalloc_no_release"])
    glibc, kept = payload["rows"]
    assert "allocator_environment" not in glibc
    assert kept["allocator_loaded"] and kept["allocator_environment"] == {"TCMALLOC_RELEASE_RATE": "0"}
    assert "TCMALLOC_RELEASE_RATE" not in os.environ and "LD_PRELOAD" not in os.environ


def _installed(allocator) -> bool:
    from experiments.bench_train import allocator_library

    try:
        return allocator_library(allocator) is not None
    except ValueError:
        return False


def test_an_allocator_that_is_not_installed_is_refused_naming_its_package(teacher_dir, tmp_path, monkeypatch):
    import experiments.bench_train as bench_train

    monkeypatch.setitem(bench_train.ALLOCATORS, "jemalloc", ("libjemalloc-not-here.so.9", "libjemalloc2"))
    with pytest.raises(ValueError, match=r"allocator 'jemalloc' needs libjemalloc-not-here.so.9, which is not "
                                         r"installed here \(Debian/Ubuntu: apt install libjemalloc2\)"):
        bench(teacher_dir, tmp_path).train(stages=["kd_cached"], allocators=["glibc", "jemalloc"])
    with pytest.raises(ValueError, match="unknown allocator 'mimalloc'; allowed values: glibc, tcmalloc, jemalloc, tcmalloc_no_release"):
        bench(teacher_dir, tmp_path).train(stages=["kd_cached"], allocators=["mimalloc"])


def test_train_refuses_an_unknown_plan(teacher_dir, tmp_path):
    with pytest.raises(ValueError, match="unknown stage\\(s\\) or plan\\(s\\) tiny"):
        bench(teacher_dir, tmp_path).train(plans=["tiny"])


def test_prefill_models_take_turns_and_an_allocation_failure_stops_one_model_only(teacher_dir, tmp_path, monkeypatch):
    """Each round runs both models once, who goes first alternating: the same drift falls on both.
    A model that runs out of memory gets an error row; the other keeps its repeats."""
    from experiments.bench_runners import StudentRunner, TeacherRunner

    calls = []
    teacher_prefill, student_prefill = TeacherRunner.prefill, StudentRunner.prefill

    def record(kind, original):
        def prefill(self, ids):
            calls.append((kind, ids.shape[1]))
            if kind == "student" and ids.shape[1] == 24 and sum(c == ("student", 24) for c in calls) == 2:
                raise torch.OutOfMemoryError("out of memory (test)")
            return original(self, ids)
        return prefill

    monkeypatch.setattr(TeacherRunner, "prefill", record("teacher", teacher_prefill))
    monkeypatch.setattr(StudentRunner, "prefill", record("student", student_prefill))
    bench(teacher_dir, tmp_path, prompt_lengths=[24, 40], batch_sizes=[1]).prefill(repeats=3, max_seconds=60.0,
                                                                                    warmup_tokens=4)
    timed_calls = [c for c in calls if c[1] != 4]
    # cell 0 (24 tokens): teacher first in round 0; the student fails in round 1 and stops there
    assert timed_calls[:4] == [("teacher", 24), ("student", 24), ("student", 24), ("teacher", 24)]
    assert timed_calls[4] == ("teacher", 24) and timed_calls[5][1] == 40
    # cell 1 (40 tokens) starts with the student, then alternates
    assert [c[0] for c in timed_calls[5:]] == ["student", "teacher", "teacher", "student", "student", "teacher"]
    rows = {(r["model"], r["prompt"]): r for r in read_outputs(tmp_path, "prefill")["rows"]}
    assert "out of memory" in rows["student", 24]["error"] and rows["student", 24]["repeats"] == 1
    assert rows["teacher", 24]["repeats"] == 3 and rows["student", 40]["repeats"] == rows["teacher", 40]["repeats"] == 3


def test_kernels_table_has_every_op_at_every_length(teacher_dir, tmp_path):
    bench(teacher_dir, tmp_path).kernels(lengths=[16, 48], repeats=1, reference_max_length=16)
    payload = read_outputs(tmp_path, "kernels")
    rows = payload["rows"]
    assert not [r for r in rows if "error" in r]
    ops = {r["op"] for r in rows}
    assert {"hybrid chunkwise torch (forward)", "hybrid chunkwise torch (forward + backward)",
            "teacher causal SDPA (forward)", "teacher causal SDPA (forward + backward)",
            "mlstm_kernels chunkwise--native_autograd (forward + backward)",
            "hybrid recurrent step (one token after T)"} <= ops
    assert {"hybrid chunkwise torch, window band written out (forward)",
            "hybrid chunkwise torch, window band written out (forward + backward)"} <= ops  # the gate mix's old form
    assert {"hybrid chunkwise compiled (forward)", "hybrid chunkwise compiled (forward + backward)"} <= ops
    # the op as the layer calls it: the paper's layer has no memory norm and feature-mapped memory inputs
    assert (payload["memory_norm"], payload["feature_mapped_memory_inputs"]) == ("none", True)
    reference = [(r["length"], r["pass"]) for r in rows if r["op"].startswith("hybrid reference")]
    assert reference == [(16, "forward"), (16, "backward")]
    assert (payload["heads"], payload["kv_heads"], payload["head_dim"]) == (H, HKV, D)
    # no GPU: the Triton rows are not timed, and the table says why
    assert payload["triton"] == "the timed Triton rows need CUDA"
    assert not [r for r in rows if "Triton" in r["op"]]
    assert "not timed (the timed Triton rows need CUDA)" in (tmp_path / "kernels.md").read_text()
    for r in rows:
        assert r["gflop"] > 0 and r["floor_mb"] > 0 and r["gflop_per_s"] > 0


def test_command_line_and_shipped_configs(teacher_dir, tmp_path, capsys):
    main(["--teacher", str(teacher_dir), "--hybrid.window", "8", "--prompt_lengths", "[8]", "--batch_sizes", "[1]",
          "--device", "cpu", "--out_dir", str(tmp_path), "--student_decode_step", "eager", "decode", "--steps", "1",
          "--warmup", "0"])
    assert "student speed-up" in capsys.readouterr().out
    assert json.loads((tmp_path / "decode.json").read_text())["settings"]["hybrid"]["window"] == 8
    for config in sorted(Path("configs/bench").glob("*.yaml")):
        with pytest.raises(SystemExit) as done:
            main(["--config", str(config), "--print_config"])
        assert done.value.code == 0
        assert "prompt_lengths" in capsys.readouterr().out


def test_bad_settings_are_refused_with_the_allowed_values(teacher_dir, tmp_path):
    with pytest.raises(ValueError, match="dtype='float8' is not supported; allowed values: float32"):
        bench(teacher_dir, tmp_path, dtype="float8")
    with pytest.raises(ValueError, match="student_decode_step='fused' is not supported; allowed values: compiled, eager"):
        bench(teacher_dir, tmp_path, student_decode_step="fused")
    with pytest.raises(ValueError, match="must be non-empty lists of integers >= 1"):
        bench(teacher_dir, tmp_path, prompt_lengths=[0])
    with pytest.raises(ValueError, match="unknown stage.*stage4; allowed values: stages align, kd, kd_cached"):
        bench(teacher_dir, tmp_path).train(stages=["stage4"])
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available here"):
            bench(teacher_dir, tmp_path, device="cuda")


def test_kd_memory_writes_both_variants(teacher_dir, tmp_path):
    payload = bench(teacher_dir, tmp_path).kd_memory(seq_len=32, batch=2, top_k=4)
    written = read_outputs(tmp_path, "kd_memory")
    assert written == json.loads(json.dumps(payload))
    assert [r["variant"] for r in written["rows"]] == ["topk", "dense"]
    assert written["logits_tensor_mib"] == pytest.approx(2 * 32 * TINY["vocab_size"] * 4 / 2**20)


def test_head_loss_times_both_gradients_in_paired_rounds_at_each_chunk_size(teacher_dir, tmp_path):
    """Rows per (chunk, gradient), each with one time per round; the closed form's per-round ratio
    read from those times; its loss and gradients those of autograd; each peak measured."""
    from experiments.bench_head_loss import kd_chunk_loss
    from experiments.bench_report import paired_ratio

    payload = bench(teacher_dir, tmp_path).head_loss(seq_len=16, batch=2, top_k=4, chunk_tokens=[5, 32], rounds=3,
                                                     warmup=0)
    written = read_outputs(tmp_path, "head_loss")
    assert written == json.loads(json.dumps(payload))
    rows = written["rows"]
    assert [(r["chunk_tokens"], r["gradient"]) for r in rows] == [
        (5, "closed_form"), (5, "autograd"), (32, "closed_form"), (32, "autograd")]
    for closed, autograd in (rows[0:2], rows[2:4]):
        assert len(closed["times_s"]) == len(autograd["times_s"]) == 3
        assert closed["against_autograd"] == pytest.approx(paired_ratio(closed["times_s"], autograd["times_s"]))
        assert closed["loss_difference"] < 1e-5 and closed["max_gradient_difference"] < 1e-5
        assert closed["loss"] == pytest.approx(autograd["loss"], rel=1e-5)
        assert "against_autograd" not in autograd
    assert all(r["peak_added_mib"] >= 0 for r in rows)
    with pytest.raises(ValueError, match="gradient='dense' is not supported; allowed values: closed_form, autograd"):
        kd_chunk_loss("dense", *[torch.zeros(1)] * 3, 1.0, 0.1, 0.9)
    with pytest.raises(ValueError, match="rounds=0, warmup=0 are invalid"):
        bench(teacher_dir, tmp_path).head_loss(rounds=0, warmup=0)


def test_integrity_writes_and_reads_both_artifacts_both_ways_and_restores_the_writers(teacher_dir, tmp_path):
    import models.checkpoint as checkpoint
    import models.storage as storage

    real = (storage.write_manifest, checkpoint.verify_student_folder)
    payload = bench(teacher_dir, tmp_path / "out").integrity(repeats=1)
    written = read_outputs(tmp_path / "out", "integrity")
    assert written == json.loads(json.dumps(payload))
    assert [(r["artifact"].split(" ")[0], r["operation"]) for r in written["rows"]] == [
        ("student", "write"), ("student", "read"), ("KD", "write"), ("KD", "read")]
    student_bytes = written["rows"][0]["bytes"]
    assert written["rows"][2]["bytes"] > 2 * student_bytes  # weights and two moments per weight
    assert all(r["plain_s"] > 0 and r["verified_s"] > 0 for r in written["rows"])
    assert (storage.write_manifest, checkpoint.verify_student_folder) == real
    assert not list(tmp_path.glob("xdistill-integrity-*"))  # the scratch folder is gone


def test_a_distil_xlstm_student_folder_is_measured_without_floor_or_flops_model(teacher_dir, tmp_path):
    from models import distil_xlstm_from_teacher, save_student

    folder = save_student(distil_xlstm_from_teacher(load_teacher(str(teacher_dir))), tmp_path / "student")
    runs = bench(teacher_dir, tmp_path / "out", student=str(folder), prompt_lengths=[8], batch_sizes=[1])
    decode = runs.decode(steps=1, warmup=0)
    assert decode["floor"] == [] and {r["model"] for r in decode["rows"]} == {"teacher", "student"}
    assert decode["summary"][0]["student_state_mib"] > 0 and decode["summary"][0]["floor_ms"] is None
    prefill = runs.prefill(repeats=1, warmup_tokens=4)
    student_row = next(r for r in prefill["rows"] if r["model"] == "student")
    assert student_row["flops"] is None and "achieved_gflops_per_s" not in student_row
    assert prefill["summary"][0]["flops_ratio"] is None and prefill["summary"][0]["student_ttft_s"] > 0


def test_the_commands_are_the_benchmarks_and_nothing_else():
    """The command line makes a command of every public method and property of ``Bench``: the
    shared plumbing (``bench_base``) must stay private."""
    import inspect

    public = {name for name, value in inspect.getmembers(Bench)
              if (callable(value) or isinstance(value, property)) and not name.startswith("_")}
    assert public == {"decode", "decode_layers", "prefill", "train", "kd_memory", "head_loss", "kernels", "integrity"}


def test_the_parts_import_public_names_only_and_never_the_entry_point():
    import ast

    from experiments.bench import kd_loss_peak  # noqa: F401  (what older callers import)

    root = Path(__file__).resolve().parents[2] / "experiments"
    parts = [root / "measure.py", root / "flops.py", *sorted(root.glob("bench_*.py"))]
    assert len(parts) >= 10
    for path in parts:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("experiments"):
                assert node.module != "experiments.bench", path.name
                assert not [a.name for a in node.names if a.name.startswith("_")], (path.name, node.module)
            elif isinstance(node, ast.Import):
                assert "experiments.bench" not in [a.name for a in node.names], path.name
