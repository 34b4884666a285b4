"""YOLOv1 decoding and inference post-processing.

Redmon et al., "You Only Look Once" (CVPR 2016), section 2; DESIGN.md section 3.

What each raw value means (sigmoid / softmax) is ``onestage.coders.yolov1_activate``; the
decoder and the loss both call it.

Candidate order of the decoded boxes (S*S*B of them, 98 at S = 7, B = 2): row-major over
cells (cell index i * S + j), the B predictors of a cell together: index (i * S + j) * B + b.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from onestage.boxes import clip_xyxy
from onestage.coders import check_yolov1_outputs, yolov1_activate, yolov1_cell_decode
from onestage.postprocess import Detections, select_detections


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

    The shared tail (``onestage.postprocess.select_detections``) runs NMS batched over
    (image, class) at once: each class has only S*S*B candidates, so an (N, C, S*S*B, S*S*B)
    overlap tensor is small and no Python loop runs over images.
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

    def decode(self, outputs: Tensor) -> tuple[Tensor, Tensor]:
        """Raw outputs -> (boxes (N, S*S*B, 4) xyxy normalized clipped to [0, 1]; scores (N, S*S*B, C))."""
        if check_yolov1_outputs(outputs, self.B, self.num_classes) != self.S:
            raise ValueError(f"YOLOv1PostProcessor expects an S={self.S} grid, got {outputs.shape[1]}x{outputs.shape[2]}")
        if self.force_fp32("decode"):
            outputs = outputs.float()
        boxes, conf, class_probs = decode_yolov1(outputs, self.B, self.num_classes, self.linear)
        # Each predictor takes its cell's class distribution: (N, K, C).
        return clip_xyxy(boxes), conf[..., None] * class_probs.repeat_interleave(self.B, dim=1)

    def __call__(self, outputs: Tensor) -> list[Detections]:
        boxes, scores = self.decode(outputs)
        return select_detections(
            boxes, scores, score_threshold=self.score_threshold, nms_iou=self.nms_iou,
            max_detections=self.max_detections, pre_nms_top_k=boxes.shape[1], top_k_per="class",
            nms_dtype=torch.float32 if self.force_fp32("nms") else boxes.dtype,
        )
