"""Distil-xLSTM through the stage code: the KD module's loss with the Frobenius term against an
independent computation, and a tiny run through the CLI (KD -> expert), alignment refused."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from experiments.run import main
from lightning_modules import AlignmentModule, SparseKDModule
from lightning_modules.schedules import Schedule
from models import DistilXLSTMStudent, load_student, load_teacher
from tests.lightning_modules.test_stages import cli_args, env  # noqa: F401  (the module's fixture)


def test_kd_loss_with_frobenius_term_equals_the_published_formula(env):
    """(1 - a - b) CE + a T^2 KL(teacher^T || student^T) + b ||mean_l h_t^l - h_s||_F / sqrt(|h_s|),
    computed here with torch.nn.functional on the same batch."""
    root, _ = env
    T, a, b = 2.0, 0.3, 0.1
    module = SparseKDModule(teacher=str(root / "teacher"), student_family="distil_xlstm", trainable="new", top_k=None,
                            temperature=Schedule("constant", T), alpha=Schedule("constant", a),
                            beta=Schedule("constant", b))
    module.configure_model()
    assert isinstance(module.student, DistilXLSTMStudent)
    assert module.student.num_layers == module.teacher.config.num_hidden_layers // 2
    trainable = {n for n, p in module.student.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in module.student.new_parameters()}
    torch.manual_seed(0)
    ids = torch.randint(5, 90, (2, 24))
    labels = ids.clone()
    labels[0, :5] = -100  # a prompt without loss
    loss = module.training_step({"input_ids": ids, "labels": labels}, 0)

    with torch.no_grad():
        s_out = module.student(ids, output_hidden_states=True)
        t_out = module.teacher(ids, output_hidden_states=True)
    targets = torch.cat([labels[:, 1:], torch.full((2, 1), -100)], 1)
    keep = targets != -100
    ce = F.cross_entropy(s_out.logits[keep], targets[keep])
    kl = F.kl_div(F.log_softmax(s_out.logits / T, -1), F.log_softmax(t_out.logits / T, -1), log_target=True,
                  reduction="none").sum(-1)[keep].mean()
    teacher_mean = sum(t_out.hidden_states[1:]) / module.teacher.config.num_hidden_layers
    diff = teacher_mean - s_out.hidden_states[-1]
    frob = torch.stack([torch.linalg.matrix_norm(diff[i]) for i in range(2)]).mean() / math.sqrt(diff[0].numel())
    expected = (1 - a - b) * ce + a * T**2 * kl + b * frob
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_distil_xlstm_kd_then_expert_through_the_cli(env, tmp_path):
    root, _ = env
    beta = json.dumps({"kind": "delta", "start": 0.2, "end": 0.1, "delta": 0.05})
    main(cli_args(env, "kd", tmp_path / "kd", extra=[
        "--model.init_args.student_family", "distil_xlstm", "--model.init_args.trainable", "new",
        "--model.init_args.beta", beta, "--model.init_args.lr", "1e-2", "--model.init_args.preset", "null", "--model.init_args.top_k", "8"]))
    student = load_student(tmp_path / "kd" / "student")
    teacher = load_teacher(str(root / "teacher"))
    assert isinstance(student, DistilXLSTMStudent)
    # embedding and head stayed the teacher's (frozen), the blocks trained
    assert torch.equal(student.embed_tokens.weight, teacher.model.embed_tokens.weight)
    assert torch.equal(student.lm_head.weight, teacher.lm_head.weight)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((tmp_path / "kd").rglob("events.out.tfevents*")).parent))
    events.Reload()
    assert {"train/frobenius", "train/kd_beta", "val/student_ce"} <= set(events.Tags()["scalars"])
    betas = [e.value for e in events.Scalars("train/kd_beta")]
    assert betas[0] == pytest.approx(0.2) and betas[1] == pytest.approx(0.1 + 0.1 / (1 + math.log(2)))

    main(cli_args(env, "expert", tmp_path / "expert", steps=2, extra=[
        "--model.init_args.student_ckpt", str(tmp_path / "kd" / "student"), "--model.init_args.domain", "chat",
        "--model.init_args.trainable", "new"]))
    expert = load_student(tmp_path / "expert" / "student")
    assert isinstance(expert, DistilXLSTMStudent)
    ids = torch.randint(5, 90, (1, 12))
    with torch.no_grad():
        assert not torch.equal(expert(ids).logits, student(ids).logits)


def test_alignment_refuses_a_distil_xlstm_student(env, tmp_path):
    root, _ = env
    with pytest.raises(ValueError, match="has none; train a Distil-xLSTM student with SparseKDModule"):
        AlignmentModule(teacher=str(root / "teacher"), student_family="distil_xlstm").configure_model()
