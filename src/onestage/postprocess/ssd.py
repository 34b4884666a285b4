"""SSD inference (DESIGN.md section 3): softmax over C+1, background dropped, decoded priors,
then the shared tail: per class drop scores < 0.01, keep the top 200, NMS at 0.45, at most
200 detections per image."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from onestage.coders import ssd_decode
from onestage.postprocess import Detections, select_detections


def decode_ssd(
    outputs: dict[str, Tensor], priors: Tensor, variances: tuple[float, float], fp32_softmax: bool = True
) -> tuple[Tensor, Tensor]:
    """Raw SSD outputs -> (boxes (B, P, 4) xyxy normalized clipped to [0, 1], fp32; scores (B, P, C)).

    outputs: {"cls": (B, P, C+1) logits, "loc": (B, P, 4) encoded offsets}; priors (P, 4)
    cxcywh normalized. Scores are the softmax over C+1 classes with the background column
    (class 0) dropped.
    """
    cls_logits, loc = outputs["cls"], outputs["loc"]
    if fp32_softmax:
        cls_logits = cls_logits.float()
    scores = F.softmax(cls_logits, dim=-1)[..., 1:]  # (B, P, C)
    boxes = ssd_decode(loc, priors.to(loc.device), variances).clamp(0.0, 1.0)  # (B, P, 4), fp32
    return boxes, scores


@dataclass
class SSDPostProcessor:
    """``postprocess(outputs) -> list[Detections]`` for SSD outputs (module docstring).

    ``force_fp32(op)`` is the precision predicate for "softmax" and "nms"; without one both
    run in fp32.
    """

    priors: Tensor  # (P, 4) cxcywh normalized
    variances: tuple[float, float] = (0.1, 0.2)
    score_threshold: float = 0.01
    nms_iou: float = 0.45
    pre_nms_top_k: int = 200
    max_detections: int = 200
    force_fp32: Callable[[str], bool] = lambda op: True

    def decode(self, outputs: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        return decode_ssd(outputs, self.priors, self.variances, self.force_fp32("softmax"))

    def __call__(self, outputs: dict[str, Tensor]) -> list[Detections]:
        boxes, scores = self.decode(outputs)
        return select_detections(
            boxes, scores, score_threshold=self.score_threshold, nms_iou=self.nms_iou,
            max_detections=self.max_detections, pre_nms_top_k=self.pre_nms_top_k, top_k_per="class",
            nms_dtype=torch.float32 if self.force_fp32("nms") else outputs["loc"].dtype,
        )
