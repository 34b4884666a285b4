"""YOLOv1 targets: which grid cell is responsible for which object (DESIGN.md section 3).

Redmon et al., "You Only Look Once" (CVPR 2016), section 2: "If the center of an object
falls into a grid cell, that grid cell is responsible for detecting that object."

Rules, on a whole padded batch at once (no loop over images, objects or cells):
1. An object's cell is the one holding its centre: column j = floor(cx * S), row
   i = floor(cy * S), clamped to [0, S - 1] (a centre exactly on the right or bottom edge,
   cx = 1, belongs to the last cell, with offset 1).
2. Two or more objects in one cell: a cell holds one box target and one class, so one object
   must win. The **largest** (by area) wins; equal areas go to the **first** in the list (lowest
   index). Largest, because it is the object the cell's coarse features see best and the
   one whose loss matters most for recall at IoU 0.5; the index rule makes it deterministic.
3. Which of the cell's B predictors is responsible is decided in the loss, from the
   predicted boxes (``onestage.losses.yolov1.responsible_predictors``), not here.

Box target per cell, the "cell" encoding (``yolov1_cell_encode``; the inverse is
``onestage.coders.yolov1_cell_decode``): (x, y) = offset of the centre inside the
cell, in [0, 1) (1 only on the last cell's far edge); (w, h) = size as fractions of the image.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from onestage.coders import yolov1_cell_encode

NO_OBJECT = -1


@dataclass
class YoloV1Targets:
    """Per-cell YOLOv1 targets for a batch of N images on an S x S grid."""

    gt_index: Tensor  # (N, S, S) int64: index in [0, M) of the cell's object, NO_OBJECT if empty
    labels: Tensor  # (N, S, S) int64: class in [0, C), NO_OBJECT if empty
    cell_boxes: Tensor  # (N, S, S, 4) (x, y, w, h): cell offsets + image fractions; 0 if empty
    boxes_xyxy: Tensor  # (N, S, S, 4) xyxy normalized ground truth; 0 if empty
    class_one_hot: Tensor  # (N, S, S, C) float: one-hot of the class; all 0 if empty

    @property
    def obj(self) -> Tensor:
        """(N, S, S) bool: 1_i^obj of the paper, the cell holds an object."""
        return self.gt_index >= 0


@torch.no_grad()
def build_yolov1_targets(gt_boxes: Tensor, gt_labels: Tensor, S: int, num_classes: int) -> YoloV1Targets:
    """Assign every object of a padded batch to its cell (rules in the module docstring).

    gt_boxes: (N, M, 4) xyxy normalized, padded; gt_labels: (N, M) int64 in [0, C), -1 on
    padding. Returns ``YoloV1Targets`` on gt_boxes' device.
    """
    n, m = gt_labels.shape
    device = gt_boxes.device
    valid = gt_labels >= 0  # (N, M)
    if bool((gt_labels >= num_classes).any()):
        raise ValueError(f"gt_labels must be in [0, {num_classes}) or -1 (padding); got max {int(gt_labels.max())}")
    if m == 0:
        empty = torch.full((n, S, S), NO_OBJECT, dtype=torch.int64, device=device)
        zeros = torch.zeros(n, S, S, 4, device=device)
        return YoloV1Targets(empty, empty.clone(), zeros, zeros.clone(), torch.zeros(n, S, S, num_classes, device=device))

    row, col, encoded = yolov1_cell_encode(gt_boxes, S)  # (N, M), (N, M), (N, M, 4)
    cell = row * S + col  # (N, M) flat cell index, row-major
    area = encoded[..., 2] * encoded[..., 3]  # (N, M), >= 0
    member = (cell[..., None] == torch.arange(S * S, device=device)) & valid[..., None]  # (N, M, S*S)
    # Rule 2: the largest object of each cell; max() returns the first of equal maxima.
    key = torch.where(member, area[..., None], torch.full_like(area[..., None], -1.0))
    best_key, best = key.max(dim=1)  # (N, S*S)
    obj = best_key >= 0
    gt_index = torch.where(obj, best, NO_OBJECT)  # (N, S*S)

    safe = best.clamp(min=0)
    labels = torch.where(obj, gt_labels.gather(1, safe), NO_OBJECT)  # (N, S*S)
    keep = obj[..., None]
    cell_boxes = torch.where(keep, encoded.gather(1, safe[..., None].expand(-1, -1, 4)), 0.0)
    boxes_xyxy = torch.where(keep, gt_boxes.float().gather(1, safe[..., None].expand(-1, -1, 4)), 0.0)
    class_one_hot = F.one_hot(labels.clamp(min=0), num_classes).float() * keep
    return YoloV1Targets(
        gt_index=gt_index.view(n, S, S),
        labels=labels.view(n, S, S),
        cell_boxes=cell_boxes.view(n, S, S, 4),
        boxes_xyxy=boxes_xyxy.view(n, S, S, 4),
        class_one_hot=class_one_hot.view(n, S, S, num_classes),
    )
