"""Encode/decode pairs: what each family's network regresses, relative to its priors, anchors or cells.

The one home of every box parameterisation (DESIGN.md section 3). Each encoder has its exact
inverse here, with a round-trip test:

- SSD (variances): ``ssd_encode`` / ``ssd_decode``, offsets of a box from its prior.
- YOLOv3 (grid + anchor): ``yolov3_encode_centre`` + ``yolov3_encode_wh`` / ``yolov3_decode_boxes``.
- YOLOv1 (cell): ``yolov1_cell_encode`` / ``yolov1_cell_decode``, and ``yolov1_activate``,
  the one place that says what each raw YOLOv1 value means (read by the loss and the decoder).

Boxes are normalized to [0, 1] of the network input throughout.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from onestage.boxes import cxcywh_to_xyxy, xyxy_to_cxcywh

# exp() of a large regression output overflows fp32 (exp(89) = inf); clamping t_w, t_h at
# log(1000/16) as torchvision's BoxCoder does keeps a wild early prediction finite: a box
# at most 62.5 times its prior or anchor, far beyond any real object.
MAX_LOG_SCALE = math.log(1000.0 / 16)


# ----------------------------------------------------------------------------- SSD
def ssd_encode(boxes: Tensor, priors: Tensor, variances: tuple[float, float] = (0.1, 0.2)) -> Tensor:
    """SSD paper eq. 2 with the reference variances.

    boxes: (..., P, 4) xyxy normalized ground truth matched to each prior.
    priors: (P, 4) cxcywh normalized. Returns (..., P, 4) offsets (t_cx, t_cy, t_w, t_h):
    t_cx = (g_cx - p_cx) / (v0 p_w), t_w = log(g_w / p_w) / v1.
    """
    g = xyxy_to_cxcywh(boxes.float())
    p = priors.float()
    t_xy = (g[..., :2] - p[..., :2]) / (variances[0] * p[..., 2:])
    # A degenerate matched box (zero width) would give log(0) = -inf; such boxes are
    # dropped by the data layer, and the clamp keeps the loss finite if one slips through.
    t_wh = torch.log(g[..., 2:].clamp(min=1e-8) / p[..., 2:]) / variances[1]
    return torch.cat((t_xy, t_wh), dim=-1)


def ssd_decode(offsets: Tensor, priors: Tensor, variances: tuple[float, float] = (0.1, 0.2)) -> Tensor:
    """Exact inverse of :func:`ssd_encode`: (..., P, 4) offsets -> (..., P, 4) xyxy normalized, fp32."""
    t = offsets.float()
    p = priors.float()
    cxcy = p[..., :2] + t[..., :2] * variances[0] * p[..., 2:]
    wh = p[..., 2:] * torch.exp((t[..., 2:] * variances[1]).clamp(max=MAX_LOG_SCALE))
    return cxcywh_to_xyxy(torch.cat((cxcy, wh), dim=-1))


# ----------------------------------------------------------------------------- YOLOv3
# Grid coordinates are snapped to this fraction of a cell before the floor that chooses the
# cell (``yolov3_encode_centre``).
GRID_SNAP = 65536.0


def yolov3_encode_centre(cx: Tensor, cy: Tensor, h: int, w: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Box centres -> their cell on an (h, w) grid and the offsets inside it (t_x, t_y targets).

    cx, cy: (...) normalized centres. Returns gi (column), gj (row) int64 and tx, ty float32,
    ``gx = cx * w``, ``gi = floor(gx)`` clamped to [0, w - 1], ``tx = gx - gi`` (in [0, 1);
    1.0 only for a centre on the right image edge), rows alike.

    To CHOOSE the cell only, ``gx`` (fp64) is snapped to 1/65536 of a cell before the floor,
    so that a centre on a border in pixels (200 px at stride 8) is on the border whatever the
    rounding of the normalized coordinate (the fp32 centre of a 140..260 px box at 416, times
    52, is 24.9999993): such an object belongs to the cell to its right (below). ``tx`` comes
    from the UNSNAPPED ``gx`` (Darknet's ``truth.x * lw - i``; the snap would add up to 7.6e-6
    of error, issue 21), clamped at 0 for a centre the snap moved onto the next cell's border.
    """
    gx = cx.double() * w  # (...) exact grid position
    gy = cy.double() * h
    gi = (torch.round(gx * GRID_SNAP) / GRID_SNAP).floor().clamp(0, w - 1)
    gj = (torch.round(gy * GRID_SNAP) / GRID_SNAP).floor().clamp(0, h - 1)
    return gi.long(), gj.long(), (gx - gi).clamp(min=0.0).float(), (gy - gj).clamp(min=0.0).float()


