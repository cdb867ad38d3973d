"""Distil-xLSTM students: the builder's heuristics, the xlstm package's blocks as the reference,
parallel == recurrent, save/load/merge by family, generation and clear errors."""

import math

import pytest
import torch

from callbacks import merge_students
from models import (
    DistilXLSTMConfig, DistilXLSTMStudent, HybridConfig, convert_to_hybrid, distil_xlstm_from_teacher, generate,
    load_student, save_student,
)
from models.distil_xlstm import mlstm_block_forward, mlstm_sequence, parameter_counts, slstm_block_forward
from tests.conftest import make_teacher, rel_err

# (family, overrides, expected blocks, expected heads): floor(L/2) blocks, roundup(H, 4) heads
TEACHERS = [
    ("llama", dict(num_hidden_layers=5, hidden_size=96, num_attention_heads=6, num_key_value_heads=2), 2, 8),
    ("qwen2", dict(num_hidden_layers=7, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True), 3, 4),
]


def build(family="llama", seed=0, cfg=None, **overrides):
    teacher = make_teacher(family, seed=seed, **(overrides or TEACHERS[0][1]))
    torch.manual_seed(seed)
    return teacher, distil_xlstm_from_teacher(teacher, cfg).eval()


@pytest.mark.parametrize("family,overrides,blocks,heads", TEACHERS)
def test_builder_follows_the_published_heuristics(family, overrides, blocks, heads):
    teacher, student = build(family, **overrides)
    cfg = student.distil_config
    assert student.num_layers == cfg.num_blocks == blocks == teacher.config.num_hidden_layers // 2
    assert cfg.num_heads == heads == math.ceil(teacher.config.num_attention_heads / 4) * 4
    # sLSTM and mLSTM alternate 1:1 starting with sLSTM, as the package's own block classes
    from xlstm import mLSTMBlock, sLSTMBlock

    expected = ["slstm" if i % 2 == 0 else "mlstm" for i in range(blocks)]
    assert student.block_kinds() == expected
    assert [type(b) for b in student.backbone.blocks] == [sLSTMBlock if k == "slstm" else mLSTMBlock for k in expected]
    for block, kind in zip(student.backbone.blocks, expected):
        layer_heads = block.xlstm.config.num_heads if kind == "slstm" else block.xlstm.mlstm_cell.config.num_heads
        assert layer_heads == heads
    # the teacher's embedding and head, copied and frozen; everything else trains
    assert torch.equal(student.embed_tokens.weight, teacher.model.embed_tokens.weight)
    assert torch.equal(student.lm_head.weight, teacher.lm_head.weight)
    tied = teacher.config.tie_word_embeddings
    assert (student.lm_head.weight is student.embed_tokens.weight) == tied
    V, D = teacher.config.vocab_size, teacher.config.hidden_size
    counts = parameter_counts(student)
    backbone = sum(p.numel() for p in student.backbone.parameters())
    assert counts["copied"] == V * D * (1 if tied else 2)
    assert counts["total"] == backbone + counts["copied"]
    assert counts["trainable"] == backbone
    assert counts["trainable_fraction"] == pytest.approx(backbone / (backbone + V * D * (1 if tied else 2)))
    frozen = {n for n, p in student.named_parameters() if not p.requires_grad}
    assert frozen == ({"embed_tokens.weight"} if tied else {"embed_tokens.weight", "lm_head.weight"})
    assert all(p.dtype == torch.float32 for p in student.parameters())


def test_each_block_equals_the_xlstm_package_forward():
    """The student runs the package's blocks with their state threaded through; the mLSTM cell goes
    through mlstm_kernels. Reference: each block's own ``forward`` (the package's quadratic mLSTM)."""
    _, student = build()
    x = torch.randn(2, 100, 96)
    with torch.no_grad():
        for block, kind in zip(student.backbone.blocks, student.block_kinds()):
            ref = block(x)
            mine = slstm_block_forward(block, x, None)[0] if kind == "slstm" else \
                mlstm_block_forward(block, x, None, student.distil_config)[0]
            assert rel_err(mine, ref) < 1e-5, kind


