"""The time-budget planner (engine/budget.py) with a fake clock, and a budgeted training run
whose clock is simulated: nothing here depends on how fast the machine is."""

from __future__ import annotations

from pathlib import Path

import pytest

from onestage.config import load_config
from onestage.engine import trainer as trainer_mod
from onestage.engine.budget import FINAL_EVAL_FACTOR, BudgetPlanner

ROOT = Path(__file__).resolve().parents[1]


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def planner(budget_s=100.0, val_batches=4, steps_per_validation=10, **kw) -> tuple[BudgetPlanner, FakeClock]:
    clock = FakeClock()
    return BudgetPlanner(budget_s, val_batches, steps_per_validation, clock=clock, **kw), clock


def run_steps(p: BudgetPlanner, clock: FakeClock, n: int, seconds: float) -> None:
    for _ in range(n):
        clock.t += seconds
        p.record_step(seconds)


def test_pace_is_the_median_of_recent_steps_and_ignores_one_slow_step():
    p, clock = planner()
    assert p.pace is None
    run_steps(p, clock, 9, 1.0)
    run_steps(p, clock, 1, 30.0)  # an epoch's first batch
    assert p.pace == 1.0


def test_calibrated_estimate_is_the_pace_before_any_step():
    p, _ = planner(step_estimate=2.5)
    assert p.pace == 2.5
    assert p.validation_estimate() == pytest.approx(4 * 0.5 * 2.5)  # 4 batches at half a step each


def test_reserve_is_one_validation_plus_the_final_evaluation_and_uses_the_measured_validation():
    p, clock = planner()
    run_steps(p, clock, 5, 2.0)
    assert p.reserve() == pytest.approx((1 + FINAL_EVAL_FACTOR) * 4 * 0.5 * 2.0)
    clock.t += 6.0
    p.record_validation(6.0)
    assert p.reserve() == pytest.approx((1 + FINAL_EVAL_FACTOR) * 6.0)
    assert p.remaining() == pytest.approx(100 - 16 - (1 + FINAL_EVAL_FACTOR) * 6.0)


def test_next_step_fits_until_the_reserve_and_the_run_ends_within_the_budget():
    p, clock = planner(budget_s=60.0)
    steps = 0
    while p.next_step_fits():
        run_steps(p, clock, 1, 1.0)
        steps += 1
    reserve = p.reserve()
    assert p.remaining() < 1.0 <= p.remaining() + 1.0  # stopped at the first step that would not fit
    # What is left is what the final evaluation needs: the run ends on time.
    assert clock.t - 1000 + reserve == pytest.approx(60.0, abs=1.0)
    assert steps == int(60 - reserve)


def test_a_resumed_run_counts_the_time_already_spent():
    p, _ = planner(budget_s=100.0, elapsed_before=40.0)
    assert p.elapsed() == pytest.approx(40.0)


def test_planned_steps_follow_the_time_left_at_the_pace():
    p, clock = planner(budget_s=1000.0, val_batches=0)
    run_steps(p, clock, 10, 1.0)  # 10 s spent, no validation to reserve
    assert p.planned_total_steps(10) == 10 + 990
    run_steps(p, clock, 60, 2.0)  # slower now: the median moves to 2 s; 130 s spent
    assert p.planned_total_steps(70) == 70 + 870 // 2
    clock.t += 2000  # over the budget: the schedule ends at the next step
    assert p.planned_total_steps(70) == 71


def test_validation_keeps_within_its_share_of_the_time():
    p, clock = planner(budget_s=1000.0, val_share=0.1)
    run_steps(p, clock, 10, 1.0)
    clock.t += 5.0
    p.record_validation(5.0)  # 5 s of 15: over 10%
    assert not p.should_validate()
    run_steps(p, clock, 85, 1.0)  # 5 + 5 of 105 s: within 10% with the next one
    assert p.should_validate()


