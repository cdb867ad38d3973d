import os

import pytest
import torch

from callbacks import merge_students
from callbacks.merge import _ties, _top_magnitude_thresholds
from models import HybridConfig, convert_to_hybrid, save_student
from tests.conftest import make_teacher
from tests.models.test_checkpoint import tiny_tokenizer


def perturbed(base, seed):
    student = convert_to_hybrid(base, HybridConfig(window=8))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return student


@pytest.fixture
def experts(tmp_path):
    teacher = make_teacher("llama")
    base = convert_to_hybrid(teacher, HybridConfig(window=8))
    paths = {"base": save_student(base, tmp_path / "base", tokenizer=tiny_tokenizer())}
    for i, name in enumerate(("math", "code")):
        paths[name] = save_student(perturbed(teacher, i + 1), tmp_path / name, tokenizer=tiny_tokenizer())
    return paths


def sd(path):
    from models import load_student

    return load_student(path).state_dict()


def test_mean_is_the_elementwise_mean(experts, tmp_path):
    merged = merge_students([experts["math"], experts["code"]], "mean", out=tmp_path / "m").state_dict()
    a, b = sd(experts["math"]), sd(experts["code"])
    for key in a:
        assert torch.allclose(merged[key], (a[key] + b[key]) / 2, atol=1e-7), key
    assert (tmp_path / "m" / "merge.json").is_file() and (tmp_path / "m" / "tokenizer.json").is_file()


def test_weighted_mean_with_one_zero_weight_returns_the_first(experts):
    merged = merge_students([experts["math"], experts["code"]], "mean", weights=[1, 0]).state_dict()
    for key, value in sd(experts["math"]).items():
        assert torch.equal(merged[key], value), key


def test_task_arithmetic_with_one_expert_and_lambda_one_returns_it(experts):
    merged = merge_students([experts["math"]], "task_arithmetic", base=experts["base"], scale=1.0).state_dict()
    for key, value in sd(experts["math"]).items():
        assert torch.allclose(merged[key], value, atol=1e-6), key


def test_ties_on_a_hand_made_example():
    vectors = torch.tensor([[0.5, -0.1, 0.3, 0.0], [0.4, 0.2, -0.6, 0.1], [-0.2, 0.3, -0.1, 0.05]])
    # density 1: no trimming; elected signs (+, +, -, +); disjoint means of the agreeing entries
    merged = _ties(vectors, torch.ones(3), density=1.0)
    assert torch.allclose(merged, torch.tensor([0.45, 0.25, -0.35, 0.075]))
    # density 0.5 keeps each expert's two largest magnitudes
    trimmed = _ties(vectors, torch.ones(3), density=0.5)
    assert torch.allclose(trimmed, torch.tensor([0.45, 0.3, -0.6, 0.0]))


def test_ties_merge_runs_and_stays_between_base_and_experts(experts):
    """TIES at lambda 1 keeps, per entry, the base or a mean of experts that agree in sign: every
    merged weight lies within [min, max] of the base's and the experts' values, and (density 0.5)
    half of each task vector is trimmed, so it is neither the base nor any expert."""
    merged = merge_students([experts["math"], experts["code"]], "ties", base=experts["base"], density=0.5).state_dict()
    base, a, b = sd(experts["base"]), sd(experts["math"]), sd(experts["code"])
    moved = 0
    for key, value in merged.items():
        stack = torch.stack([base[key], a[key], b[key]])
        assert (value >= stack.min(0).values - 1e-7).all() and (value <= stack.max(0).values + 1e-7).all(), key
        moved += int((value != base[key]).sum())
    total = sum(v.numel() for v in merged.values())
    assert 0.2 * total < moved < total  # it merged: many entries left the base, the trimmed ones did not
    for expert in (a, b):
        assert any(not torch.allclose(merged[k], expert[k]) for k in merged)


def test_mismatched_experts_are_refused_naming_the_difference(experts, tmp_path):
    other = convert_to_hybrid(make_teacher("llama"), HybridConfig(window=16))
    save_student(other, tmp_path / "other", tokenizer=tiny_tokenizer())
    with pytest.raises(ValueError, match="hybrid_config.window"):
        merge_students([experts["math"], tmp_path / "other"])
    wide = convert_to_hybrid(make_teacher("llama", intermediate_size=96), HybridConfig(window=8))
    save_student(wide, tmp_path / "wide", tokenizer=tiny_tokenizer())
    with pytest.raises(ValueError, match="teacher_config.intermediate_size"):
        merge_students([experts["math"], tmp_path / "wide"])
    save_student(perturbed(make_teacher("llama"), 5), tmp_path / "notok")
    with pytest.raises(ValueError, match="tokenizers differ"):
        merge_students([experts["math"], tmp_path / "notok"])
    with pytest.raises(ValueError, match="needs base"):
        merge_students([experts["math"]], "ties")


