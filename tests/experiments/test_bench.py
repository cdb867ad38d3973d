"""The benchmark commands run at tiny sizes and write well-formed results (no timing assertions):
cache and state sizes against hand-computed bytes, FLOPs against the model's own weight counts,
peak memory against a known allocation."""

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import experiments.bench as bench_module
from experiments.bench import (
    Bench, PeakMemory, kd_loss_peak_in_fresh_process, main, op_floor, prefill_flops, projections_only,
)
from models import HybridConfig, convert_to_hybrid, load_teacher
from tests.conftest import TINY
from tests.fixtures import write_teacher

HYBRID = HybridConfig(window=8, sink_tokens=2, chunk_size=16)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return write_teacher(tmp_path_factory.mktemp("bench") / "teacher")


def bench(teacher_dir, out, **overrides):
    settings = dict(teacher=str(teacher_dir), hybrid=HYBRID, device="cpu", prompt_lengths=[8, 40],
                    batch_sizes=[1, 2], out_dir=str(out))
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
    payload = bench(teacher_dir, tmp_path).decode(steps=2, warmup=1)
    assert payload == json.loads(json.dumps(payload))  # what was returned is what JSON holds
    written = read_outputs(tmp_path, "decode")
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
    assert cell["student_over_floor_ms"] == pytest.approx(cell["student_ms"] - cell["floor_ms"])


def test_prefill_rows_and_flops_from_the_models_own_weights(teacher_dir, tmp_path):
    bench(teacher_dir, tmp_path, max_batch_tokens=40).prefill(repeats=2, max_seconds=60.0, warmup_tokens=4)
    payload = read_outputs(tmp_path, "prefill")
    assert payload["skipped"] == [{"batch": 2, "prompt": 40}]
    assert len(payload["rows"]) == 2 * 3 and len(payload["summary"]) == 3
    for r in payload["rows"]:
        assert r["repeats"] == 2 and r["ttft_s"] > 0 and r["peak_bytes"] > 0
        assert r["prefill_tokens_per_s"] == pytest.approx(r["batch"] * r["prompt"] / r["ttft_s"])


def test_prefill_flops_count_every_linear_weight_and_every_attended_pair(teacher_dir):
    teacher = load_teacher(str(teacher_dir))
    T = 40
    flops = prefill_flops(teacher.config, HYBRID, T)
    layer_weights = sum(m.weight.numel() for m in teacher.model.layers.modules() if isinstance(m, nn.Linear))
    assert flops["shared_flops"] == 2 * T * layer_weights + 2 * teacher.lm_head.weight.numel()
    pairs = sum(t + 1 for t in range(T))  # causal: query t attends to keys 0..t
    assert flops["teacher_attention_flops"] == LAYERS * H * pairs * 4 * D
    # the student at this length: 3 chunks of 16, each against its band of 16 + 8 - 1 keys and 2 sinks
    window = 4 * H * D * T * (16 + 8 - 1 + 2)
    memory = 4 * H * D * T * 16 + 4 * H * D * D * T
    # i, f from x; o from each head's [q; k; v]; feature maps: a D x D product per query and key head
    gates = 2 * T * TINY["hidden_size"] * 2 * H + 2 * T * H * 3 * D
    feature_maps = 2 * T * (H + TINY["num_key_value_heads"]) * D * D
    assert flops["student_attention_flops"] == LAYERS * (window + memory + gates + feature_maps)
    legacy = HybridConfig(window=8, sink_tokens=2, chunk_size=16, feature_map="none", gate_input="hidden")
    assert prefill_flops(teacher.config, legacy, T)["student_attention_flops"] == LAYERS * (
        window + memory + 2 * T * TINY["hidden_size"] * 3 * H)


def test_train_measures_each_requested_stage(teacher_dir, tmp_path):
    bench(teacher_dir, tmp_path).train(seq_len=16, batch=2, steps=1, warmup=1, top_k=4,
                                       stages=["align", "kd_cached"])
    rows = read_outputs(tmp_path, "train")["rows"]
    assert [r["stage"] for r in rows] == ["align", "kd_cached"]
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["peak_bytes"] > 0 and r["trainable_parameters"] > 0
    # alignment trains the new gate parameters only; KD trains the whole student
    assert rows[0]["trainable_parameters"] < rows[1]["trainable_parameters"]


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
    reference = [(r["length"], r["pass"]) for r in rows if r["op"].startswith("hybrid reference")]
    assert reference == [(16, "forward"), (16, "backward")]
    assert (payload["heads"], payload["kv_heads"], payload["head_dim"]) == (H, HKV, D)
    # no GPU: the Triton rows are not timed, and the table says why
    assert payload["triton"] == "the timed Triton rows need CUDA"
    assert not [r for r in rows if "Triton" in r["op"]]
    assert "not timed (the timed Triton rows need CUDA)" in (tmp_path / "kernels.md").read_text()
    for r in rows:
        assert r["gflop"] > 0 and r["floor_mb"] > 0 and r["gflop_per_s"] > 0


