"""YOLOv3 target assignment: which (scale, anchor, cell) is responsible for which object.

DESIGN.md section 3 and Darknet's ``forward_yolo_layer`` (``src/yolo_layer.c``), on a whole
padded batch at once (a Python loop over the scales only).

Positives. An object is responsible at the cell holding its centre, with the anchor whose
width/height IoU with it is highest (both centred at the origin, ``boxes.wh_iou``):
- ``mode="global"`` (paper section 2.1, Darknet): the best of ALL anchors of all scales; the
  object is positive only at the scale that owns that anchor (one positive in all).
- ``mode="per_scale"`` (many PyTorch ports): the best anchor of EVERY scale (one positive
  per scale).
Ties go to the first anchor (``argmax`` returns the first maximum; Darknet keeps the first
with ``iou > best_iou``).

Cell. ``gx = c_x * W``, column ``gi = floor(gx)`` clamped to [0, W - 1] (rows alike): an
object whose centre lies exactly on a cell border belongs to the cell to its right (below);
a centre at the right (bottom) image edge stays in the last cell. To CHOOSE the cell only,
``gx`` (fp64) is snapped to 1/65536 of a cell before the floor, so that a centre on a border
in pixels (200 px at stride 8) is on the border whatever the rounding of the normalized
coordinate (the fp32 centre of a 140..260 px box at 416, times 52, is 24.9999993).

Targets (``onestage.coders``, the exact inverse of ``yolov3_decode_boxes``): ``tx = gx - gi`` from the
UNSNAPPED ``gx`` (Darknet's ``truth.x * lw - i``; the snap would add up to 7.6e-6 of error),
clamped at 0 for a centre that the snap moved onto the next cell's border; ``ty`` alike (in
[0, 1); 1.0 only for a centre on the right/bottom image edge), ``tw = log(w / anchor_w)``,
``th = log(h / anchor_h)``.

Two objects in the same (cell, anchor): the LATER one in the label list wins (box, class,
index), as Darknet's ``delta_yolo_box`` overwrites the deltas of the earlier object.
Darknet's ``delta_yolo_class`` however leaves the earlier object's class delta in place, so
its class target at that slot is multi-hot (both classes 1). ``tcls`` holds the winner's
class; ``cls_slots`` lists every positive (slot, class) pair, collisions included, from which
the loss builds Darknet's multi-hot target (``class_collisions="union"``).

Ignore (negatives that get no objectness loss; positives always keep theirs):
- ``ignore_by="prediction"`` (Darknet): a (cell, anchor) whose decoded prediction overlaps
  ANY object of its image with IoU > ``ignore_thres`` (``pred_boxes``, detached).
- ``ignore_by="anchor"`` (eriklindernoren/PyTorch-YOLOv3): at every scale, in the cell
  holding an object's centre, every anchor of that scale whose width/height IoU with the
  object is > ``ignore_thres`` (i.e. the anchor box placed at the object's centre), whatever
  the mode and whether or not the object is positive at that scale.
``noobj_mask = not obj_mask and not ignored``.

Objects: ``gt_labels >= 0`` and a box of positive width and height (a degenerate box has
no defined ``log(w / anchor_w)``); anything else is padding. An image without objects has
only negatives.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from onestage.boxes import box_iou, wh_iou, xyxy_to_cxcywh
from onestage.coders import yolov3_encode_centre, yolov3_encode_wh

AssignMode = Literal["global", "per_scale"]
IgnoreBy = Literal["prediction", "anchor"]


@dataclass
class YoloTargets:
    """One scale's targets; every tensor is (B, A, H, W) unless noted. Values where
    ``obj_mask`` is False: 0 for the regression targets, -1 for ``tcls`` and ``gt_index``."""

    obj_mask: Tensor  # bool, responsible (cell, anchor)
    noobj_mask: Tensor  # bool, negatives that get objectness loss (not positive, not ignored)
    tx: Tensor  # float32, fractional cell offset of the centre, in [0, 1)
    ty: Tensor  # float32
    tw: Tensor  # float32, log(w / anchor_w)
    th: Tensor  # float32, log(h / anchor_h)
    tcls: Tensor  # int64 class in [0, C), -1 where no object
    tbox: Tensor  # (B, A, H, W, 4) float32 xyxy normalized, the matched object's box
    gt_index: Tensor  # int64 index into the M axis of gt_boxes, -1 where no object
    # (K, 2) int64: (flat slot in B*A*H*W, class) of EVERY positive object of this scale,
    # the earlier objects of a collision included (Darknet's multi-hot class target)
    cls_slots: Tensor

    @property
    def ignore_mask(self) -> Tensor:
        """(B, A, H, W) bool: negatives without objectness loss."""
        return ~self.obj_mask & ~self.noobj_mask


def assignable(cxcywh: Tensor, gt_labels: Tensor) -> Tensor:
    """(B, M) bool: the objects YOLOv3 can assign: a label (not padding) and a box of positive
    width and height (a degenerate box has no defined ``log(w / anchor_w)``). cxcywh: (B, M, 4)."""
    return (gt_labels >= 0) & (cxcywh[..., 2] > 0) & (cxcywh[..., 3] > 0)


@torch.no_grad()
def assign_yolov3(
    gt_boxes: Tensor,
    gt_labels: Tensor,
    anchors: Sequence[Tensor],
    grid_sizes: Sequence[tuple[int, int]],
    *,
    mode: AssignMode = "global",
    ignore_by: IgnoreBy = "prediction",
    ignore_thres: float = 0.5,
    pred_boxes: Sequence[Tensor] | None = None,
) -> list[YoloTargets]:
    """Assign every (scale, anchor, cell) of every image (see the module docstring).

    gt_boxes: (B, M, 4) xyxy normalized, padded; gt_labels: (B, M) int64, -1 on padding.
    anchors: [(A_s, 2)] w, h normalized by the input size, one group per scale, in the order
        of the raw outputs (coarsest first); grid_sizes: [(H_s, W_s)] in the same order.
    pred_boxes: [(B, A_s, H_s, W_s, 4)] decoded predictions, xyxy normalized (required for
        ``ignore_by="prediction"``; detached here in any case).
    Returns one ``YoloTargets`` per scale.
    """
    if mode not in ("global", "per_scale"):
        raise ValueError(f"mode must be 'global' or 'per_scale', got {mode!r}")
    if ignore_by not in ("prediction", "anchor"):
        raise ValueError(f"ignore_by must be 'prediction' or 'anchor', got {ignore_by!r}")
    if len(anchors) != len(grid_sizes):
        raise ValueError(f"got {len(anchors)} anchor groups but {len(grid_sizes)} grid sizes")
    if ignore_by == "prediction":
        if pred_boxes is None:
            raise ValueError("ignore_by='prediction' needs pred_boxes (the decoded predictions of every scale)")
        if len(pred_boxes) != len(anchors):
            raise ValueError(f"got {len(pred_boxes)} pred_boxes scales but {len(anchors)} anchor groups")

    device = gt_boxes.device
    batch, num_gt = gt_labels.shape
    boxes = gt_boxes.to(device=device, dtype=torch.float32).reshape(batch, num_gt, 4)  # (B, M, 4)
    cxcywh = xyxy_to_cxcywh(boxes)  # (B, M, 4)
    valid = assignable(cxcywh, gt_labels)  # (B, M)

    groups = [a.to(device=device, dtype=torch.float32).reshape(-1, 2) for a in anchors]
    sizes = [g.shape[0] for g in groups]
    all_anchors = torch.cat(groups)  # (T, 2), T = sum A_s
    shape_iou = wh_iou(cxcywh[..., 2:].reshape(-1, 2), all_anchors)  # (B*M, T)
    shape_iou = shape_iou.view(batch, num_gt, all_anchors.shape[0])  # (B, M, T)
    scale_of = torch.repeat_interleave(torch.arange(len(sizes), device=device), torch.tensor(sizes, device=device))
    local_of = torch.cat([torch.arange(n, device=device) for n in sizes])  # (T,) anchor index within its scale
    best_global = shape_iou.argmax(dim=-1) if num_gt > 0 else torch.zeros_like(gt_labels)  # (B, M)

    targets: list[YoloTargets] = []
    start = 0
    for s, (h, w) in enumerate(grid_sizes):
        num_a = sizes[s]
        scale_iou = shape_iou[..., start : start + num_a]  # (B, M, A_s)
        start += num_a
        if mode == "global":
            positive = valid & (scale_of[best_global] == s)  # (B, M)
            anchor_idx = local_of[best_global]  # (B, M)
        else:
            positive = valid
            anchor_idx = scale_iou.argmax(dim=-1) if num_gt > 0 else torch.zeros_like(gt_labels)
        cells = _cells(cxcywh, int(h), int(w))
        ignore = _ignored(
            ignore_by,
            ignore_thres,
            boxes,
            valid,
            scale_iou,
            cells,
            None if pred_boxes is None else pred_boxes[s],
            (batch, num_a, int(h), int(w)),
        )
        targets.append(_scatter(boxes, cxcywh, gt_labels, positive, anchor_idx, groups[s], cells, ignore))
    return targets


@dataclass
class _Cells:
    gi: Tensor  # (B, M) int64 column
    gj: Tensor  # (B, M) int64 row
    tx: Tensor  # (B, M) float32
    ty: Tensor  # (B, M) float32


def _cells(cxcywh: Tensor, h: int, w: int) -> _Cells:
    """Each object's cell and fractional offset on an (h, w) grid (module docstring, "Cell")."""
    gi, gj, tx, ty = yolov3_encode_centre(cxcywh[..., 0], cxcywh[..., 1], h, w)  # (B, M) each
    return _Cells(gi=gi, gj=gj, tx=tx, ty=ty)


