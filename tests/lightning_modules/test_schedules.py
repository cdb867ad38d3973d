import math

import pytest

from lightning_modules.base import capped_warmup, warmup_constant, warmup_cosine
from lightning_modules.schedules import Schedule, cosine, delta_distillation, linear


def test_linear_and_cosine_at_chosen_steps():
    assert linear(2.0, 1.0, 0, 100) == 2.0
    assert linear(2.0, 1.0, 50, 100) == pytest.approx(1.5)
    assert linear(2.0, 1.0, 150, 100) == 1.0
    assert cosine(2.0, 1.0, 0, 100) == pytest.approx(2.0)
    assert cosine(2.0, 1.0, 50, 100) == pytest.approx(1.5)
    assert cosine(2.0, 1.0, 25, 100) == pytest.approx(1.0 + 0.5 * (1 + math.cos(math.pi / 4)))
    assert cosine(2.0, 1.0, 100, 100) == pytest.approx(1.0)


def test_delta_distillation_matches_published_formula():
    # alpha 0.8 -> 0.5, delta 0.05, 10 steps per epoch
    assert delta_distillation(0.8, 0.5, 0, 10, 0.05) == pytest.approx(0.8)
    assert delta_distillation(0.8, 0.5, 3, 10, 0.05) == pytest.approx(0.5 + 0.3 / (1 + math.log(4)))
    # epoch 1: v_init becomes 0.75; step 12 is k = 2 of that epoch
    assert delta_distillation(0.8, 0.5, 12, 10, 0.05) == pytest.approx(0.5 + 0.25 / (1 + math.log(3)))
    # far epochs stop at v_final, and an increasing schedule (beta 0.1 -> 0.2) moves up
    assert delta_distillation(0.8, 0.5, 10_000, 10, 0.05) == pytest.approx(0.5)
    assert delta_distillation(0.1, 0.2, 10, 10, 0.05) == pytest.approx(0.15)


def test_schedule_object_and_errors():
    assert Schedule("constant", 2.0)(123) == 2.0
    assert Schedule("linear", 2.0, 1.0)(5, total_steps=10) == pytest.approx(1.5)
    assert Schedule("delta", 2.0, 1.0, delta=0.05, steps_per_epoch=4)(4) == pytest.approx(1.95)
    with pytest.raises(ValueError, match="total_steps"):
        Schedule("cosine", 2.0, 1.0)(3)
    with pytest.raises(ValueError, match="kind"):
        Schedule("exp", 1.0)


def test_delta_schedule_refuses_an_unknown_epoch_length_instead_of_one_step_epochs():
    schedule = Schedule("delta", 2.0, 1.0, delta=0.05)
    with pytest.raises(ValueError, match=r"epoch length is unknown.*steps_per_epoch"):
        schedule(5)
    # given by the trainer or by the schedule itself, it counts global steps across epochs
    assert schedule(12, steps_per_epoch=10) == pytest.approx(1.0 + 0.95 / (1 + math.log(3)))
    assert Schedule("delta", 2.0, 1.0, delta=0.05, steps_per_epoch=10)(12) == schedule(12, steps_per_epoch=10)


def test_warm_up_is_capped_so_a_short_stage_reaches_its_peak():
    # 10 warm-up steps in a 6-step stage: capped to 10 % of 6 = 0, the first step is at the peak
    assert capped_warmup(10, 6, 0.1) == 0
    assert capped_warmup(10, 200, 0.1) == 10 and capped_warmup(10, 50, 0.1) == 5
    multipliers = [warmup_cosine(s, capped_warmup(10, 6, 0.1), 6, 0.1) for s in range(6)]
    assert max(multipliers) == 1.0
    # constant after the warm-up (the paper's Stage II)
    assert [warmup_constant(s, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
