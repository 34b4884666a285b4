"""Pure box math. Every function is named by the formats it reads and writes.

Formats:
- ``xyxy``: (x1, y1, x2, y2), corners.
- ``cxcywh``: (cx, cy, w, h), center and size.
Coordinates may be absolute pixels or normalized to [0, 1]; the functions do not care,
the caller's contract says which. Boxes live in the last dimension: (..., 4).
"""

from __future__ import annotations

import torch
from torch import Tensor


def cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    """(..., 4) cxcywh -> (..., 4) xyxy."""
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), dim=-1)


def xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    """(..., 4) xyxy -> (..., 4) cxcywh."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack(((x1 + x2) * 0.5, (y1 + y2) * 0.5, x2 - x1, y2 - y1), dim=-1)


def box_area(boxes: Tensor) -> Tensor:
    """(..., 4) xyxy -> (...) area; inverted boxes have area 0."""
    return (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)


def box_iou(boxes1: Tensor, boxes2: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """IoU matrix, computed in ``dtype`` (fp32 unless a caller asks otherwise).

    boxes1: (..., N, 4) xyxy, boxes2: (..., M, 4) xyxy (same leading batch dims, or none on
    one side so that it broadcasts). Returns (..., N, M) in ``dtype``. A pair with zero
    union (two empty boxes) has IoU 0, never NaN.

    fp32 by default: in bf16 the IoU of two boxes 1 px apart on a 300 px image rounds to
    the same value as their neighbours', which would make matching depend on precision.
    Callers pass a lower precision only when ``should_force_fp32("iou", ...)`` says no.
    """
    b1 = boxes1.to(dtype)
    b2 = boxes2.to(dtype)
    area1 = box_area(b1)  # (..., N)
    area2 = box_area(b2)  # (..., M)
    lt = torch.maximum(b1[..., :, None, :2], b2[..., None, :, :2])  # (..., N, M, 2)
    rb = torch.minimum(b1[..., :, None, 2:], b2[..., None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1[..., :, None] + area2[..., None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=torch.finfo(dtype).tiny), torch.zeros_like(inter))


def paired_giou(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-7) -> Tensor:
    """Generalized IoU (Rezatofighi et al. 2019) of boxes paired elementwise, in fp32.

    boxes1, boxes2: (..., 4) xyxy -> (...) in [-1, 1]: IoU - (C - U) / C, C the area of the
    smallest box enclosing both. Unlike IoU it keeps a gradient when the boxes do not
    overlap. ``eps`` (a floor on the union and the hull) keeps two empty boxes at 0.
    """
    b1, b2 = boxes1.float(), boxes2.float()
    inter_wh = (torch.minimum(b1[..., 2:], b2[..., 2:]) - torch.maximum(b1[..., :2], b2[..., :2])).clamp(min=0)
    inter = inter_wh[..., 0] * inter_wh[..., 1]
    union = box_area(b1) + box_area(b2) - inter
    hull_wh = (torch.maximum(b1[..., 2:], b2[..., 2:]) - torch.minimum(b1[..., :2], b2[..., :2])).clamp(min=0)
    hull = hull_wh[..., 0] * hull_wh[..., 1]
    return inter / union.clamp(min=eps) - (hull - union) / hull.clamp(min=eps)


def wh_iou(wh1: Tensor, wh2: Tensor) -> Tensor:
    """IoU of boxes given only by width and height, both centered at the origin (YOLO anchors).

    wh1: (N, 2), wh2: (M, 2) -> (N, M) fp32.
    """
    a = wh1.float()
    b = wh2.float()
    inter = torch.minimum(a[:, None, 0], b[None, :, 0]) * torch.minimum(a[:, None, 1], b[None, :, 1])
    union = a[:, None, 0] * a[:, None, 1] + b[None, :, 0] * b[None, :, 1] - inter
    return torch.where(union > 0, inter / union.clamp(min=torch.finfo(torch.float32).tiny), torch.zeros_like(inter))


def clip_xyxy(boxes: Tensor, width: float = 1.0, height: float = 1.0) -> Tensor:
    """Clip (..., 4) xyxy boxes to [0, width] x [0, height]."""
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack(
        (x1.clamp(0, width), y1.clamp(0, height), x2.clamp(0, width), y2.clamp(0, height)), dim=-1
    )