def test_mlstm_sequence_padding_keeps_the_state_of_the_last_real_token():
    torch.manual_seed(0)
    B, H, S, D = 2, 3, 70, 16
    q, k, v = (torch.randn(B, H, S, D) for _ in range(3))
    i, f = torch.randn(B, H, S), torch.randn(B, H, S) + 3
    cfg = DistilXLSTMConfig(chunk_size=32)
    h, state = mlstm_sequence(q, k, v, i, f, None, cfg)
    steps, st = [], None
    for t in range(S):  # the step kernel, one token at a time (st None: the chunkwise kernel for t = 0)
        out, st = mlstm_sequence(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], i[:, :, t:t + 1],
                                 f[:, :, t:t + 1], st, cfg)
        steps.append(out)
    assert rel_err(h, torch.cat(steps, 2)) < 1e-5
    for key in ("c", "n", "m"):
        assert rel_err(state[key], st[key]) < 1e-5, key


@pytest.mark.parametrize("T,split", [(1, 1), (63, 20), (65, 64), (130, 1)])
def test_parallel_forward_equals_recurrent_steps(T, split):
    _, student = build()
    ids = torch.randint(0, 97, (2, T), generator=torch.Generator().manual_seed(T))
    with torch.no_grad():
        full = student(ids).logits
        state = student.new_decode_state()
        parts = [student(ids[:, :split], decode_state=state).logits]
        parts += [student(ids[:, t:t + 1], decode_state=state).logits for t in range(split, T)]
    assert rel_err(torch.cat(parts, 1), full) < 1e-5
    assert state.positions.tolist() == [T, T]


def test_padded_batch_equals_each_row_alone_and_hidden_states_end_normed():
    _, student = build()
    a, b = torch.randint(0, 97, (1, 9)), torch.randint(0, 97, (1, 5))
    ids = torch.cat([a, torch.cat([torch.zeros(1, 4, dtype=torch.long), b], 1)])
    mask = torch.tensor([[1] * 9, [0] * 4 + [1] * 5])
    with torch.no_grad():
        out = student(ids, attention_mask=mask, output_hidden_states=True)
        alone_a, alone_b = student(a).logits, student(b).logits
    assert rel_err(out.logits[0], alone_a[0]) < 1e-6 and rel_err(out.logits[1, 4:], alone_b[0]) < 1e-6
    assert len(out.hidden_states) == student.num_layers + 1
    assert rel_err(student.lm_head(out.hidden_states[-1]), out.logits) < 1e-6


