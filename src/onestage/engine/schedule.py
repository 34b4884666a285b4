"""Learning-rate schedules, evaluated per optimizer step (seed 002, DESIGN.md section 3).

``lr_at`` is the pure function; ``LRScheduler`` applies it to an optimizer's param groups.

Cosine (the default), for a 0-based step index s:

    s <  W:   lr = base_lr * s / W                      (linear warmup from 0, as seed 002)
    s >= W:   p  = clamp((s - W) / (T - 1 - W), 0, 1)
              lr = min_lr + 0.5 * (base_lr - min_lr) * (1 + cos(pi * p))

with W = warmup_steps and T = total_steps. The cosine ends at the LAST step, s = T - 1, which
gets exactly min_lr (seed 002's formula divides by T - W and so stops one step short).
A time-budget trainer relies on "the last step runs at min_lr"; steps past T - 1 (an
overrun of a re-estimated total) stay at min_lr.

Short runs: the warmup keeps its configured length. If T <= W, training ends inside the
warmup (the lr never reaches base_lr) and any step >= W gets min_lr; ``LRScheduler`` warns.

Step decay (older SSD recipes: x0.1 at 2/3 and 7/8 of training): after the warmup,
lr = max(min_lr, base_lr * gamma ** k), k = number of milestones m with s >= m * T.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from onestage.config import ScheduleConfig


def lr_at(
    step: int,
    *,
    base_lr: float,
    total_steps: int,
    warmup_steps: int,
    min_lr: float,
    name: str = "cosine",
    milestones: Sequence[float] = (0.66, 0.88),
    gamma: float = 0.1,
) -> float:
    """Learning rate of the 0-based optimizer step ``step`` (see the module docstring)."""
    if step < 0:
        raise ValueError(f"lr_at: step must be >= 0, got {step}")
    if total_steps < 1:
        raise ValueError(f"lr_at: total_steps must be >= 1, got {total_steps}")
    if warmup_steps < 0:
        raise ValueError(f"lr_at: warmup_steps must be >= 0, got {warmup_steps}")
    if not 0.0 <= min_lr <= base_lr:
        raise ValueError(f"lr_at: need 0 <= min_lr <= base_lr, got min_lr={min_lr}, base_lr={base_lr}")
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    if name == "cosine":
        span = total_steps - 1 - warmup_steps
        progress = 1.0 if span <= 0 else min(1.0, (step - warmup_steps) / span)
        return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))
    if name == "step":
        k = sum(1 for m in milestones if step >= m * total_steps)
        return max(min_lr, base_lr * gamma**k)
    raise ValueError(f"lr_at: unknown schedule {name!r}; known: cosine, step")


def lr_curve(cfg: ScheduleConfig, base_lr: float, total_steps: int) -> list[float]:
    """The learning rate of every step 0 .. total_steps - 1."""
    return [
        lr_at(
            s,
            base_lr=base_lr,
            total_steps=total_steps,
            warmup_steps=cfg.warmup_steps,
            min_lr=cfg.min_lr,
            name=cfg.name,
            milestones=cfg.milestones,
            gamma=cfg.gamma,
        )
        for s in range(total_steps)
    ]


class LRScheduler:
    """Sets every param group's lr to ``lr_at(step) * group.get("lr_scale", 1.0)``.

    Call ``step(global_step)`` before each ``optimizer.step()`` (the lr of step 0 is the
    first warmup value, 0 when warmup_steps > 0). Stateless apart from ``total_steps``,
    which a time-budget trainer re-estimates with ``set_total_steps``, and the last step.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, base_lr: float, total_steps: int) -> None:
        self.optimizer = optimizer
        self.cfg = cfg
        self.base_lr = base_lr
        self.total_steps = 1
        self.last_step = -1
        self.last_lr = 0.0
        self._warned_short = False
        self.set_total_steps(total_steps)

    def set_total_steps(self, total_steps: int) -> None:
        if total_steps < 1:
            raise ValueError(f"LRScheduler: total_steps must be >= 1, got {total_steps}")
        if total_steps <= self.cfg.warmup_steps and not self._warned_short:
            self._warned_short = True
            warnings.warn(
                f"schedule.warmup_steps ({self.cfg.warmup_steps}) >= total training steps ({total_steps}): "
                "training ends during the warmup and never reaches the base learning rate",
                stacklevel=2,
            )
        self.total_steps = total_steps

    def lr(self, step_index: int) -> float:
        return lr_at(
            step_index,
            base_lr=self.base_lr,
            total_steps=self.total_steps,
            warmup_steps=self.cfg.warmup_steps,
            min_lr=self.cfg.min_lr,
            name=self.cfg.name,
            milestones=self.cfg.milestones,
            gamma=self.cfg.gamma,
        )

    def step(self, step_index: int) -> float:
        """Set the lr of step ``step_index`` on every param group; returns the base value."""
        lr = self.lr(step_index)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        self.last_step = step_index
        self.last_lr = lr
        return lr

    def state_dict(self) -> dict[str, Any]:
        # base_lr and the shape come from the config on resume; only the dynamic part is saved.
        return {"total_steps": self.total_steps, "last_step": self.last_step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.total_steps = int(state["total_steps"])
        self.last_step = int(state.get("last_step", -1))  # checkpoints before 0.2 kept total_steps only
        if self.last_step >= 0:
            self.step(self.last_step)


def plot_lr(lrs: Sequence[float] | tuple[ScheduleConfig, float, int], out_png: str | Path) -> Path:
    """Plot a learning-rate curve to a PNG: a list of values or ``(cfg, base_lr, total_steps)``."""
    if isinstance(lrs, tuple) and len(lrs) == 3 and isinstance(lrs[0], ScheduleConfig):
        cfg, base_lr, total_steps = lrs
        values = lr_curve(cfg, base_lr, total_steps)
        title = f"{cfg.name}, warmup {cfg.warmup_steps}, {total_steps} steps"
    else:
        values = [float(v) for v in lrs]  # type: ignore[union-attr]
        title = f"{len(values)} steps"
    # A bare Figure renders with the Agg canvas and touches no global pyplot state (safe in threads/tests).
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5), dpi=100)
    ax = fig.subplots()
    ax.plot(range(len(values)), values)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out