def yolov3_encode_wh(wh: Tensor, anchor_wh: Tensor) -> Tensor:
    """(..., 2) box sizes and their anchors' (..., 2) sizes, both normalized -> (t_w, t_h) = log(wh / anchor)."""
    return torch.log(wh.clamp(min=1e-12) / anchor_wh)


def check_yolov3_outputs(outputs: Sequence[Tensor], anchors: Sequence[Tensor], num_classes: int | None = None) -> None:
    """Raise a clear error when raw outputs and anchors do not describe the same layout."""
    if len(outputs) != len(anchors):
        raise ValueError(f"got {len(outputs)} output scales but {len(anchors)} anchor groups (both coarsest first)")
    for s, (out, anc) in enumerate(zip(outputs, anchors)):
        if out.dim() != 5:
            raise ValueError(f"output {s}: expected (B, A, H, W, 5 + C), got shape {tuple(out.shape)}")
        if out.shape[1] != anc.shape[0]:
            raise ValueError(f"output {s} has {out.shape[1]} anchors but {anc.shape[0]} anchor sizes were given")
        if num_classes is not None and out.shape[-1] != 5 + num_classes:
            raise ValueError(f"output {s}: last dim {out.shape[-1]} != 5 + num_classes ({5 + num_classes})")


def yolov3_decode_boxes(raw: Tensor, anchors: Tensor) -> Tensor:
    """One scale's box offsets -> boxes (YOLOv3 paper section 2.1; Darknet ``get_yolo_box``).

    raw: (B, A, H, W, >= 4) raw outputs (t_x, t_y, t_w, t_h first); anchors: (A, 2) w, h
    normalized. Returns (B, A, H, W, 4) xyxy normalized, in fp32 whatever the input dtype:
    b_x = (sigmoid(t_x) + c_x) / W, b_w = anchor_w exp(t_w) (the inverse of the encoders above
    on the sigmoid's range).
    """
    _, _, h, w, _ = raw.shape
    t = raw[..., :4].float()
    device = raw.device
    c_y, c_x = torch.meshgrid(
        torch.arange(h, device=device, dtype=torch.float32),
        torch.arange(w, device=device, dtype=torch.float32),
        indexing="ij",
    )  # (H, W) each: cell row and column
    b_x = (torch.sigmoid(t[..., 0]) + c_x) / w  # (B, A, H, W)
    b_y = (torch.sigmoid(t[..., 1]) + c_y) / h
    anc = anchors.to(device=device, dtype=torch.float32).view(1, -1, 1, 1, 2)  # (1, A, 1, 1, 2)
    b_wh = anc * torch.exp(t[..., 2:4].clamp(max=MAX_LOG_SCALE))  # (B, A, H, W, 2)
    return cxcywh_to_xyxy(torch.cat((b_x[..., None], b_y[..., None], b_wh), dim=-1))


# ----------------------------------------------------------------------------- YOLOv1
# Redmon et al., "You Only Look Once" (CVPR 2016), section 2.
#
# Layout of the raw head output, (N, S, S, 5B + C) with N images, an S x S grid (dim 1 =
# row i, dim 2 = column j), B predictors per cell and C classes. Per cell:
#
#     [x, y, w, h, conf] of predictor 0, ..., [x, y, w, h, conf] of predictor B-1, p(1..C)
#
# What the values mean: ``yolov1_activate`` is the one place that says it, and both the loss
# (``onestage.losses.yolov1``) and the decoder (``onestage.postprocess.yolov1``) call it, so they cannot disagree. The
# model itself stays raw (the same tensor in train and eval mode).
# - x, y: sigmoid -> the box centre's offset inside its cell, in [0, 1] (section 2: "relative
#   to the bounds of the grid cell"). Centre = ((j + x) / S, (i + y) / S) of the image.
# - w, h: sigmoid -> sqrt(w), sqrt(h), width and height as fractions of the image. The paper's
#   loss regresses square roots (section 2.2: "small deviations in large boxes matter less than
#   in small boxes"); predicting the root directly gives w = sigmoid(t)^2 in [0, 1] and never
#   takes the square root of a (negative) prediction.
# - conf: sigmoid -> Pr(Object) * IoU(pred, truth), in [0, 1] (section 2).
# - classes: softmax over C -> Pr(Class_c | Object), one distribution per cell, shared by its B
#   predictors (section 2: "one set of class probabilities per grid cell").
# The paper's last layer is linear on all 5B + C values; these bounded activations keep every
# value in its range from the first step of training from scratch, and make the score
# ``conf * Pr(Class_c | Object)`` a product of probabilities. ``linear=True`` (the YOLOv1
# ``darknet`` preset) takes the raw values as they are, as Darknet's ``detection_layer.c``
# with ``softmax=0, sqrt=1`` (yolov1.cfg): x, y, sqrt(w), sqrt(h), conf and class scores
# unbounded (w = raw^2 is still >= 0).


