"""Mixed precision: autocast, loss scaling, and selective fp32 (seed 002, DESIGN.md section 3).

- ``resolve_dtype`` / ``autocast_context``: fp16 autocast on a GPU (bf16 where it supports it),
  bf16 on the CPU; nothing when ``amp`` is off. Whether ``amp: auto`` turns it on is measured
  (engine/calibrate.py): bf16 doubles the speed on a CPU with native bf16 and is about ten
  times slower on one without (AVX2).
- Selective fp32: numerically fragile operations (IoU, reducing thousands of small loss
  values, NMS, ...) run in fp32 when named in ``precision.force_fp32``. ONE predicate,
  ``should_force_fp32(op_name, cfg)``, decides; the components built with it (matcher, losses,
  post-processors) cast their inputs to fp32 or pass ``dtype=torch.float32`` where it says so.
- ``LossScaler``: fp16 needs loss scaling (its smallest normal is 6e-5, small gradients
  underflow); it wraps ``torch.amp.GradScaler``. bf16 and fp32 have fp32's exponent range
  and need none, but every mode checks the gradients for inf/nan and skips such a step
  (seed 002: "If scaling causes overflow, the update is skipped"), counting it.
"""

from __future__ import annotations

import math
import typing
from collections.abc import Iterable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import Tensor

from onestage.config import PrecisionConfig
from onestage.engine.calibrate import static_amp_guess


def _known_ops() -> tuple[str, ...]:
    # The names come from the config's own Literal, so the schema and this module cannot drift.
    (literal,) = typing.get_args(PrecisionConfig.model_fields["force_fp32"].annotation)
    return typing.get_args(literal)


FP32_OPS: tuple[str, ...] = _known_ops()  # ("iou", "loss_reduction", "nms", "decode", "softmax")


def should_force_fp32(op_name: str, precision_config: PrecisionConfig | None) -> bool:
    """THE predicate: True when AMP is on and ``op_name`` is listed in ``force_fp32``.

    ``None`` (a component built without a config, e.g. in a test) means no AMP: False.
    An unresolved ``amp: auto`` (a component built before ``calibrate.resolve_precision``
    chose) may still run under autocast, so the listed operations are forced: in fp32 that
    costs nothing (the cast is the identity, autocast is already off).
    An unknown ``op_name`` is a programming error and raises, listing the known names.
    """
    if op_name not in FP32_OPS:
        raise ValueError(f"should_force_fp32: unknown operation {op_name!r}; known: {', '.join(FP32_OPS)}")
    if precision_config is None:
        return False
    return precision_config.amp is not False and op_name in precision_config.force_fp32


def resolve_dtype(cfg: PrecisionConfig, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None when AMP is off. ``dtype: auto``: bf16 on the CPU and on a GPU
    that supports it (as ``calibrate.amp_dtype``), fp16 elsewhere.

    A run resolves ``amp: auto`` first (``calibrate.resolve_precision``, by measurement); an
    unresolved ``auto`` reaching here takes the unmeasured guess ``static_amp_guess``.
    """
    if cfg.amp == "auto":
        if not static_amp_guess(device):
            return None
    elif not cfg.amp:
        return None
    if cfg.dtype == "float16":
        return torch.float16
    if cfg.dtype == "bfloat16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16  # fp32's exponent range: no loss scaling needed
    return torch.bfloat16 if device.type == "cpu" else torch.float16


def autocast_context(cfg: PrecisionConfig, device: torch.device) -> AbstractContextManager[Any]:
    """``torch.autocast`` for the forward pass and loss, or a no-op context when AMP is off."""
    dtype = resolve_dtype(cfg, device)
    if dtype is None:
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def grads_are_finite(parameters: Iterable[Tensor]) -> bool:
    """True when no gradient holds inf or nan: one fused max-abs norm per tensor, one sync.

    The inf-norm (max |g|) is finite exactly when every element is; the 2-norm could
    overflow to inf for large but finite gradients (|g| > 1e19 in fp32).
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return True
    norms = torch._foreach_norm(grads, math.inf)
    return bool(torch.stack([n.float() for n in norms]).isfinite().all())


def _optimizer_params(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


class LossScaler:
    """Loss scaling for fp16 (``torch.amp.GradScaler``) and a non-finite step guard for all dtypes.

    Per training step::

        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)          # before gradient clipping
        clip_grad(params, max_norm)
        applied = scaler.step(optimizer)    # False: non-finite grads, step skipped and counted
        scaler.update()

    ``precision.loss_scale``: "dynamic" (start 2**16, halve on overflow, double after 2000
    clean steps: GradScaler's defaults) or a fixed number. A fixed scale never changes (it is
    written back after every update; GradScaler refuses growth/backoff factors of 1), but an
    overflowing step is still skipped.
    """

    def __init__(self, cfg: PrecisionConfig, device: torch.device) -> None:
        self.dtype = resolve_dtype(cfg, device)
        self.fixed_scale: float | None = None if cfg.loss_scale == "dynamic" else float(cfg.loss_scale)
        if self.fixed_scale is not None and not (self.fixed_scale > 0 and math.isfinite(self.fixed_scale)):
            raise ValueError(f"precision.loss_scale must be 'dynamic' or a finite number > 0, got {cfg.loss_scale}")
        self.skipped_steps = 0
        self._unscaled: set[int] = set()  # ids of optimizers already unscaled this step
        self._grad_scaler: torch.amp.GradScaler | None = None
        if self.dtype == torch.float16:
            if self.fixed_scale is None:
                self._grad_scaler = torch.amp.GradScaler(device.type)
            else:
                self._grad_scaler = torch.amp.GradScaler(device.type, init_scale=self.fixed_scale)

    @property
    def scale_value(self) -> float:
        """The current loss scale (1.0 when not scaling)."""
        if self._grad_scaler is None:
            return 1.0
        return float(self._grad_scaler.get_scale())

    def scale(self, loss: Tensor) -> Tensor:
        return loss if self._grad_scaler is None else self._grad_scaler.scale(loss)

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide the gradients by the scale, in place (once per step; later calls are no-ops)."""
        if self._grad_scaler is not None and id(optimizer) not in self._unscaled:
            self._grad_scaler.unscale_(optimizer)
        self._unscaled.add(id(optimizer))

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """``optimizer.step()`` unless a gradient is inf/nan; returns whether the step was applied."""
        self.unscale_(optimizer)
        finite = grads_are_finite(_optimizer_params(optimizer))
        if self._grad_scaler is not None:
            # GradScaler found the same inf/nan while unscaling and skips the step itself;
            # calling it keeps its bookkeeping for update() consistent.
            self._grad_scaler.step(optimizer)
        elif finite:
            optimizer.step()
        if not finite:
            self.skipped_steps += 1
        return finite

    def update(self) -> None:
        """Adjust the dynamic scale after the step (a fixed scale is written back unchanged)."""
        if self._grad_scaler is not None:
            if self.fixed_scale is None:
                self._grad_scaler.update()
            else:
                self._grad_scaler.update(new_scale=self.fixed_scale)
        self._unscaled.clear()

    def state_dict(self) -> dict[str, Any]:
        grad_scaler = {} if self._grad_scaler is None else self._grad_scaler.state_dict()
        return {"skipped_steps": self.skipped_steps, "grad_scaler": grad_scaler}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped_steps = int(state["skipped_steps"])
        if self._grad_scaler is not None and state["grad_scaler"]:
            self._grad_scaler.load_state_dict(state["grad_scaler"])
