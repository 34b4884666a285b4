"""Post-processing: raw outputs -> ``Detections``, one home for every family (DESIGN.md section 2).

Every family's post-processor is a thin decoder step (``ssd.py``, ``yolov3.py``, ``yolov1.py``)
that turns raw outputs into candidate boxes and per-class scores,

    boxes (B, N, 4) xyxy normalized, fp32;  scores (B, N, C) in [0, 1], one column per class,

followed by the ONE shared tail below, ``select_detections``: score threshold, top-k, per-class
NMS, a cap per image. There is one NMS, ``nms_keep_mask``.

NMS here is exact greedy NMS, computed without a loop over boxes: boxes sorted by score,
box i is kept iff no kept box ranked before it overlaps it by more than the threshold.
That recursive definition has a unique solution, reached by iterating
``keep = not any(keep[j] and iou[j, i] > t for j < i)`` from ``keep = all``: after round r
every box whose chain of suppressors is at most r long is right, so a few rounds of one
batched (K x K) comparison settle all images and classes at once. A box whose IoU with a
kept box equals the threshold exactly survives (``>``, as torchvision's ``nms``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from onestage.boxes import box_iou

TopKScope = Literal["class", "image"]


@dataclass
class Detections:
    """One image's detections: boxes (K, 4) xyxy normalized, scores (K,) descending, labels (K,) in [0, C)."""

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


def nms_keep_mask(
    boxes: Tensor,
    valid: Tensor,
    iou_threshold: float,
    dtype: torch.dtype = torch.float32,
    labels: Tensor | None = None,
) -> Tensor:
    """Greedy NMS on boxes already sorted by descending score, batched over leading dims.

    boxes: (..., K, 4) xyxy; valid: (..., K) bool (entries that take part); labels: optional
    (..., K) classes: boxes of different classes never suppress each other. The IoU is
    computed in ``dtype``. Returns (..., K) bool.
    """
    k = boxes.shape[-2]
    if k == 0:
        return valid.clone()
    # Entries past the last one valid in any row take no part: leave them out of the (K x K)
    # work. At an evaluation threshold (0.001) YOLOv3's top 1000 hold 0-130 valid pairs per
    # image, and the IoU matrix of all 1000 was 80% of its batch-16 inference.
    used = int(valid.reshape(-1, k).any(dim=0).nonzero().max()) + 1 if bool(valid.any()) else 0
    if used < k:
        keep = torch.zeros_like(valid)
        if used:
            keep[..., :used] = nms_keep_mask(boxes[..., :used, :], valid[..., :used], iou_threshold, dtype,
                                             None if labels is None else labels[..., :used])
        return keep
    suppresses = box_iou(boxes, boxes, dtype=dtype) > iou_threshold  # (..., K, K) [j, i]
    if labels is not None:
        suppresses &= labels[..., :, None] == labels[..., None, :]
    earlier = torch.ones(k, k, dtype=torch.bool, device=boxes.device).triu(diagonal=1)  # [j, i]: j < i
    suppressors = suppresses & earlier & valid[..., :, None]  # [j, i]: j may suppress i
    keep = valid.clone()
    for _ in range(k):  # rounds of the fixed point (module docstring), not a loop over boxes
        new_keep = valid & ~(suppressors & keep[..., :, None]).any(dim=-2)
        if torch.equal(new_keep, keep):
            break
        keep = new_keep
    return keep


def batched_nms(boxes: Tensor, scores: Tensor, labels: Tensor, iou_threshold: float) -> Tensor:
    """Per-class NMS over one image's boxes: (N, 4) xyxy, (N,), (N,) -> kept indices (K,),
    by descending score. Boxes of different classes never suppress each other."""
    order = scores.argsort(descending=True, stable=True)
    valid = torch.ones_like(order, dtype=torch.bool)
    keep = nms_keep_mask(boxes[order], valid, iou_threshold, labels=labels[order])
    return order[keep]


def select_detections(
    boxes: Tensor,
    scores: Tensor,
    *,
    score_threshold: float,
    nms_iou: float,
    max_detections: int,
    pre_nms_top_k: int,
    top_k_per: TopKScope = "class",
    nms_dtype: torch.dtype = torch.float32,
) -> list[Detections]:
    """The shared tail of every post-processor: threshold, top-k, per-class NMS, cap.

    boxes: (B, N, 4) xyxy normalized, one box per candidate (shared by its classes);
    scores: (B, N, C) per-class scores. A (candidate, class) pair is a detection candidate
    when its score is >= ``score_threshold``, so one box may be kept for two classes.

    ``top_k_per``: where ``pre_nms_top_k`` applies, which bounds NMS's (K x K) cost:
    - "class": the best K candidates of each class (SSD's reference inference, and YOLOv1 with
      K = all), NMS batched over (image, class);
    - "image": the best K (candidate, class) pairs of each image over all classes (Darknet's
      YOLOv3 evaluation), NMS batched over images with class-aware suppression.
    Then the best ``max_detections`` kept pairs per image. Returns one ``Detections`` per
    image, scores descending, labels in [0, C).
    """
    batch, num_cand, num_classes = scores.shape
    scores = scores.float()
    if top_k_per == "class":
        k = min(pre_nms_top_k, num_cand)
        top_scores, top_idx = _top_k(scores.transpose(1, 2), k)  # (B, C, K), descending
        top_boxes = boxes[:, None].expand(-1, num_classes, -1, -1).gather(2, top_idx[..., None].expand(-1, -1, -1, 4))
        class_labels = None  # each row holds one class
        labels_of = torch.arange(num_classes, device=scores.device).view(1, -1, 1).expand(batch, -1, k)
    elif top_k_per == "image":
        k = min(pre_nms_top_k, num_cand * num_classes)
        top_scores, top_idx = _top_k(scores.flatten(1), k)  # (B, K): pair (n, c) at n * C + c
        top_boxes = boxes.gather(1, (top_idx // num_classes)[..., None].expand(-1, -1, 4))  # (B, K, 4)
        class_labels = labels_of = top_idx % num_classes
    else:
        raise ValueError(f"top_k_per must be 'class' or 'image', got {top_k_per!r}")
    valid = top_scores >= score_threshold  # "drop scores < threshold"
    keep = nms_keep_mask(top_boxes, valid, nms_iou, dtype=nms_dtype, labels=class_labels)

    flat_scores = torch.where(keep, top_scores, -1.0).reshape(batch, -1)
    m = min(max_detections, flat_scores.shape[1])
    best, best_idx = _top_k(flat_scores, m)  # (B, m), descending
    flat_boxes = top_boxes.reshape(batch, -1, 4).float()
    flat_labels = labels_of.reshape(batch, -1)
    results = []
    for i in range(batch):  # only to split the batch into per-image results
        n = int((best[i] >= 0).sum())
        idx = best_idx[i, :n]
        results.append(Detections(boxes=flat_boxes[i, idx], scores=best[i, :n], labels=flat_labels[i, idx]))
    return results


def _top_k(values: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k largest along the last dim, descending; equal values in index order, also at
    the cut (``stable_top_k``: the order ONNX's TopK defines), whatever the device."""
    from onestage.postprocess.topk import stable_top_k

    return stable_top_k(values, k)
