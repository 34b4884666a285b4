"""Loss functions shared by the detectors."""

from __future__ import annotations

from collections.abc import Mapping
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


def weighted_terms(raw: Mapping[str, Tensor], weights: Mapping[str, float]) -> dict[str, Tensor]:
    """What every criterion returns: each raw term times its weight, then "total", their sum.

    The weights are kept apart from the raw terms (DESIGN.md section 2): a criterion computes
    unweighted terms, and its ``weights`` dict (term name -> weight) says how they add up, so
    that the raw value of a term is ``terms[name] / weights[name]`` wherever it is logged.
    """
    if set(raw) != set(weights):
        raise ValueError(f"terms {sorted(raw)} and weights {sorted(weights)} must name the same terms")
    terms = {name: weights[name] * value for name, value in raw.items()}
    terms["total"] = sum(terms.values(), torch.zeros_like(next(iter(raw.values()))))
    return terms