@dataclass
class YOLOv1Prediction:
    """Activated YOLOv1 outputs (the comment above says what each value means)."""

    xy: Tensor  # (N, S, S, B, 2) centre offset inside the cell, [0, 1]
    sqrt_wh: Tensor  # (N, S, S, B, 2) sqrt of width/height as fractions of the image, [0, 1]
    conf: Tensor  # (N, S, S, B) confidence, [0, 1]
    class_probs: Tensor  # (N, S, S, C) Pr(Class | Object) per cell, sums to 1

    @property
    def cell_boxes(self) -> Tensor:
        """(N, S, S, B, 4) (x, y, w, h): cell offsets and sizes as fractions of the image."""
        return torch.cat((self.xy, self.sqrt_wh.square()), dim=-1)


def check_yolov1_outputs(outputs: Tensor, B: int, num_classes: int) -> int:
    """Validate an (N, S, S, 5B + C) output tensor and return S."""
    expected = 5 * B + num_classes
    if outputs.dim() != 4 or outputs.shape[1] != outputs.shape[2] or outputs.shape[3] != expected:
        raise ValueError(
            f"YOLOv1 outputs must be (N, S, S, 5B + C) = (N, S, S, {expected}) for B={B}, "
            f"C={num_classes}; got {tuple(outputs.shape)}"
        )
    return int(outputs.shape[1])


def yolov1_activate(outputs: Tensor, B: int, num_classes: int, linear: bool = False) -> YOLOv1Prediction:
    """(N, S, S, 5B + C) raw -> ``YOLOv1Prediction`` (sigmoid on x, y, sqrt w, sqrt h, conf; softmax
    on classes), or the raw values themselves with ``linear`` (Darknet; the comment above)."""
    check_yolov1_outputs(outputs, B, num_classes)
    n, s = outputs.shape[0], outputs.shape[1]
    boxes = outputs[..., : 5 * B].reshape(n, s, s, B, 5)  # (N, S, S, B, 5)
    activated = boxes if linear else boxes.sigmoid()
    classes = outputs[..., 5 * B :]
    return YOLOv1Prediction(
        xy=activated[..., 0:2],
        sqrt_wh=activated[..., 2:4],
        conf=activated[..., 4],
        class_probs=classes if linear else classes.softmax(dim=-1),
    )


def yolov1_cell_encode(boxes: Tensor, S: int) -> tuple[Tensor, Tensor, Tensor]:
    """Boxes -> their responsible cell and cell-relative encoding (YOLOv1 paper, section 2).

    boxes: (..., 4) xyxy normalized. Returns row (...) int64, col (...) int64 in [0, S), and
    (..., 4) (x, y, w, h): centre offset in the cell and size as fractions of the image.
    Centres are clamped into [0, 1] first, so a box slightly outside the image still gets a
    cell on the grid.
    """
    cxcywh = xyxy_to_cxcywh(boxes.float())
    centre = cxcywh[..., :2].clamp(0.0, 1.0) * S  # (..., 2) in grid units
    cell = centre.floor().clamp(max=S - 1)  # (..., 2) (col, row)
    offsets = centre - cell  # [0, 1), 1 only on the far edge
    wh = cxcywh[..., 2:].clamp(min=0.0)  # an inverted box counts as empty, never negative
    col, row = cell.long().unbind(-1)
    return row, col, torch.cat((offsets, wh), dim=-1)


def yolov1_cell_decode(cell_boxes: Tensor) -> Tensor:
    """Cell-relative boxes -> image boxes: (N, S, S, K, 4) (x, y, w, h) -> (N, S, S, K, 4) xyxy normalized.

    The inverse of :func:`yolov1_cell_encode`: the box in cell (row i, column j) has centre
    ((j + x) / S, (i + y) / S) and size (w, h) (fractions of the image). K is the number of
    boxes per cell (B predictors, or 1 for targets).
    """
    s = cell_boxes.shape[-3]
    grid = torch.arange(s, device=cell_boxes.device, dtype=cell_boxes.dtype)
    col = grid.view(s, 1)  # broadcasts over (..., S_cols, K)
    row = grid.view(s, 1, 1)  # broadcasts over (..., S_rows, S_cols, K)
    x, y, w, h = cell_boxes.unbind(-1)
    cx = (col + x) / s
    cy = (row + y) / s
    return torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), dim=-1)
