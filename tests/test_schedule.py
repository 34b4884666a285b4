"""Learning-rate schedules: values computed by hand from the formulas in schedule.py."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch

from onestage.config import ScheduleConfig
from onestage.engine.schedule import LRScheduler, lr_at, lr_curve, plot_lr

# base 0.1, min 0.001, warmup 10, total 101: the cosine runs over steps 10..100 (span 90).
COS = dict(base_lr=0.1, total_steps=101, warmup_steps=10, min_lr=0.001)


def test_warmup_is_linear_from_zero() -> None:
    assert lr_at(0, **COS) == 0.0
    assert lr_at(5, **COS) == pytest.approx(0.05, abs=1e-15)
    assert lr_at(9, **COS) == pytest.approx(0.09, abs=1e-15)


def test_cosine_start_midpoint_end() -> None:
    assert lr_at(10, **COS) == pytest.approx(0.1, abs=1e-15)  # end of warmup = base_lr
    # step 25: progress 15/90 = 1/6, cos(pi/6) = sqrt(3)/2
    assert lr_at(25, **COS) == pytest.approx(0.001 + 0.5 * 0.099 * (1 + math.sqrt(3) / 2), abs=1e-15)
    assert lr_at(55, **COS) == pytest.approx(0.0505, abs=1e-15)  # midpoint: (base + min) / 2
    assert lr_at(100, **COS) == 0.001  # the last step (total - 1) is exactly min_lr
    assert lr_at(99, **COS) > 0.001
    assert lr_at(500, **COS) == 0.001  # overrun of the estimated total stays at min_lr


def test_no_warmup() -> None:
    kw = dict(base_lr=0.2, total_steps=11, warmup_steps=0, min_lr=0.0)
    assert lr_at(0, **kw) == 0.2
    assert lr_at(5, **kw) == pytest.approx(0.1, abs=1e-15)
    assert lr_at(10, **kw) == 0.0
    # a 2-step run: first step at base, last at min; a 1-step run's only step is the last one
    assert [lr_at(s, base_lr=0.2, total_steps=2, warmup_steps=0, min_lr=0.0) for s in (0, 1)] == [0.2, 0.0]
    assert lr_at(0, base_lr=0.2, total_steps=1, warmup_steps=0, min_lr=0.05) == 0.05


def test_total_steps_not_longer_than_warmup() -> None:
    kw = dict(base_lr=0.1, total_steps=5, warmup_steps=10, min_lr=0.01)
    # the warmup keeps its length: the run ends at 4/10 of base_lr
    assert [lr_at(s, **kw) for s in range(5)] == pytest.approx([0.0, 0.01, 0.02, 0.03, 0.04], abs=1e-15)
    assert lr_at(10, **kw) == 0.01  # past the warmup there is no cosine left: min_lr
    # total == warmup + 1: the step right after warmup is also the last one
    assert lr_at(10, base_lr=0.1, total_steps=11, warmup_steps=10, min_lr=0.01) == 0.01


def test_step_decay() -> None:
    kw = dict(base_lr=0.1, total_steps=100, warmup_steps=0, min_lr=0.0, name="step", milestones=(0.5, 0.75), gamma=0.1)
    assert lr_at(0, **kw) == 0.1
    assert lr_at(49, **kw) == 0.1
    assert lr_at(50, **kw) == pytest.approx(0.01, abs=1e-15)
    assert lr_at(74, **kw) == pytest.approx(0.01, abs=1e-15)
    assert lr_at(75, **kw) == pytest.approx(0.001, abs=1e-15)
    assert lr_at(75, **{**kw, "min_lr": 0.005}) == 0.005  # min_lr is a floor
    assert lr_at(5, **{**kw, "warmup_steps": 10}) == pytest.approx(0.05, abs=1e-15)


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="unknown schedule 'linear'"):
        lr_at(20, **COS, name="linear")
    with pytest.raises(ValueError, match="min_lr"):
        lr_at(0, base_lr=0.1, total_steps=10, warmup_steps=0, min_lr=0.2)
    with pytest.raises(ValueError, match="total_steps"):
        lr_at(0, base_lr=0.1, total_steps=0, warmup_steps=0, min_lr=0.0)


def _optimizer() -> torch.optim.Optimizer:
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    return torch.optim.SGD([{"params": [a]}, {"params": [b], "lr_scale": 0.1}], lr=123.0)


def test_scheduler_sets_every_group_with_lr_scale() -> None:
    cfg = ScheduleConfig(warmup_steps=10, min_lr=0.001)
    opt = _optimizer()
    sched = LRScheduler(opt, cfg, base_lr=0.1, total_steps=101)
    assert sched.step(0) == 0.0
    assert [g["lr"] for g in opt.param_groups] == [0.0, 0.0]
    sched.step(55)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0505, abs=1e-15)
    assert opt.param_groups[1]["lr"] == pytest.approx(0.00505, abs=1e-15)


def test_scheduler_total_steps_and_state_roundtrip() -> None:
    cfg = ScheduleConfig(warmup_steps=10, min_lr=0.001)
    sched = LRScheduler(_optimizer(), cfg, base_lr=0.1, total_steps=101)
    sched.set_total_steps(201)  # a time-budget trainer re-estimates the total
    assert sched.step(105) == pytest.approx(0.0505, abs=1e-15)  # new midpoint: (10 + 200) / 2
    opt2 = _optimizer()
    restored = LRScheduler(opt2, cfg, base_lr=0.1, total_steps=101)
    restored.load_state_dict(sched.state_dict())
    assert restored.total_steps == 201 and restored.last_step == 105
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.0505, abs=1e-15)  # lr re-applied on load


def test_scheduler_warns_when_training_shorter_than_warmup() -> None:
    with pytest.warns(UserWarning, match="warmup_steps"):
        LRScheduler(_optimizer(), ScheduleConfig(warmup_steps=100), base_lr=0.1, total_steps=50)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LRScheduler(_optimizer(), ScheduleConfig(warmup_steps=100), base_lr=0.1, total_steps=500)


def test_lr_curve_matches_lr_at() -> None:
    cfg = ScheduleConfig(warmup_steps=10, min_lr=0.001)
    curve = lr_curve(cfg, 0.1, 101)
    assert len(curve) == 101
    assert curve[0] == 0.0 and curve[10] == pytest.approx(0.1) and curve[-1] == 0.001


def test_plot_lr_writes_png(tmp_path: Path) -> None:
    png_magic = b"\x89PNG\r\n\x1a\n"
    a = plot_lr([0.0, 0.05, 0.1, 0.05, 0.0], tmp_path / "a.png")
    b = plot_lr((ScheduleConfig(warmup_steps=5), 0.1, 50), tmp_path / "sub" / "b.png")
    for p in (a, b):
        assert p.read_bytes()[:8] == png_magic