def test_a_slow_validation_runs_less_often():
    fast, fast_clock = planner(budget_s=10_000.0)
    slow, slow_clock = planner(budget_s=10_000.0)
    counts = []
    for p, clock, val_s in ((fast, fast_clock, 1.0), (slow, slow_clock, 8.0)):
        n = 0
        for _epoch in range(50):
            run_steps(p, clock, 10, 1.0)
            if p.should_validate():
                clock.t += val_s
                p.record_validation(val_s)
                n += 1
        assert p.val_spent <= 0.1 * p.elapsed() + 1e-9
        counts.append(n)
    assert counts[0] > counts[1] > 0


def test_stop_message_says_what_to_change_when_the_budget_cannot_train():
    p, clock = planner(budget_s=10.0)
    run_steps(p, clock, 2, 4.0)
    message = p.stop_message(2, warmup_steps=100)
    assert "would not fit" in message and "train.time_budget" in message and "onestage doctor" in message
    assert "cannot train" not in p.stop_message(500, warmup_steps=100)


def test_budget_must_be_positive():
    with pytest.raises(ValueError, match="time budget"):
        BudgetPlanner(0, 1, 1)


# ----------------------------------------------------------------------------- a budgeted run, simulated time
class SimulatedPlanner(BudgetPlanner):
    """Every step takes 1 s and every validation 3 s of simulated time, whatever the machine does."""

    def __init__(self, *args, **kwargs):
        self.sim = FakeClock()
        kwargs["clock"] = self.sim
        kwargs["elapsed_before"] = 0.0
        super().__init__(*args, **kwargs)

    def record_step(self, seconds: float) -> None:
        self.sim.t += 1.0
        super().record_step(1.0)

    def record_validation(self, seconds: float) -> None:
        self.sim.t += 3.0
        super().record_validation(3.0)


def test_a_budgeted_run_fills_the_budget_reaches_min_lr_and_reserves_the_final_evaluation(tmp_path, monkeypatch):
    monkeypatch.setattr(trainer_mod, "BudgetPlanner", SimulatedPlanner)
    cfg = load_config(ROOT / "configs" / "demo_shapes.yaml", [
        "model.arch=ssdlite", "model.width_mult=0.25", "model.input_size=128", "model.extra_channels=[32,32,32]",
        "data.train.num_images=8", "data.val.num_images=4", "data.augment.preset=none", "train.batch_size=4",
        "train.log_every=1", "train.time_budget=1", "train.eval_every=1", "schedule.warmup_steps=3",
        "schedule.min_lr=0.0001", "optim.lr=0.002", "ema.enabled=false", "precision.amp=false",
        f"train.out_dir={tmp_path}", "train.name=budget",
    ])
    summary = trainer_mod.train(cfg, tmp_path / "budget", progress=False)
    assert summary["stop_reason"] == "time_budget"
    # 60 simulated seconds: steps of 1 s, validations of 3 s within 10% of the time spent, and
    # (1 + 1.25) x 3 s reserved for the last validation and the final evaluation.
    reserve = (1 + FINAL_EVAL_FACTOR) * 3.0
    assert 60 - reserve - 10 <= summary["steps"] <= 60 - reserve
    assert summary["budget_left_s"] == pytest.approx(60 - summary["steps"] - 3.0 * sum(
        1 for r in (tmp_path / "budget" / "metrics.csv").read_text().splitlines()[1:] if r.startswith("epoch")), abs=1e-6)
    rows = [r.split(",") for r in (tmp_path / "budget" / "metrics.csv").read_text().splitlines()]
    header = rows[0]
    lrs = [float(dict(zip(header, r))["lr"]) for r in rows[1:] if r[0] == "step"]
    assert max(lrs) == pytest.approx(0.002, rel=0.1)  # the cosine started from the base lr
    assert lrs[-1] <= 0.0001 + 0.05 * (0.002 - 0.0001), lrs[-5:]  # ...and ended at min_lr
    validations = sum(r[0] == "epoch" for r in rows[1:])
    assert 1 <= validations <= 0.1 * 60 / 3 + 1  # within the share, plus the last one
    assert (tmp_path / "budget" / "best.pt").exists()
