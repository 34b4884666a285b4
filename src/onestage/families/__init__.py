"""Detector families: the one interface every family answers (DESIGN.md section 2).

SSD (and SSDLite), YOLOv3 and YOLOv1 each provide a ``Family`` object, built from plain
objects by ``onestage.build`` (the one place that reads a config):

- ``layout()``: the output maps as ``onestage inspect`` prints them (``LayoutRow``);
- ``candidate_boxes()``: (N, 4) xyxy normalized, what each candidate (SSD prior, YOLOv3
  anchor slot, YOLOv1 predictor) stands for before any prediction: its prior, its anchor
  placed at its cell's centre, or its cell. N and the order are those of ``decode`` and ``assign``;
- ``assign(gt_boxes, gt_labels, outputs=None) -> Assignment``: which candidate is responsible
  for which object, callable alone on a padded batch, without a loss or a model (``outputs``
  adds what only predictions decide: YOLOv3's ignore-by-prediction, YOLOv1's responsible
  predictor, SSD's hard negatives);
- ``decode(outputs) -> (boxes (B, N, 4) xyxy normalized, scores (B, N, C))``: candidates and
  their per-class scores, which the shared tail ``onestage.postprocess.select_detections`` ends with.

Adding a family: docs/adding-a-family.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

import torch
from torch import Tensor, nn

from onestage.assign.ssd import BACKGROUND, IGNORE
from onestage.postprocess import Detections

__all__ = ["BACKGROUND", "IGNORE", "Assignment", "Detector", "Family", "LayoutRow", "positives_per_object"]


@dataclass(frozen=True)
class LayoutRow:
    """One output map as ``onestage inspect`` shows it."""

    name: str
    grid: tuple[int, int]  # (H, W) cells
    anchors_per_cell: int
    values_per_anchor: int  # values each box owns (SSD: 4 + C + 1; YOLOv3: 4 + 1 + C; YOLOv1: 5)
    shared_per_cell: int = 0  # values the boxes of a cell share (YOLOv1: C class scores)

    @property
    def channels(self) -> int:
        """Output channels per cell."""
        return self.anchors_per_cell * self.values_per_anchor + self.shared_per_cell

    @property
    def candidates(self) -> int:
        return self.grid[0] * self.grid[1] * self.anchors_per_cell


@dataclass
class Assignment:
    """What a family's assignment decided for a padded batch of B images with M object slots.

    roles: (B, N) int64 per candidate: the index in [0, M) of the object it is responsible
        for, ``BACKGROUND`` (-1) or ``IGNORE`` (-2: no loss at all, or no objectness loss).
    valid: (B, M) bool, the slots that hold an object the family can assign (not padding).
    extras: family specifics, each documented by its family (e.g. YOLOv3 ``lost``, YOLOv1
        ``responsible``, SSD ``hard_negative``).
    """

    roles: Tensor
    valid: Tensor
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def positives(self) -> Tensor:
        """(B, M) int64: how many candidates each object owns."""
        return positives_per_object(self.roles, self.valid.shape[1])


def positives_per_object(roles: Tensor, num_gt: int) -> Tensor:
    """(B, N) roles -> (B, M) number of candidates responsible for each object (one scatter, no loop)."""
    counts = torch.zeros(roles.shape[0], num_gt + 1, dtype=torch.int64, device=roles.device)
    index = torch.where(roles >= 0, roles, num_gt)  # non-positives counted in a spare column
    counts.scatter_add_(1, index, torch.ones_like(index))
    return counts[:, :num_gt]


class Family(Protocol):
    """The questions every detector family answers (module docstring)."""

    name: str  # "ssd", "yolov3", "yolov1"
    scoring: str  # how classes are scored, in words
    background_is_a_class: bool  # SSD: softmax over C+1; YOLO: objectness + C

    def layout(self) -> list[LayoutRow]: ...

    def candidate_boxes(self) -> Tensor: ...

    def assign(self, gt_boxes: Tensor, gt_labels: Tensor, outputs: Any = None) -> Assignment: ...

    def decode(self, outputs: Any) -> tuple[Tensor, Tensor]: ...


@dataclass
class Detector:
    """Model, criterion and post-processor: separate objects (DESIGN.md section 2), and the
    family object that says what their tensors mean."""

    model: nn.Module
    criterion: nn.Module
    postprocess: Callable[[Any], list[Detections]]
    layout: list[LayoutRow]
    class_names: list[str]
    scoring: str  # "softmax over C+1 (background is a class)" or "sigmoid objectness + C classes"
    priors: Tensor | None = None  # (P, 4) cxcywh normalized, SSD only
    family: Family | None = None