def test_generate_equals_greedy_argmax_over_full_forwards():
    _, student = build()
    prompt = torch.randint(0, 97, (2, 11))
    out = generate(student, prompt, max_new_tokens=6)
    ids = prompt
    with torch.no_grad():
        for _ in range(6):
            ids = torch.cat([ids, student(ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, ids)
    state = student.new_decode_state()
    with torch.no_grad():
        student(torch.randint(0, 97, (1, 300)), decode_state=state)
    small = state.nbytes()
    with torch.no_grad():
        student(torch.randint(0, 97, (1, 5)), decode_state=state)
    assert state.nbytes() == small  # constant-size state


def test_save_load_and_merge_by_family(tmp_path):
    teacher, a = build(seed=0)
    _, b = build(seed=1)
    b.embed_tokens.weight.data.copy_(a.embed_tokens.weight)
    b.lm_head.weight.data.copy_(a.lm_head.weight)
    b.teacher_fingerprint = a.teacher_fingerprint  # b plays a second expert of a's teacher
    # sLSTM weights are stored in the package's kernel-independent (external) layout, so a student
    # trained with the vanilla kernel loads into the CUDA kernel's layout and back (checked on a GPU)
    cell = a.backbone.blocks[0].xlstm.slstm_cell
    H, Dh = cell.config.num_heads, cell.config.head_dim
    saved = a.state_dict()
    assert saved["backbone.blocks.0.xlstm.slstm_cell._recurrent_kernel_"].shape == (H, Dh, 4, Dh)
    assert saved["backbone.blocks.0.xlstm.slstm_cell._bias_"].shape == (H, 4, Dh)
    assert cell._recurrent_kernel_.shape == (H, 4 * Dh, Dh)  # the vanilla kernel's own layout in memory
    save_student(a, tmp_path / "a")
    save_student(b, tmp_path / "b")
    loaded = load_student(tmp_path / "a")
    assert isinstance(loaded, DistilXLSTMStudent) and loaded.distil_config == a.distil_config
    ids = torch.randint(0, 97, (2, 40))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, a(ids).logits)
    merged = merge_students([tmp_path / "a", tmp_path / "b"], out=tmp_path / "m")
    assert isinstance(merged, DistilXLSTMStudent)
    sa, sb = a.state_dict(), b.state_dict()
    for key, value in merged.state_dict().items():
        assert torch.allclose(value, (sa[key] + sb[key]) / 2, atol=1e-6), key
    save_student(convert_to_hybrid(teacher, HybridConfig()), tmp_path / "hybrid")
    with pytest.raises(ValueError, match="one is a hybrid student, the other a distil_xlstm student"):
        merge_students([tmp_path / "a", tmp_path / "hybrid"])


def test_bad_configurations_are_named():
    teacher = make_teacher("llama", num_hidden_layers=4, hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(ValueError, match="not divisible by 12 xLSTM heads.*num_heads"):
        distil_xlstm_from_teacher(teacher, DistilXLSTMConfig(num_heads=12))
    with pytest.raises(ValueError, match=r"slstm_at=\[0, 5\] has indices >= num_blocks=2"):
        distil_xlstm_from_teacher(teacher, DistilXLSTMConfig(slstm_at=[0, 5]))
    with pytest.raises(ValueError, match="1 layer.*num_blocks"):
        distil_xlstm_from_teacher(make_teacher("llama", num_hidden_layers=1))
    with pytest.raises(ValueError, match="slstm_backend='triton'.*vanilla, cuda"):
        DistilXLSTMConfig(slstm_backend="triton")
    with pytest.raises(ValueError, match="mlstm_kernel='fast'.*chunkwise--native_autograd"):
        DistilXLSTMConfig(mlstm_kernel="fast")
    with pytest.raises(ValueError, match="unknown DistilXLSTMConfig field.*heads"):
        DistilXLSTMConfig.from_dict({"heads": 4})
    # mLSTM-only and sLSTM-only stacks are allowed ablations
    mlstm_only = distil_xlstm_from_teacher(teacher, DistilXLSTMConfig(slstm_at=[]))
    assert mlstm_only.block_kinds() == ["mlstm", "mlstm"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("hidden,heads,kernel", [(96, 6, "native"), (64, 4, "triton")])
def test_gpu_student_equals_the_cpu_student(hidden, heads, kernel):
    """mLSTM heads of 24 (96 x 2 / 8) take the native kernels on a GPU, heads of 32 (64 x 2 / 4) Triton's."""
    from models.distil_xlstm import _kernel_names

    _, student = build(num_hidden_layers=5, hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=2)
    dim = student.backbone.blocks[1].xlstm.config._inner_embedding_dim // student.distil_config.num_heads
    assert _kernel_names(student.distil_config, torch.device("cuda"), dim, dim)[1] == kernel
    ids = torch.randint(0, 97, (2, 200))
    with torch.no_grad():
        cpu = student(ids).logits
        gpu_student = student.to("cuda")
        gpu = gpu_student(ids.cuda()).logits.cpu()
        state = gpu_student.new_decode_state()
        gpu_student(ids[:, :150].cuda(), decode_state=state)
        steps = [gpu_student(ids[:, t:t + 1].cuda(), decode_state=state).logits.cpu() for t in range(150, 200)]
    assert rel_err(gpu, cpu) < 1e-3
    assert rel_err(torch.cat(steps, 1), cpu[:, 150:]) < 1e-3
