"""The FLOP and byte models against the model's own weight counts and against hand counts."""

import pytest
from torch import nn

from experiments.flops import op_floor, prefill_flops, training_step_flops, window_pairs
from models import HybridConfig, load_teacher
from tests.conftest import TINY
from tests.fixtures import write_teacher

HYBRID = HybridConfig(window=8, sink_tokens=2, chunk_size=16)
D = TINY["hidden_size"] // TINY["num_attention_heads"]
H, LAYERS = TINY["num_attention_heads"], TINY["num_hidden_layers"]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    return write_teacher(tmp_path_factory.mktemp("flops") / "teacher")


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
    # the least any form computes: each query against exactly the keys the layer defines (key j <= t
    # inside the window or a sink); per token the cheaper of the memory's state and normaliser read
    # and updated (4 (D^2 + D)) and the t + 1 keys before it read directly (4 D (t + 1))
    pairs = sum(1 for t in range(T) for j in range(t + 1) if t - j < 8 or j < 2)
    least = 4 * H * D * pairs + H * sum(min(4 * (D * D + D), 4 * D * (t + 1)) for t in range(T))
    assert T > D + 1  # both kinds of token occur
    assert flops["student_least_flops"] == flops["shared_flops"] + LAYERS * (least + gates + feature_maps)
    legacy = HybridConfig(window=8, sink_tokens=2, chunk_size=16, feature_map="none", gate_input="hidden")
    assert prefill_flops(teacher.config, legacy, T)["student_attention_flops"] == LAYERS * (
        window + memory + 2 * T * TINY["hidden_size"] * 3 * H)


@pytest.mark.parametrize("window,sinks", [(1, 0), (3, 1), (8, 2), (64, 4), (5, 9)])
def test_window_pairs_count_the_keys_each_query_reads(window, sinks):
    for prompt in (1, 2, window, window + 1, window + sinks, 3 * window + 7):
        expected = sum(1 for t in range(prompt) for j in range(t + 1) if t - j < window or j < sinks)
        assert window_pairs(prompt, window, sinks) == expected, prompt


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


def test_training_step_flops_are_three_student_forwards_with_the_head_everywhere(teacher_dir):
    config = load_teacher(str(teacher_dir)).config
    T, B = 40, 3
    counts = prefill_flops(config, HYBRID, T)
    head = 2 * config.hidden_size * config.vocab_size
    forward = B * (counts["student_flops"] + (T - 1) * head)  # the head over all T positions
    assert training_step_flops(config, HYBRID, "kd_cached", B, T) == 3 * forward
    assert training_step_flops(config, HYBRID, "kd", B, T) == 3 * forward + B * (counts["teacher_flops"] + (T - 1) * head)
    assert training_step_flops(config, HYBRID, "align", B, T) is None


def test_the_teachers_own_step_is_three_of_the_forwards_a_kd_step_adds_for_it(teacher_dir):
    config = load_teacher(str(teacher_dir)).config
    T, B = 40, 3
    online, cached = (training_step_flops(config, HYBRID, stage, B, T) for stage in ("kd", "kd_cached"))
    assert training_step_flops(config, HYBRID, "teacher_lm", B, T) == 3 * (online - cached)
    # by hand for one sequence: every linear weight once per token, the causal pairs, the head everywhere
    d, V, ff, L = config.hidden_size, config.vocab_size, config.intermediate_size, config.num_hidden_layers
    H, Hkv = config.num_attention_heads, config.num_key_value_heads
    D = d // H
    forward = 2 * T * L * (d * H * D * 2 + d * Hkv * D * 2 + 3 * d * ff) + L * H * 4 * D * T * (T + 1) / 2 + 2 * T * d * V
    assert training_step_flops(config, HYBRID, "teacher_lm", 1, T) == pytest.approx(3 * forward)
