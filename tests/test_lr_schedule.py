"""LR schedules: exact values at the key steps (formulas written here), validation, optimizer hooks."""
import dataclasses
import math

import pytest
import torch

from illada.errors import IlladaError
from illada.training.lr_schedule import (
    Constant,
    LinearDecayTail,
    WarmupConstantCosine,
    WarmupStableDecay,
    build_schedule,
    set_lr,
)

PEAK, MIN = 4e-4, 1e-5


def test_warmup_is_linear_and_reaches_peak():
    for schedule in (Constant(PEAK, warmup_steps=10),
                     WarmupStableDecay(PEAK, total_steps=100, warmup_steps=10, min_lr=MIN),
                     WarmupConstantCosine(PEAK, total_steps=100, switch_step=50, warmup_steps=10, min_lr=MIN),
                     LinearDecayTail(PEAK, total_steps=100, warmup_steps=10, min_lr=MIN)):
        assert schedule(0) == pytest.approx(PEAK * 1 / 11)
        assert schedule(4) == pytest.approx(PEAK * 5 / 11)
        assert schedule(9) == pytest.approx(PEAK * 10 / 11)
        assert schedule(10) == pytest.approx(PEAK)
        assert all(schedule(s) < schedule(s + 1) for s in range(9))


def test_constant():
    assert [Constant(1e-3)(s) for s in (0, 1, 10**6)] == [1e-3] * 3


def test_wsd_decays_from_peak():
    s = WarmupStableDecay(PEAK, total_steps=200, warmup_steps=20, min_lr=MIN, decay_fraction=0.25)
    assert s.decay_start == 150
    assert s(149) == pytest.approx(PEAK) and s(150) == pytest.approx(PEAK)
    assert s(170) == pytest.approx(PEAK + (MIN - PEAK) * 20 / 49)
    assert s(199) == pytest.approx(MIN)


def test_short_run_still_decays():
    # 6 steps, 10 % decay: one decay step, and it is the run's last step
    s = WarmupStableDecay(3e-3, total_steps=6, warmup_steps=2, min_lr=1e-5, decay_fraction=0.1)
    assert [s(k) for k in range(6)] == pytest.approx([1e-3, 2e-3, 3e-3, 3e-3, 3e-3, 1e-5])


def test_cosine_switch_midpoint_end():
    s = WarmupConstantCosine(2e-4, total_steps=1001, switch_step=600, warmup_steps=100, min_lr=5e-6)
    assert s(599) == pytest.approx(2e-4) and s(600) == pytest.approx(2e-4)
    assert s(800) == pytest.approx((2e-4 + 5e-6) / 2)  # decay over steps 600..1000: midpoint 800
    assert s(700) == pytest.approx(5e-6 + (2e-4 - 5e-6) * 0.5 * (1 + math.cos(math.pi * 0.25)))
    assert s(1000) == pytest.approx(5e-6) and s(5000) == pytest.approx(5e-6)
    assert all(s(k) > s(k + 1) for k in range(600, 1000))


def test_linear_tail_sft():
    # iLLaDA SFT: warmup to 5e-6, constant, linear decay to 5e-7 over the last 10 %.
    s = LinearDecayTail(5e-6, total_steps=300, warmup_steps=20, min_lr=5e-7, decay_fraction=0.1)
    assert s.decay_start == 270  # 0.1 * 300 is not exactly 30 in floating point
    assert s(269) == pytest.approx(5e-6) and s(270) == pytest.approx(5e-6)
    assert s(285) == pytest.approx(5e-6 + (5e-7 - 5e-6) * 15 / 29)
    assert s(299) == pytest.approx(5e-7)


def test_build_schedule_by_name_and_round_trip():
    common = dict(peak_lr=PEAK, min_lr=MIN, warmup_steps=10, total_steps=100)
    assert build_schedule("constant", **common) == Constant(PEAK, warmup_steps=10)
    cos = build_schedule("cosine", switch_step=80, **common)
    assert cos == WarmupConstantCosine(PEAK, total_steps=100, switch_step=80, warmup_steps=10, min_lr=MIN)
    wsd = build_schedule("wsd", decay_fraction=0.2, **common)
    tail = build_schedule("linear-tail", decay_fraction=0.1, **common)
    for schedule in (cos, wsd, tail):
        assert build_schedule(schedule.name, **dataclasses.asdict(schedule)) == schedule


@pytest.mark.parametrize("name, kw, words", [
    ("bogus", {}, "unknown schedule"),
    ("cosine", dict(peak_lr=1e-3, total_steps=100), "missing switch_step"),
    ("cosine", dict(peak_lr=1e-3, total_steps=100, switch_step=101), "switch_step"),
    ("cosine", dict(peak_lr=1e-3, total_steps=100, switch_step=5, warmup_steps=10), "switch_step"),
    ("wsd", dict(peak_lr=1e-3, total_steps=100, switch_step=5), "unknown keys switch_step"),
    ("wsd", dict(peak_lr=-1e-3, total_steps=100), "peak_lr"),
    ("wsd", dict(peak_lr=1e-3, min_lr=1e-2, total_steps=100), "min_lr"),
    ("wsd", dict(peak_lr=1e-3, total_steps=0), "total_steps"),
    ("wsd", dict(peak_lr=1e-3, total_steps=100, warmup_steps=95, decay_fraction=0.1), "exceed"),
    ("wsd", dict(peak_lr=1e-3, total_steps=100, decay_fraction=1.5), "decay_fraction"),
    ("linear-tail", dict(peak_lr=1e-3, total_steps=100, warmup_steps=-1), "warmup_steps"),
    ("constant", dict(peak_lr=0.0), "peak_lr"),
])
def test_bad_configs_raise(name, kw, words):
    with pytest.raises(IlladaError, match=words):
        build_schedule(name, **kw)


def test_optimizer_hooks_follow_the_schedule_from_any_step():
    schedule = WarmupConstantCosine(1e-2, total_steps=20, switch_step=10, warmup_steps=4, min_lr=1e-4)
    param = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([{"params": [param]}, {"params": [torch.nn.Parameter(torch.zeros(1))]}], lr=1e-2)
    for step in (0, 3, 12, 25):
        set_lr(opt, schedule(step))
        assert [g["lr"] for g in opt.param_groups] == [schedule(step)] * 2

