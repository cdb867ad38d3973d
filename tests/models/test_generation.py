"""Recurrent decoding against the full parallel forward, constant decode state, batching."""

import pytest
import torch

from models import HybridConfig, convert_to_hybrid, generate, prefill
from tests.conftest import FAMILIES, make_teacher, rel_err

VARIANTS = [
    dict(mode="hybrid", combine="gate", window=8, sink_tokens=2),
    dict(mode="hybrid", combine="shared_norm", window=8, sink_tokens=2),
    dict(mode="mlstm"),
    dict(mode="swa", window=5, sink_tokens=0),
    dict(mode="hybrid", window=4, sink_tokens=1, full_attention_layers=[0]),
]


def make_student(seed=0, **cfg):
    student = convert_to_hybrid(make_teacher("llama", seed=seed), HybridConfig(chunk_size=16, **cfg)).eval()
    # non-trivial gates, so that both branches matter
    with torch.no_grad():
        for layer in student.lm.model.layers:
            attn = layer.self_attn
            if hasattr(attn, "hybrid_gates"):
                attn.hybrid_gates.weight.normal_(0, 0.3)
                attn.hybrid_gates.bias[-4:].fill_(0.0)
    return student


@pytest.mark.parametrize("cfg", VARIANTS, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_greedy_equals_argmax_of_parallel_forward_on_growing_sequence(cfg):
    student = make_student(**cfg)
    prompt = torch.randint(0, 97, (2, 13), generator=torch.Generator().manual_seed(0))
    out = generate(student, prompt, max_new_tokens=12)
    assert out.shape == (2, 25)
    assert torch.equal(out[:, :13], prompt)
    seq = prompt
    with torch.no_grad():
        for _ in range(12):
            nxt = student(seq, decode_state=None).logits[:, -1].argmax(-1)
            seq = torch.cat([seq, nxt[:, None]], 1)
    assert torch.equal(out, seq)


@pytest.mark.parametrize("cfg", VARIANTS[:4], ids=lambda c: "-".join(str(v) for v in c.values()))
def test_stepwise_logits_equal_parallel_logits(cfg):
    student = make_student(**cfg)
    ids = torch.randint(0, 97, (1, 40))
    with torch.no_grad():
        full = student(ids).logits
        logits, state = prefill(student, ids[:, :17])
        steps = [logits]
        for t in range(17, 39):
            steps.append(student(ids[:, t:t + 1], decode_state=state).logits[:, -1])
    assert rel_err(torch.stack(steps, 1), full[:, 16:39]) < 1e-5


def test_decode_state_size_does_not_grow_with_prompt():
    student = make_student(mode="hybrid", window=16, sink_tokens=4)
    sizes = []
    for T in (32, 512):
        _, state = prefill(student, torch.randint(0, 97, (1, T)))
        sizes.append(state.nbytes())
    assert sizes[0] == sizes[1] > 0
    _, state = prefill(student, torch.randint(0, 97, (1, 512)))
    for _ in range(3):
        student(torch.randint(0, 97, (1, 1)), decode_state=state)
    assert state.nbytes() == sizes[0]


def test_kept_full_attention_layer_state_grows():
    student = make_student(mode="hybrid", window=4, full_attention_layers=[1])
    a = prefill(student, torch.randint(0, 97, (1, 32)))[1].nbytes()
    b = prefill(student, torch.randint(0, 97, (1, 64)))[1].nbytes()
    assert b > a


@pytest.mark.parametrize("cfg", [VARIANTS[0], VARIANTS[1], VARIANTS[4]], ids=["gate", "shared_norm", "full-layer"])
def test_left_padded_batch_generates_like_each_row_alone(cfg):
    student = make_student(**cfg)
    a, b = torch.randint(3, 97, (1, 15)), torch.randint(3, 97, (1, 6))
    alone_a = generate(student, a, 10)
    alone_b = generate(student, b, 10)
    ids = torch.cat([a, torch.cat([torch.zeros(1, 9, dtype=torch.long), b], 1)])
    mask = torch.ones_like(ids)
    mask[1, :9] = 0
    out = generate(student, ids, 10, attention_mask=mask)
    assert torch.equal(out[0], alone_a[0])
    assert torch.equal(out[1, 9:], alone_b[0])


def test_eos_stops_rows_and_pads():
    student = make_student(**VARIANTS[0])
    prompt = torch.randint(0, 97, (2, 5))
    free = generate(student, prompt, 8)
    eos = int(free[0, 7])  # the third generated token of row 0
    out = generate(student, prompt, 8, eos_token_id=eos, pad_token_id=96)
    row0 = out[0, 5:].tolist()
    assert row0[:3] == free[0, 5:8].tolist()
    assert all(t == 96 for t in row0[3:])
    if eos not in free[1, 5:].tolist():
        assert out.shape[1] == 13 and torch.equal(out[1], free[1])


def test_sampling_is_reproducible_and_respects_top_p():
    student = make_student(**VARIANTS[0])
    prompt = torch.randint(0, 97, (3, 5))
    a = generate(student, prompt, 6, do_sample=True, temperature=0.8, generator=torch.Generator().manual_seed(3))
    b = generate(student, prompt, 6, do_sample=True, temperature=0.8, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    # top_p -> 0 keeps only the most likely token: sampling becomes greedy
    c = generate(student, prompt, 6, do_sample=True, top_p=1e-6, generator=torch.Generator().manual_seed(4))
    assert torch.equal(c, generate(student, prompt, 6))
    with pytest.raises(ValueError, match="temperature"):
        generate(student, prompt, 2, do_sample=True, temperature=0.0)


def test_teacher_goes_through_its_own_generate():
    teacher = make_teacher("llama")
    prompt = torch.randint(0, 97, (1, 6))
    out = generate(teacher, prompt, 5)
    seq = prompt
    with torch.no_grad():
        for _ in range(5):
            seq = torch.cat([seq, teacher(seq).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(out, seq)


def test_logits_to_keep_gives_the_last_rows_of_the_full_forward():
    student = make_student(**VARIANTS[0])
    ids = torch.randint(5, 90, (2, 21))
    with torch.no_grad():
        full = student(ids).logits
        last = student(ids, logits_to_keep=3).logits
    assert last.shape == (2, 3, full.shape[-1])
    assert rel_err(last, full[:, -3:]) < 1e-6
    with pytest.raises(ValueError, match="logits_to_keep"):
        student(ids, logits_to_keep=1, labels=ids)
    with pytest.raises(ValueError, match="left-padded"):
        student(ids, attention_mask=torch.ones_like(ids).index_fill(1, torch.tensor([0]), 0), logits_to_keep=1)


def test_logits_to_keep_on_a_right_padded_batch_matches_each_row_alone():
    student = make_student(**VARIANTS[0])
    ids = torch.randint(5, 90, (2, 21))
    mask = torch.ones_like(ids)
    mask[1, 15:] = 0  # row 1 has 15 real tokens, then padding
    with torch.no_grad():
        kept = student(ids, attention_mask=mask, logits_to_keep=8).logits
        alone0 = student(ids[:1]).logits
        alone1 = student(ids[1:, :15]).logits
    assert kept.shape == (2, 8, alone0.shape[-1])
    assert rel_err(kept[0], alone0[0, -8:]) < 1e-5
    # the last 8 are positions 13..20: row 1's real positions 13 and 14 come first
    assert rel_err(kept[1, :2], alone1[0, 13:15]) < 1e-5


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_familys_decoder_layer_hands_the_step_to_the_hybrid_layer(family):
    """A decoding step runs the teacher's own decoder-layer forward with the layer's state in the
    ``layer_step`` keyword (models.compiled_step.LayerStep), which each family's decoder layer must
    pass on to its attention module: if one dropped it, the attention would see a lone token with no
    state and the steps would leave the parallel forward."""
    student = convert_to_hybrid(make_teacher(family), HybridConfig(chunk_size=16, window=8, sink_tokens=2)).eval()
    with torch.no_grad():
        for layer in student.lm.model.layers:
            layer.self_attn.hybrid_gates.weight.normal_(0, 0.3)
    ids = torch.randint(0, 97, (2, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = student(ids).logits
        logits, state = prefill(student, ids[:, :11])
        before = [s.pos.clone() for s in state.layers]
        steps = [logits] + [student(ids[:, t:t + 1], decode_state=state).logits[:, -1] for t in range(11, 29)]
    assert rel_err(torch.stack(steps, 1), full[:, 10:29]) < 1e-5
    assert all(torch.equal(s.pos, p + 18) for s, p in zip(state.layers, before))
