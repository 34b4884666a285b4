"""YOLOv3 decoding and inference post-processing.

Decoding (YOLOv3 paper, section 2.1; Darknet ``get_yolo_box`` in ``yolo_layer.c``) is
``onestage.coders.yolov3_decode_boxes``: with anchors NORMALIZED by the network input size
(pixels / input width, height), every box comes out normalized to [0, 1] of the network
input without knowing the stride. The targets (its inverse) come from the same module.

Candidate order in the flattened (B, N, ...) tensors: scale by scale (coarsest first, the
order of the raw outputs), then anchor, then row, then column: N = sum_s A_s * H_s * W_s
(10647 at input 416 with 3 anchors per scale).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from onestage.coders import check_yolov3_outputs, yolov3_decode_boxes
from onestage.postprocess import Detections, select_detections


def decode_yolov3(outputs: Sequence[Tensor], anchors: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """All scales -> (boxes (B, N, 4) xyxy normalized, objectness (B, N), class probs (B, N, C)).

    outputs: [(B, A_s, H_s, W_s, 5 + C)] coarsest first; anchors: [(A_s, 2)] normalized w, h,
    same order. Objectness and classes are independent sigmoids (YOLOv3 paper, section 2.2:
    multi-label classification, no softmax). All in fp32.
    """
    check_yolov3_outputs(outputs, anchors)
    boxes, obj, cls = [], [], []
    for raw, anc in zip(outputs, anchors):
        b = raw.shape[0]
        boxes.append(yolov3_decode_boxes(raw, anc).reshape(b, -1, 4))
        obj.append(torch.sigmoid(raw[..., 4].float()).reshape(b, -1))
        cls.append(torch.sigmoid(raw[..., 5:].float()).reshape(b, -1, raw.shape[-1] - 5))
    return torch.cat(boxes, dim=1), torch.cat(obj, dim=1), torch.cat(cls, dim=1)


@dataclass
class YOLOv3PostProcessor:
    """YOLOv3 inference (DESIGN.md section 3): decode, score = objectness x class probability,
    multi-label candidates, per-class NMS, a cap per image.

    - Every (box, class) pair whose score is >= ``score_threshold`` is a candidate, so one box
      may be kept for two classes (multi-label, as Darknet's ``get_yolo_detections`` fills
      ``prob[j]`` for every class above the threshold).
    - At most ``pre_nms_top_k`` candidates per image (the highest scores over all classes)
      enter NMS, which bounds its (K x K) cost; 0.001 is the evaluation threshold (use ~0.25
      for display).
    - Boxes are clipped to the image, then the shared tail (``onestage.postprocess.
      select_detections``): NMS at ``nms_iou`` (boxes of different classes never suppress
      each other), the best ``max_detections`` kept.

    anchors: [(A_s, 2)] normalized w, h, coarsest first (the order of the raw outputs).
    Returns one ``Detections`` per image: boxes (K, 4) xyxy normalized, scores (K,) descending,
    labels (K,) int64 in [0, C).
    """

    anchors: list[Tensor]
    num_classes: int
    score_threshold: float = 0.001
    nms_iou: float = 0.45
    max_detections: int = 100
    pre_nms_top_k: int = 1000

    def __post_init__(self) -> None:
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        if self.pre_nms_top_k < 1 or self.max_detections < 1:
            raise ValueError("pre_nms_top_k and max_detections must be >= 1")

    def decode(self, outputs: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """Raw outputs -> (boxes (B, N, 4) xyxy normalized clipped to [0, 1]; scores (B, N, C) = obj x class)."""
        check_yolov3_outputs(outputs, self.anchors, self.num_classes)
        boxes, obj, cls = decode_yolov3(outputs, self.anchors)  # (B, N, 4), (B, N), (B, N, C)
        return boxes.clamp(0.0, 1.0), obj[..., None] * cls

    def __call__(self, outputs: Sequence[Tensor]) -> list[Detections]:
        boxes, scores = self.decode(outputs)
        return select_detections(
            boxes, scores, score_threshold=self.score_threshold, nms_iou=self.nms_iou,
            max_detections=self.max_detections, pre_nms_top_k=self.pre_nms_top_k, top_k_per="image",
        )
