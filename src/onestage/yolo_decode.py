"""YOLOv3 decoding and inference post-processing.

Decoding (YOLOv3 paper, section 2.1; Darknet ``get_yolo_box`` in ``yolo_layer.c``), for the
cell in column c_x, row c_y of an H x W map with anchor (p_w, p_h):
    b_x = (sigmoid(t_x) + c_x) / W      (= (sigmoid(t_x) + c_x) * stride / image width)
    b_y = (sigmoid(t_y) + c_y) / H
    b_w = p_w * exp(t_w),  b_h = p_h * exp(t_h)
with anchors NORMALIZED by the network input size (pixels / input width, height), so every
box comes out normalized to [0, 1] of the network input without knowing the stride. The
exact inverse (the targets) is computed by ``onestage.assign.yolov3.assign_yolov3``.

Candidate order in the flattened (B, N, ...) tensors: scale by scale (coarsest first, the
order of the raw outputs), then anchor, then row, then column: N = sum_s A_s * H_s * W_s
(10647 at input 416 with 3 anchors per scale).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from onestage.boxes import cxcywh_to_xyxy
from onestage.postprocess import Detections, batched_nms

# exp() of a wild early t_w overflows fp32 at 89; as torchvision's BoxCoder, clamp t_w, t_h
# at log(1000 / 16): a box at most 62.5 times its anchor, far beyond any real object.
MAX_LOG_SCALE = math.log(1000.0 / 16)


def check_outputs(outputs: Sequence[Tensor], anchors: Sequence[Tensor], num_classes: int | None = None) -> None:
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


def decode_yolov3_boxes(raw: Tensor, anchors: Tensor) -> Tensor:
    """One scale's box offsets -> boxes.

    raw: (B, A, H, W, >= 4) raw outputs (t_x, t_y, t_w, t_h first); anchors: (A, 2) w, h
    normalized. Returns (B, A, H, W, 4) xyxy normalized, in fp32 whatever the input dtype.
    """
    _, _, h, w, _ = raw.shape
    t = raw[..., :4].float()
    device = raw.device
    c_y, c_x = torch.meshgrid(
        torch.arange(h, device=device, dtype=torch.float32),
        torch.arange(w, device=device, dtype=torch.float32),
        indexing="ij",
    )  # (H, W) each: cell column and row
    b_x = (torch.sigmoid(t[..., 0]) + c_x) / w  # (B, A, H, W)
    b_y = (torch.sigmoid(t[..., 1]) + c_y) / h
    anc = anchors.to(device=device, dtype=torch.float32).view(1, -1, 1, 1, 2)  # (1, A, 1, 1, 2)
    b_wh = anc * torch.exp(t[..., 2:4].clamp(max=MAX_LOG_SCALE))  # (B, A, H, W, 2)
    return cxcywh_to_xyxy(torch.cat((b_x[..., None], b_y[..., None], b_wh), dim=-1))


def decode_yolov3(outputs: Sequence[Tensor], anchors: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """All scales -> (boxes (B, N, 4) xyxy normalized, objectness (B, N), class probs (B, N, C)).

    outputs: [(B, A_s, H_s, W_s, 5 + C)] coarsest first; anchors: [(A_s, 2)] normalized w, h,
    same order. Objectness and classes are independent sigmoids (YOLOv3 paper, section 2.2:
    multi-label classification, no softmax). All in fp32.
    """
    check_outputs(outputs, anchors)
    boxes, obj, cls = [], [], []
    for raw, anc in zip(outputs, anchors):
        b = raw.shape[0]
        boxes.append(decode_yolov3_boxes(raw, anc).reshape(b, -1, 4))
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
    - Boxes are clipped to the image, then ``onestage.postprocess.batched_nms`` at ``nms_iou``
      (boxes of different classes never suppress each other); the best ``max_detections``
      are kept.

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

    def __call__(self, outputs: Sequence[Tensor]) -> list[Detections]:
        check_outputs(outputs, self.anchors, self.num_classes)
        boxes, obj, cls = decode_yolov3(outputs, self.anchors)  # (B, N, 4), (B, N), (B, N, C)
        boxes = boxes.clamp(0.0, 1.0)
        scores = (obj[..., None] * cls).flatten(1)  # (B, N * C): pair (n, c) at n * C + c
        k = min(self.pre_nms_top_k, scores.shape[1])
        top_scores, top_idx = scores.topk(k, dim=1)  # (B, K), descending
        box_idx = top_idx // self.num_classes
        labels = top_idx % self.num_classes
        results: list[Detections] = []
        for i in range(scores.shape[0]):  # only to split the batch into per-image results
            n = int((top_scores[i] >= self.score_threshold).sum())  # sorted: the first n pass
            cand_boxes = boxes[i, box_idx[i, :n]]
            keep = batched_nms(cand_boxes, top_scores[i, :n], labels[i, :n], self.nms_iou)[: self.max_detections]
            results.append(Detections(boxes=cand_boxes[keep], scores=top_scores[i, keep], labels=labels[i, keep]))
        return results
