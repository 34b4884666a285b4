"""Loss functions shared by the detectors."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

Reduction = Literal["sum", "mean", "none"]


def smooth_l1(pred: Tensor, target: Tensor, beta: float = 1.0, reduction: Reduction = "sum") -> Tensor:
    """Smooth L1 summed over the 4 box coordinates (seed 002, ``smooth_l1_loss``).

    pred, target: (..., 4). Per element: 0.5 d^2 / beta if |d| < beta else |d| - 0.5 beta.
    ``none`` returns (...) per-box values (used for mining and per-image normalization),
    ``sum`` and ``mean`` reduce those per-box values.
    """
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    diff = (pred - target).abs()
    per_elem = torch.where(diff < beta, 0.5 * diff * diff / beta, diff - 0.5 * beta)
    per_box = per_elem.sum(dim=-1)
    if reduction == "sum":
        return per_box.sum()
    if reduction == "mean":
        return per_box.mean()
    if reduction == "none":
        return per_box
    raise ValueError(f"reduction must be 'sum', 'mean' or 'none', got {reduction!r}")
