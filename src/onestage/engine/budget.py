"""The time-budget planner: ``train.time_budget`` is the wall-clock time of the whole run.

The budget covers set-up, the training steps, validation during training and the final
evaluation. Everything is planned from measured times:

- the pace: the median of the recent step times (one slow step, e.g. an epoch's first batch,
  must not bend the schedule); before any step, the calibrated step time if there is one;
- the validation cost: measured at each validation (before the first, estimated from the
  pace: a forward pass over the val split costs about half a training step per batch);
- the final evaluation (after training: the best checkpoint's evaluation, plots, drawings) is
  reserved in advance, ``FINAL_EVAL_FACTOR`` times a validation; so is one last validation;
- validation takes at most ``val_share`` of the time spent so far: an epoch end validates only
  when that share still holds afterwards, so a slow validation runs less often;
- the schedule is re-planned every step: the steps still affordable at the current pace
  (``planned_total_steps``), and training stops when the next step would not fit in what is
  left before the reserved evaluations (``next_step_fits``).

Pure bookkeeping with an injectable clock: tested with a fake clock, never the real one.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

# The final evaluation also draws the worst images and the predictions: a little more than a validation.
FINAL_EVAL_FACTOR = 1.25
# A forward pass over one validation batch, as a share of one training step (forward + backward
# + optimizer), used until a validation has been measured.
EVAL_BATCH_SHARE = 0.5
PACE_WINDOW = 50


@dataclass
class BudgetPlanner:
    budget_s: float  # the whole run, seconds
    val_batches: int  # batches in one validation
    steps_per_validation: int  # training steps between two validation chances (epoch x eval_every)
    val_share: float = 0.1  # at most this share of the time spent goes to validation
    clock: Callable[[], float] = time.perf_counter
    elapsed_before: float = 0.0  # seconds spent by earlier processes of this run (resume)
    step_estimate: float | None = None  # seconds per step before any is measured (calibration)
    step_times: list[float] = field(default_factory=list)
    val_times: list[float] = field(default_factory=list)
    val_spent: float = 0.0

    def __post_init__(self) -> None:
        if self.budget_s <= 0:
            raise ValueError(f"time budget must be > 0 seconds, got {self.budget_s}")
        self._start = self.clock() - self.elapsed_before

    # ------------------------------------------------------------------ measurements
    def elapsed(self) -> float:
        return self.clock() - self._start

    def record_step(self, seconds: float) -> None:
        self.step_times.append(seconds)

    def record_validation(self, seconds: float) -> None:
        self.val_times.append(seconds)
        self.val_spent += seconds

    # ------------------------------------------------------------------ estimates
    @property
    def pace(self) -> float | None:
        """Seconds per step: the median of the recent steps, else the calibrated estimate."""
        if self.step_times:
            return statistics.median(self.step_times[-PACE_WINDOW:])
        return self.step_estimate

    def validation_estimate(self) -> float:
        """Seconds one validation takes: the last measured one, else from the pace."""
        if self.val_times:
            return self.val_times[-1]
        return self.val_batches * EVAL_BATCH_SHARE * (self.pace or 0.0)

    def reserve(self) -> float:
        """Seconds kept for the end: one last validation and the final evaluation."""
        return (1.0 + FINAL_EVAL_FACTOR) * self.validation_estimate()

    def remaining(self) -> float:
        """Seconds left for training steps and intermediate validations."""
        return self.budget_s - self.elapsed() - self.reserve()

    # ------------------------------------------------------------------ decisions
    def next_step_fits(self) -> bool:
        pace = self.pace
        return self.remaining() >= (pace if pace is not None else 0.0)

    def planned_total_steps(self, steps_done: int) -> int:
        """The schedule's length: the steps done plus those the time left affords at the pace,
        less what validations at their share will take of it."""
        pace = self.pace
        if not pace:
            return steps_done + 1
        remaining = max(0.0, self.remaining())
        chances = remaining / pace / max(1, self.steps_per_validation)  # validations ahead, at most
        future_val = min(self.val_share * remaining, chances * self.validation_estimate())
        return steps_done + max(1, int((remaining - future_val) / pace))

    def should_validate(self) -> bool:
        """Whether an intermediate validation now keeps validation within its share of the time."""
        estimate = self.validation_estimate()
        return self.val_spent + estimate <= self.val_share * (self.elapsed() + estimate)

    def stop_message(self, steps_done: int, warmup_steps: int) -> str:
        pace = self.pace or 0.0
        message = (
            f"time budget: {steps_done} steps in {self.elapsed():.0f} s; the next step (~{pace:.1f} s at the measured "
            f"pace) would not fit in the {max(0.0, self.remaining()):.0f} s left before the final evaluation "
            f"({self.reserve():.0f} s reserved); training stops here"
        )
        if steps_done < max(1, warmup_steps):
            message += (
                f". That is fewer steps than the warmup ({warmup_steps}): this run cannot train. Raise "
                "train.time_budget, or make steps cheaper (train.batch_size, model.input_size; `onestage doctor "
                "CONFIG` measures the precision modes of this machine)"
            )
        return message
