"""YOLOv1 raw outputs: what each value means, decoding to boxes, and post-processing.

Redmon et al., "You Only Look Once" (CVPR 2016), section 2; DESIGN.md section 3.

Layout of the raw head output, (N, S, S, 5B + C) with N images, an S x S grid (dim 1 =
row i, dim 2 = column j), B predictors per cell and C classes. Per cell:

    [x, y, w, h, conf] of predictor 0, ..., [x, y, w, h, conf] of predictor B-1, p(1..C)

What the values mean: ``yolov1_activate`` is the one place that says it, and both the loss
(``onestage.losses.yolov1``) and the decoder below call it, so they cannot disagree. The
model itself stays raw (the same tensor in train and eval mode).
- x, y: sigmoid -> the box centre's offset inside its cell, in [0, 1] (section 2: "relative
  to the bounds of the grid cell"). Centre = ((j + x) / S, (i + y) / S) of the image.
- w, h: sigmoid -> sqrt(w), sqrt(h), width and height as fractions of the image. The paper's
  loss regresses square roots (section 2.2: "small deviations in large boxes matter less than
  in small boxes"); predicting the root directly gives w = sigmoid(t)^2 in [0, 1] and never
  takes the square root of a (negative) prediction.
- conf: sigmoid -> Pr(Object) * IoU(pred, truth), in [0, 1] (section 2).
- classes: softmax over C -> Pr(Class_c | Object), one distribution per cell, shared by its B
  predictors (section 2: "one set of class probabilities per grid cell").
The paper's last layer is linear on all 5B + C values; these bounded activations keep every
value in its range from the first step of training from scratch, and make the score
``conf * Pr(Class_c | Object)`` a product of probabilities. ``linear=True`` (the YOLOv1
``darknet`` preset) takes the raw values as they are, as Darknet's ``detection_layer.c``
with ``softmax=0, sqrt=1`` (yolov1.cfg): x, y, sqrt(w), sqrt(h), conf and class scores
unbounded (w = raw^2 is still >= 0).

Candidate order of the decoded boxes (S*S*B of them, 98 at S = 7, B = 2): row-major over
cells (cell index i * S + j), the B predictors of a cell together: index (i * S + j) * B + b.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from onestage.boxes import clip_xyxy
from onestage.postprocess import Detections, nms_keep_mask


@dataclass
class YOLOv1Prediction:
    """Activated YOLOv1 outputs (see the module docstring for the meaning of each value)."""

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
    on classes), or the raw values themselves with ``linear`` (Darknet; module docstring)."""
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


def yolov1_cell_decode(cell_boxes: Tensor) -> Tensor:
    """Cell-relative boxes -> image boxes: (N, S, S, K, 4) (x, y, w, h) -> (N, S, S, K, 4) xyxy normalized.

    The inverse of ``onestage.assign.yolov1.yolov1_cell_encode``: the box in cell (row i,
    column j) has centre ((j + x) / S, (i + y) / S) and size (w, h) (fractions of the image).
    K is the number of boxes per cell (B predictors, or 1 for targets).
    """
    s = cell_boxes.shape[-3]
    grid = torch.arange(s, device=cell_boxes.device, dtype=cell_boxes.dtype)
    col = grid.view(s, 1)  # broadcasts over (..., S_cols, K)
    row = grid.view(s, 1, 1)  # broadcasts over (..., S_rows, S_cols, K)
    x, y, w, h = cell_boxes.unbind(-1)
    cx = (col + x) / s
    cy = (row + y) / s
    return torch.stack((cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h), dim=-1)


