"""Decode raw outputs into detections: scores, per-class top-k, batched NMS, a cap per image.

NMS here is exact greedy NMS, computed without a loop over boxes: boxes sorted by score,
box i is kept iff no kept box ranked before it overlaps it by more than the threshold.
That recursive definition has a unique solution, reached by iterating
``keep = not any(keep[j] and iou[j, i] > t for j < i)`` from ``keep = all``: after round r
every box whose chain of suppressors is at most r long is right, so a few rounds of one
batched (K x K) comparison settle all images and classes at once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from onestage.boxes import box_iou
from onestage.coders import ssd_decode


@dataclass
class Detections:
    """One image's detections: boxes (K, 4) xyxy normalized, scores (K,), labels (K,) in [0, C)."""

    boxes: Tensor
    scores: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return int(self.scores.numel())

    def to_pixels(self, width: float, height: float) -> dict:
        """Numpy dict in absolute pixels of a (width, height) image (evaluator input)."""
        scale = torch.tensor([width, height, width, height], dtype=torch.float32)
        return {
            "boxes": (self.boxes.float().cpu() * scale).numpy(),
            "scores": self.scores.float().cpu().numpy(),
            "labels": self.labels.cpu().numpy(),
        }


def nms_keep_mask(boxes: Tensor, valid: Tensor, iou_threshold: float, dtype: torch.dtype = torch.float32) -> Tensor:
    """Greedy NMS on boxes already sorted by descending score, batched over leading dims.

    boxes: (..., K, 4) xyxy; valid: (..., K) bool (entries that take part). Returns (..., K) bool.
    """
    k = boxes.shape[-2]
    if k == 0:
        return valid.clone()
    overlaps = box_iou(boxes, boxes, dtype=dtype) > iou_threshold  # (..., K, K)
    earlier = torch.ones(k, k, dtype=torch.bool, device=boxes.device).triu(diagonal=1)  # [j, i]: j < i
    suppressors = overlaps & earlier & valid[..., :, None]  # [j, i]: j may suppress i
    keep = valid.clone()
    for _ in range(k):
        new_keep = valid & ~(suppressors & keep[..., :, None]).any(dim=-2)
        if torch.equal(new_keep, keep):
            break
        keep = new_keep
    return keep


def batched_nms(boxes: Tensor, scores: Tensor, labels: Tensor, iou_threshold: float) -> Tensor:
    """Per-class NMS over one image's boxes: (N, 4) xyxy, (N,), (N,) -> kept indices (K,),
    by descending score. Boxes of different classes never suppress each other."""
    order = scores.argsort(descending=True, stable=True)
    b, l = boxes[order], labels[order]
    overlaps = box_iou(b, b) > iou_threshold
    same_class = l[:, None] == l[None, :]
    n = order.numel()
    earlier = torch.ones(n, n, dtype=torch.bool, device=boxes.device).triu(diagonal=1)
    suppressors = overlaps & same_class & earlier
    keep = torch.ones(n, dtype=torch.bool, device=boxes.device)
    for _ in range(n):
        new_keep = ~(suppressors & keep[:, None]).any(dim=0)
        if torch.equal(new_keep, keep):
            break
        keep = new_keep
    return order[keep]


@dataclass
class SSDPostProcessor:
    """SSD inference (DESIGN.md section 3): softmax, per class drop scores below
    ``score_threshold`` and keep the top ``pre_nms_top_k``, NMS at ``nms_iou``, at most
    ``max_detections`` per image. All images and classes in one batched pass."""

    priors: Tensor  # (P, 4) cxcywh normalized
    variances: tuple[float, float] = (0.1, 0.2)
    score_threshold: float = 0.01
    nms_iou: float = 0.45
    pre_nms_top_k: int = 200
    max_detections: int = 200
    force_fp32: Callable[[str], bool] = lambda op: True

    def __call__(self, outputs: dict[str, Tensor]) -> list[Detections]:
        cls_logits, loc = outputs["cls"], outputs["loc"]  # (B, P, C+1), (B, P, 4)
        if self.force_fp32("softmax"):
            cls_logits = cls_logits.float()
        scores = F.softmax(cls_logits, dim=-1)[..., 1:].transpose(1, 2)  # (B, C, P), background dropped
        priors = self.priors.to(loc.device)
        boxes = ssd_decode(loc, priors, self.variances).clamp(0.0, 1.0)  # (B, P, 4) xyxy, fp32
        batch, num_classes, num_priors = scores.shape
        k = min(self.pre_nms_top_k, num_priors)
        top_scores, top_idx = scores.topk(k, dim=2)  # (B, C, K), sorted descending
        top_boxes = boxes[:, None].expand(-1, num_classes, -1, -1).gather(2, top_idx[..., None].expand(-1, -1, -1, 4))
        valid = top_scores >= self.score_threshold  # "drop scores < threshold"
        nms_dtype = torch.float32 if self.force_fp32("nms") else top_boxes.dtype
        keep = nms_keep_mask(top_boxes.to(nms_dtype), valid, self.nms_iou)  # (B, C, K)

        flat_scores = torch.where(keep, top_scores.float(), -1.0).reshape(batch, -1)  # (B, C*K)
        m = min(self.max_detections, flat_scores.shape[1])
        best, best_idx = flat_scores.topk(m, dim=1)  # (B, m)
        flat_boxes = top_boxes.reshape(batch, -1, 4)
        labels = best_idx // k  # class index in [0, C)
        results = []
        for i in range(batch):  # only to split the batch into per-image results
            n = int((best[i] >= 0).sum())
            results.append(
                Detections(
                    boxes=flat_boxes[i, best_idx[i, :n]].float(),
                    scores=best[i, :n],
                    labels=labels[i, :n],
                )
            )
        return results