def test_experts_of_another_teacher_with_the_same_architecture_are_refused(experts, tmp_path):
    from models import load_student

    other_teacher = make_teacher("llama", seed=3)  # same config, other weights (say base vs instruct)
    save_student(convert_to_hybrid(other_teacher, HybridConfig(window=8)), tmp_path / "foreign",
                 tokenizer=tiny_tokenizer())
    with pytest.raises(ValueError, match=r"foreign with .*math: they descend from different teachers"):
        merge_students([experts["math"], tmp_path / "foreign"])
    # the fingerprint survives saving, loading and merging
    merged = merge_students([experts["math"], experts["code"]], out=tmp_path / "merged")
    assert merged.teacher_fingerprint == load_student(experts["base"]).teacher_fingerprint is not None
    assert load_student(tmp_path / "foreign").teacher_fingerprint != merged.teacher_fingerprint


def test_interrupted_merge_leaves_no_merged_folder(experts, tmp_path, monkeypatch):
    real_replace = os.replace

    def crash(src, dst):
        if str(dst).endswith("merged"):
            raise KeyboardInterrupt("killed before the rename")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        merge_students([experts["math"], experts["code"]], out=tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged")]


def test_tokenizers_saved_with_other_load_options_still_merge_but_another_vocabulary_does_not(experts, tmp_path):
    import json
    import shutil

    from models.storage import write_manifest

    copy = tmp_path / "code_copy"
    shutil.copytree(experts["code"], copy)
    config_path = copy / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["local_files_only"] = not config.get("local_files_only", False)  # what an offline load saves
    config_path.write_text(json.dumps(config))
    write_manifest(copy)  # as saved that way (a hand edit is refused: tests/models/test_checkpoint.py)
    merge_students([experts["math"], copy])
    vocab_path = copy / "tokenizer.json"
    tok = json.loads(vocab_path.read_text())
    vocab = tok["model"]["vocab"]
    first = next(iter(vocab))
    vocab[first + "_renamed"] = vocab.pop(first)
    vocab_path.write_text(json.dumps(tok))
    write_manifest(copy)
    with pytest.raises(ValueError, match="tokenizers differ"):
        merge_students([experts["math"], copy])


@pytest.mark.parametrize("density", [0.01, 0.2, 0.5, 0.999, 1.0])
def test_global_trim_threshold_is_the_kth_largest_magnitude_of_the_whole_task_vector(density):
    g = torch.Generator().manual_seed(0)
    # tensors of very different scales and a few repeated values (ties at the threshold)
    tensors = [torch.randn(3, 7, 5, generator=g) * 10, torch.randn(3, 300, generator=g) * 1e-3,
               torch.randn(3, 2, generator=g), torch.full((3, 4), 0.25)]
    whole = torch.cat([t.flatten(1) for t in tensors], 1).abs()
    keep = max(1, int(round(density * whole.shape[1])))
    expected = whole.kthvalue(whole.shape[1] - keep + 1, dim=1).values
    got = _top_magnitude_thresholds(lambda: iter(tensors), density)
    assert torch.equal(got, expected)
    assert ((whole >= got[:, None]).sum(1) >= keep).all()


def test_ties_trims_each_experts_whole_task_vector_by_default(experts, tmp_path):
    from safetensors import safe_open

    density = 0.3
    paths = [experts["math"], experts["code"]]
    merged = merge_students(paths, "ties", base=experts["base"], density=density).state_dict()
    per_tensor = merge_students(paths, "ties", base=experts["base"], density=density, trim="per_tensor").state_dict()
    # the reference: thresholds from the concatenated task vectors (torch.kthvalue), then TIES per tensor
    files = [safe_open(str(p / "model.safetensors"), "pt") for p in (*paths, experts["base"])]
    keys = list(files[0].keys())
    vectors = {k: torch.stack([f.get_tensor(k).float() for f in files[:2]]) - files[2].get_tensor(k).float() for k in keys}
    whole = torch.cat([v.flatten(1) for v in vectors.values()], 1).abs()
    keep = int(round(density * whole.shape[1]))
    thresholds = whole.kthvalue(whole.shape[1] - keep + 1, dim=1).values
    for key in keys:
        expected = files[2].get_tensor(key).float() + _ties(vectors[key], torch.ones(2), density, thresholds)
        assert torch.allclose(merged[key], expected, atol=1e-7), key
    assert any(not torch.equal(merged[k], per_tensor[k]) for k in keys)  # the two trims differ
    with pytest.raises(ValueError, match="trim='layer' is not supported; allowed values: global, per_tensor"):
        merge_students(paths, "ties", base=experts["base"], trim="layer")