def decode_yolov1(outputs: Tensor, B: int, num_classes: int, linear: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Raw (N, S, S, 5B + C) -> the S*S*B candidate boxes (98 at S = 7, B = 2).

    Returns boxes (N, S*S*B, 4) xyxy normalized (not clipped), conf (N, S*S*B), and
    class_probs (N, S*S, C) per cell. Candidate index (i * S + j) * B + b; its class
    probabilities are row ``candidate // B`` of class_probs.
    """
    pred = yolov1_activate(outputs, B, num_classes, linear)
    n = outputs.shape[0]
    boxes = yolov1_cell_decode(pred.cell_boxes).reshape(n, -1, 4)  # (N, S*S*B, 4)
    return boxes, pred.conf.reshape(n, -1), pred.class_probs.reshape(n, -1, num_classes)


@dataclass
class YOLOv1PostProcessor:
    """YOLOv1 inference: scores, per-class NMS, a cap per image (DESIGN.md section 3).

    ``postprocess(outputs (N, S, S, 5B + C) raw) -> list[Detections]``, one per image, boxes
    xyxy normalized and clipped to [0, 1]. Score of (candidate box, class c) =
    conf * Pr(Class_c | Object) (paper section 2.2, "class-specific confidence scores").
    Scores below ``score_threshold`` are dropped (0.001 for evaluation, 0.25 for display),
    NMS at ``nms_iou`` runs per class, at most ``max_detections`` boxes are kept per image.

    NMS is ``onestage.postprocess.nms_keep_mask``, the same greedy NMS as ``batched_nms``
    but batched over (image, class) at once: each class has only S*S*B candidates, so an
    (N, C, S*S*B, S*S*B) overlap tensor is small and no Python loop runs over images.
    ``force_fp32(op)`` is the precision predicate for "decode" and "nms"; without one,
    both run in fp32. ``linear``: the outputs are Darknet's linear values (``yolov1_activate``).
    """

    S: int
    B: int
    num_classes: int
    score_threshold: float = 0.001
    nms_iou: float = 0.45
    max_detections: int = 100
    force_fp32: Callable[[str], bool] = lambda op: True
    linear: bool = False

    def __call__(self, outputs: Tensor) -> list[Detections]:
        if check_yolov1_outputs(outputs, self.B, self.num_classes) != self.S:
            raise ValueError(f"YOLOv1PostProcessor expects an S={self.S} grid, got {outputs.shape[1]}x{outputs.shape[2]}")
        if self.force_fp32("decode"):
            outputs = outputs.float()
        boxes, conf, class_probs = decode_yolov1(outputs, self.B, self.num_classes, self.linear)
        boxes = clip_xyxy(boxes)  # (N, K, 4), K = S*S*B
        # Each predictor takes its cell's class distribution: (N, K, C).
        scores = conf[..., None] * class_probs.repeat_interleave(self.B, dim=1)
        scores = scores.transpose(1, 2)  # (N, C, K)
        batch, num_classes, k = scores.shape
        sorted_scores, order = scores.sort(dim=2, descending=True, stable=True)  # (N, C, K)
        sorted_boxes = boxes[:, None].expand(-1, num_classes, -1, -1).gather(2, order[..., None].expand(-1, -1, -1, 4))
        valid = sorted_scores >= self.score_threshold
        nms_dtype = torch.float32 if self.force_fp32("nms") else sorted_boxes.dtype
        keep = nms_keep_mask(sorted_boxes.to(nms_dtype), valid, self.nms_iou, dtype=nms_dtype)  # (N, C, K)

        flat_scores = torch.where(keep, sorted_scores.float(), -1.0).reshape(batch, -1)  # (N, C*K)
        m = min(self.max_detections, flat_scores.shape[1])
        best, best_idx = flat_scores.topk(m, dim=1)  # (N, m), descending
        flat_boxes = sorted_boxes.reshape(batch, -1, 4)
        labels = best_idx // k  # class index in [0, C)
        results = []
        for i in range(batch):  # only to split the batch into per-image results
            n = int((best[i] >= 0).sum())
            results.append(Detections(boxes=flat_boxes[i, best_idx[i, :n]].float(), scores=best[i, :n], labels=labels[i, :n]))
        return results
