"""The layer study's scoring: per-block sums against hand computation, means and paired bootstrap
intervals against values computed by hand, and a metric that sees a student it knows is broken."""

import math

import torch
import torch.nn.functional as F

from experiments.layer_study import block_scores, markdown, summarise
from models import HybridConfig, convert_to_hybrid
from tests.conftest import make_teacher


def test_block_scores_are_the_token_sums_of_ce_kl_and_agreement():
    teacher = make_teacher("llama")
    same = convert_to_hybrid(teacher, HybridConfig(mode="swa", window=64, sink_tokens=0))  # == teacher (invariant 1)
    broken = convert_to_hybrid(teacher, HybridConfig(mode="mlstm", window=4))
    blocks = {"a": torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(0))}
    scores = block_scores(teacher, {"same": same.eval(), "broken": broken.eval()}, blocks)
    with torch.no_grad():
        logits = teacher(blocks["a"]).logits[:, :-1]
    ce = F.cross_entropy(logits[0], blocks["a"][0, 1:], reduction="sum").item()
    assert math.isclose(scores["teacher"]["a"][0]["student_ce"], ce, rel_tol=1e-5)
    first = scores["same"]["a"][0]
    assert math.isclose(first["student_ce"], ce, rel_tol=1e-4) and abs(first["kl_teacher_student"]) < 1e-3
    assert first["top1_agreement"] == first["n"] == 19
    # the metric sees a difference that is known to exist (on random ids CE says little: KL and agreement)
    bad = scores["broken"]["a"][0]
    assert bad["kl_teacher_student"] > 1.0 and bad["top1_agreement"] < first["top1_agreement"]


def _rows(values, n=10):
    return [{"student_ce": v * n, "kl_teacher_student": 0.0, "top1_agreement": n, "n": n} for v in values]


def test_summarise_means_and_paired_intervals():
    scores = {"teacher": {"x": _rows([1.0, 1.0]), "y": _rows([2.0, 2.0, 2.0])},
              "base @ converted": {"x": _rows([3.0, 5.0]), "y": _rows([4.0, 4.0, 4.0])},
              "other @ converted": {"x": _rows([3.5, 5.5]), "y": _rows([4.5, 4.5, 4.5])}}
    summary = summarise(scores, "base @ converted", iterations=200, seed=0)
    base, other = summary["base @ converted"], summary["other @ converted"]
    assert math.isclose(base["x"]["student_ce"], 4.0) and math.isclose(base["all"]["student_ce"], 4.0)
    lo, hi = base["x"]["student_ce_90"]
    assert 3.0 <= lo <= 4.0 <= hi <= 5.0 and lo < hi  # resampling two blocks of 3 and 5
    # every block of "other" is 0.5 worse: the paired difference is exactly 0.5 in every resample
    assert math.isclose(other["all"]["ce_minus_baseline"], 0.5)
    assert all(math.isclose(v, 0.5) for v in other["all"]["ce_minus_baseline_90"])
    assert "ce_minus_baseline" not in base["all"]
    table = markdown(summary, "base @ converted", 97, "python -m experiments.layer_study", 20)
    assert "| other | converted | 4.500 [" in table and "+0.500 [+0.500, +0.500]" in table
    assert "| base | converted | 4.000 [" in table and "(baseline)" in table
    assert "| other | converted | 4.50 / 0.00 / 1.00 | 4.50 / 0.00 / 1.00 |" in table  # per domain x, y
    assert f"ln(vocab) = {math.log(97):.3f}" in table


def test_mix_gate_trajectory_reads_what_an_alignment_logged(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    from experiments.layer_study import mix_gate_trajectory

    writer = SummaryWriter(str(tmp_path / "align_x" / "version_0"))
    for step, (mean, l0, l1) in enumerate([(0.018, 0.018, 0.018), (0.03, 0.02, 0.04)]):
        writer.add_scalar("gate/mean_o", mean, step)
        writer.add_scalar("gate/mean_o_layer_00", l0, step)
        writer.add_scalar("gate/mean_o_layer_01", l1, step)
    writer.close()
    got = mix_gate_trajectory(tmp_path / "align_x")
    assert got["steps"] == 2 and math.isclose(got["first"], 0.018, rel_tol=1e-6)
    assert math.isclose(got["last"], 0.03, rel_tol=1e-6)
    assert [round(v, 6) for v in got["last_per_layer"]] == [0.02, 0.04]
    assert mix_gate_trajectory(tmp_path / "nothing") is None