def _ignored(
    ignore_by: IgnoreBy,
    ignore_thres: float,
    boxes: Tensor,
    valid: Tensor,
    scale_iou: Tensor,
    cells: _Cells,
    pred: Tensor | None,
    shape: tuple[int, int, int, int],
) -> Tensor:
    """(B, A, H, W) bool: slots overlapping some object by IoU > ignore_thres (module docstring)."""
    batch, num_a, h, w = shape
    if ignore_by == "prediction":
        assert pred is not None  # checked by the caller
        pred_flat = pred.detach().float().reshape(batch, -1, 4)  # (B, A*H*W, 4)
        if boxes.shape[1] == 0:
            return torch.zeros(shape, dtype=torch.bool, device=boxes.device)
        iou = box_iou(pred_flat, boxes)  # (B, A*H*W, M), fp32
        iou = iou.masked_fill(~valid[:, None, :], 0.0)
        return (iou.amax(dim=-1) > ignore_thres).view(shape)
    ignore = torch.zeros(shape, dtype=torch.bool, device=boxes.device)
    b, m, a = torch.nonzero(valid[..., None] & (scale_iou > ignore_thres), as_tuple=True)
    ignore[b, a, cells.gj[b, m], cells.gi[b, m]] = True
    return ignore


def _scatter(
    boxes: Tensor,
    cxcywh: Tensor,
    labels: Tensor,
    positive: Tensor,
    anchor_idx: Tensor,
    anchors: Tensor,
    cells: _Cells,
    ignore: Tensor,
) -> YoloTargets:
    """Write each positive object into its (anchor, row, column) slot; the later object wins."""
    batch, num_a, h, w = ignore.shape
    num_gt = labels.shape[1]
    device = boxes.device
    # Flat slot of each object; scatter_reduce "amax" of the object index keeps the LAST
    # object of each slot (Darknet overwrites), deterministically on every device.
    b_idx = torch.arange(batch, device=device)[:, None].expand(batch, num_gt)
    slot = ((b_idx * num_a + anchor_idx) * h + cells.gj) * w + cells.gi  # (B, M)
    local_gt = torch.arange(num_gt, device=device)[None, :].expand(batch, num_gt)
    winner = torch.full((batch * num_a * h * w,), -1, dtype=torch.int64, device=device)
    winner.scatter_reduce_(0, slot[positive], local_gt[positive], reduce="amax")
    gt_index = winner.view(batch, num_a, h, w)  # (B, A, H, W), -1 where no object
    obj = gt_index >= 0

    # Per-object values, gathered into the slots through gt_index.
    anchor_wh = anchors[anchor_idx]  # (B, M, 2)
    log_wh = yolov3_encode_wh(cxcywh[..., 2:], anchor_wh)  # (B, M, 2); padding is masked below
    per_obj = torch.cat((cells.tx[..., None], cells.ty[..., None], log_wh, boxes), dim=-1)
    # (B, M, 8): tx, ty, tw, th, x1, y1, x2, y2
    flat_index = gt_index.clamp(min=0).view(batch, -1)  # (B, A*H*W)
    if num_gt == 0:
        gathered = torch.zeros(batch, num_a * h * w, per_obj.shape[-1], device=device)
        tcls = torch.full_like(gt_index, -1)
    else:
        gathered = per_obj.gather(1, flat_index[..., None].expand(-1, -1, per_obj.shape[-1]))  # (B, A*H*W, 8)
        tcls = torch.where(obj, labels.long().gather(1, flat_index).view(batch, num_a, h, w), -1)
    gathered = torch.where(obj.view(batch, -1, 1), gathered, 0.0).view(batch, num_a, h, w, -1)
    return YoloTargets(
        obj_mask=obj,
        noobj_mask=~obj & ~ignore,
        tx=gathered[..., 0],
        ty=gathered[..., 1],
        tw=gathered[..., 2],
        th=gathered[..., 3],
        tcls=tcls,
        tbox=gathered[..., 4:8],
        gt_index=gt_index,
        cls_slots=torch.stack((slot[positive], labels.long()[positive]), dim=-1).reshape(-1, 2),
    )