def test_op_floor_matches_hand_counts():
    hybrid = HybridConfig(window=2, sink_tokens=1, chunk_size=2)
    # causal SDPA, one head, T = 3, head dim 2: 6 (query, key) pairs, each q.k and p.v = 4 multiply-adds
    sdpa = op_floor("sdpa forward", 1, 1, 1, 3, 2, 2, hybrid, 4)
    assert sdpa == {"flops": 48, "bytes": (6 + 12 + 6) * 4}
    # hybrid: window branch 3 queries x (2 window + 1 sink keys) x 4 multiply-adds; memory branch per
    # query: a chunk of 2 keys over (D + Dv) / 2 ... = 2 multiply-adds x 2 keys, state read + update 2 x 4
    hybrid_forward = op_floor("hybrid forward", 1, 1, 1, 3, 2, 2, hybrid, 4)
    assert hybrid_forward["flops"] == 2 * 3 * 3 * 4 + 2 * 3 * (2 * 4 / 2 + 2 * 4)
    assert hybrid_forward["bytes"] == (6 + 12 + 6) * 4 + 3 * 3 * 4
    backward = op_floor("hybrid backward", 1, 1, 1, 3, 2, 2, hybrid, 4)
    assert backward["flops"] == 3 * hybrid_forward["flops"]
    assert backward["bytes"] == 2 * hybrid_forward["bytes"] + 6 * 4


def test_command_line_and_shipped_configs(teacher_dir, tmp_path, capsys):
    main(["--teacher", str(teacher_dir), "--hybrid.window", "8", "--prompt_lengths", "[8]", "--batch_sizes", "[1]",
          "--device", "cpu", "--out_dir", str(tmp_path), "decode", "--steps", "1", "--warmup", "0"])
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
    with pytest.raises(ValueError, match="must be non-empty lists of integers >= 1"):
        bench(teacher_dir, tmp_path, prompt_lengths=[0])
    with pytest.raises(ValueError, match="unknown stage.*allowed values: align, kd, kd_cached"):
        bench(teacher_dir, tmp_path).train(stages=["stage4"])
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available here"):
            bench(teacher_dir, tmp_path, device="cuda")


def test_projections_only_is_undone_and_skips_attention(teacher_dir):
    student = convert_to_hybrid(load_teacher(str(teacher_dir)), HYBRID).eval()
    originals = [layer.self_attn for layer in student.lm.model.layers]
    ids = torch.randint(0, TINY["vocab_size"], (1, 12))
    with torch.no_grad(), projections_only(student):
        floor = student(ids).logits
        # no attention: each position sees itself only, so changing an earlier token changes nothing later
        changed = ids.clone()
        changed[0, 0] = (changed[0, 0] + 1) % TINY["vocab_size"]
        assert torch.equal(student(changed).logits[:, 1:], floor[:, 1:])
    assert [layer.self_attn for layer in student.lm.model.layers] == originals


PEAK_MEMORY_CHECK = """
import torch
from experiments.bench import PeakMemory
size = 256 * 2**20
with PeakMemory(torch.device("cpu")) as big:
    block = torch.ones(size // 4)  # touched, so resident
    del block
with PeakMemory(torch.device("cpu")) as small:
    torch.ones(1024)
print(big.kind, "|", small.kind, "|", big.bytes, "|", small.bytes)
"""


def test_peak_memory_sees_an_allocation_and_resets_between_blocks():
    """In a fresh interpreter (as the benchmarks measure): in this long-lived test process freed pages
    that the allocator keeps resident can serve the block without the resident set growing at all."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(64 * 1024)}
    done = subprocess.run([sys.executable, "-c", PEAK_MEMORY_CHECK], capture_output=True, text=True, check=True,
                          env=env)
    big_kind, small_kind, big, small = (x.strip() for x in done.stdout.strip().splitlines()[-1].split("|"))
    size = 256 * 2**20
    if big_kind == small_kind == "resident set high-water mark":
        assert int(big) - int(small) > 0.9 * size
    else:  # no working clear_refs: a lifetime peak, which cannot go down
        assert int(big) >= size


def test_peak_memory_says_lifetime_peak_where_the_reset_is_accepted_but_ignored(tmp_path, monkeypatch):
    # a sandbox that takes the write to clear_refs and leaves the mark where it was (seen on CI)
    monkeypatch.setattr(bench_module, "_CLEAR_REFS", tmp_path / "clear_refs")
    status = {"VmHWM": 1450 * 2**20, "VmRSS": 900 * 2**20}
    monkeypatch.setattr(bench_module, "_proc_status_bytes", status.get)
    with PeakMemory(torch.device("cpu")) as peak:
        pass
    assert peak.kind == "process lifetime peak resident set"
    assert peak.bytes == status["VmHWM"]
    status["VmHWM"] = status["VmRSS"]  # the mark came down to the resident set: the reset worked
    with PeakMemory(torch.device("cpu")) as peak:
        pass
    assert peak.kind == "resident set high-water mark"


def test_kd_memory_writes_both_variants(teacher_dir, tmp_path):
    payload = bench(teacher_dir, tmp_path).kd_memory(seq_len=32, batch=2, top_k=4)
    written = read_outputs(tmp_path, "kd_memory")
    assert written == json.loads(json.dumps(payload))
    assert [r["variant"] for r in written["rows"]] == ["topk", "dense"]
    assert written["logits_tensor_mib"] == pytest.approx(2 * 32 * TINY["vocab_size"] * 4 / 2**20)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's resettable peak memory")
def test_dense_kd_loss_peak_holds_at_least_the_teacher_logits_and_more_than_top_k():
    batch, seq_len, vocab = 2, 128, 20000
    teacher_logits = batch * seq_len * vocab * 4  # allocated inside the measured block by the dense variant
    dense = kd_loss_peak_in_fresh_process("dense", batch, seq_len, vocab, 8)
    top_k = kd_loss_peak_in_fresh_process("topk", batch, seq_len, vocab, 8)
    assert dense >= teacher_logits
    assert top_k < dense


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
