"""Pascal VOC average precision, in pure numpy (DESIGN.md section 3, "VOC AP conventions").

Contracts:
- ground truth, one entry per image: ``(boxes (N, 4) xyxy pixels, labels (N,) in [0, C),
  difficult (N,) bool or None)``;
- detections, one entry per image: ``(boxes (K, 4) xyxy pixels, scores (K,), labels (K,) in [0, C))``.

Matching follows the reference devkit code (``voc_eval.py`` of py-faster-rcnn, itself a
port of the VOC2012 devkit's ``VOCevaldet.m``): detections of a class are taken in
descending score order; each is compared with the ground truth of its class in its image
that it overlaps most (first index on ties, as ``numpy.argmax``). It is a true positive
when that IoU reaches the threshold and the object is not taken yet, a duplicate (false
positive) when it is taken, a false positive below the threshold. A detection whose best
object is ``difficult`` is ignored: neither true nor false positive, and difficult objects
are not counted in the recall denominator.

The sort is *stable*, so tied scores keep image order and then detection order, and the
result does not depend on numpy's quicksort.

Conventions (``convention``), because the references differ on two points, the pixel
width of a box and whether IoU equal to the threshold matches (DESIGN.md section 3):
- ``continuous`` (the default): widths x2 - x1 (no +1 pixel) and a match at IoU >= threshold,
  as COCO's evaluation; what torchmetrics' and most recent libraries' VOC-style mAP use.
- ``devkit``: the official VOC devkit ``VOCevaldet.m`` (the numbers of the VOC challenge
  and of the papers that ran it: Fast/Faster R-CNN's published VOC tables, SSD, YOLOv2):
  widths x2 - x1 + 1 and a match at ``ov >= VOCopts.minoverlap``.
- ``voc_eval_py``: py-faster-rcnn's ``voc_eval.py`` and its many copies (mmdetection's
  and Detectron's VOC evaluators, chainercv, most PyTorch SSD/YOLO ports): widths + 1 and
  a strict ``ovmax > ovthresh``, so a detection at exactly IoU 0.5 is a false positive there.
``legacy=True`` is the older name of ``voc_eval_py``.

The mean AP averages the classes that have at least one non-difficult object; a class
without any has AP nan and is left out of the mean (averaging a 0 in would punish a model
for a class the split does not contain).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np
import torch

from onestage.boxes import box_iou

VocMetric = Literal["area", "11point"]
VocConvention = Literal["continuous", "devkit", "voc_eval_py"]
# convention -> (+1 pixel on widths and heights, IoU equal to the threshold matches)
CONVENTIONS: dict[str, tuple[bool, bool]] = {
    "continuous": (False, True),
    "devkit": (True, True),
    "voc_eval_py": (True, False),
}


def resolve_convention(convention: str | None, legacy: bool = False) -> VocConvention:
    """The convention asked for (``legacy=True`` is the old name of ``voc_eval_py``)."""
    if convention is None:
        return "voc_eval_py" if legacy else "continuous"
    if convention not in CONVENTIONS:
        raise ValueError(f"VOC convention must be one of {', '.join(CONVENTIONS)}; got {convention!r}")
    if legacy and convention != "voc_eval_py":
        raise ValueError(f"legacy=True means convention 'voc_eval_py', not {convention!r}")
    return convention  # type: ignore[return-value]

# Recall thresholds of the VOC2007 11-point metric. Built with numpy.arange exactly as the
# devkit ports do (voc_eval.py: ``for t in np.arange(0., 1.1, 0.1)``): some of these floats
# sit a hair above k/10 (0.30000000000000004), so a recall of exactly 3/10 does not reach
# the fourth threshold. Keeping the quirk reproduces published numbers.
ELEVEN_POINTS = np.arange(0.0, 1.1, 0.1)  # (11,)

GroundTruth = tuple[np.ndarray, np.ndarray, "np.ndarray | None"]  # boxes (N,4), labels (N,), difficult (N,)
Detections = tuple[np.ndarray, np.ndarray, np.ndarray]  # boxes (K,4), scores (K,), labels (K,)

TRUE_POSITIVE = 1
FALSE_POSITIVE = 0
IGNORED = -1


def voc_ap(recall: np.ndarray, precision: np.ndarray, metric: VocMetric = "area") -> float:
    """AP of one precision/recall curve, points in descending score order.

    recall, precision: (K,) with recall non-decreasing (as cumulative sums make it).
    ``area``: exact area under the monotone (right-to-left max) precision envelope, the
    VOC2010+ devkit metric. ``11point``: mean over ``ELEVEN_POINTS`` of the best precision
    at recall >= t (0 where recall never gets there), the VOC2007 metric.
    An empty curve (no detections) gives 0.
    """
    rec = np.asarray(recall, dtype=np.float64).reshape(-1)
    prec = np.asarray(precision, dtype=np.float64).reshape(-1)
    if rec.shape != prec.shape:
        raise ValueError(f"voc_ap: recall has {rec.size} points and precision {prec.size}; they must match")
    if rec.size and np.any(np.diff(rec) < 0):
        raise ValueError("voc_ap: recall must be non-decreasing (points in descending score order)")
    if metric == "11point":
        if rec.size == 0:
            return 0.0
        # Best precision at recall >= t: suffix maximum of precision, read at the first
        # point whose recall reaches t (recall is sorted, so searchsorted finds it).
        suffix_max = np.maximum.accumulate(prec[::-1])[::-1]
        first = np.searchsorted(rec, ELEVEN_POINTS, side="left")  # (11,)
        reached = first < rec.size
        p = np.where(reached, suffix_max[np.minimum(first, rec.size - 1)], 0.0)
        return float(np.sum(p / 11.0))
    if metric == "area":
        # voc_eval.py: sentinels (0, 0) and (1, 0), precision envelope, sum of the
        # rectangles where recall changes.
        mrec = np.concatenate(([0.0], rec, [1.0]))
        mpre = np.concatenate(([0.0], prec, [0.0]))
        mpre = np.maximum.accumulate(mpre[::-1])[::-1]
        i = np.flatnonzero(mrec[1:] != mrec[:-1])
        return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))
    raise ValueError(f"voc_ap: metric must be 'area' or '11point', got {metric!r}")


def iou_matrix(boxes1: np.ndarray, boxes2: np.ndarray, plus_one: bool = False) -> np.ndarray:
    """(K, 4) xyxy x (N, 4) xyxy -> (K, N) float64 IoU; zero union gives 0.

    ``plus_one``: the devkit's pixel-inclusive widths, x2 - x1 + 1 (the boxes grow by one
    pixel to the right and down, then the shared ``box_iou`` in float64).
    """
    a = torch.from_numpy(np.asarray(boxes1, dtype=np.float64).reshape(-1, 4))
    b = torch.from_numpy(np.asarray(boxes2, dtype=np.float64).reshape(-1, 4))
    if plus_one:
        grow = torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=torch.float64)
        a, b = a + grow, b + grow
    return box_iou(a, b, dtype=torch.float64).numpy()


@dataclass(frozen=True)
class ImageMatch:
    """Greedy VOC matching of one image's detections (arrays in the detections' input order)."""

    status: np.ndarray  # (K,) int8: TRUE_POSITIVE, FALSE_POSITIVE or IGNORED
    gt_index: np.ndarray  # (K,) int64: best-overlapping object of the same class, -1 if none
    iou: np.ndarray  # (K,) float64: IoU with that object, 0 if none


def match_image(
    gt_boxes: np.ndarray,
    gt_labels: np.ndarray,
    gt_difficult: np.ndarray | None,
    det_boxes: np.ndarray,
    det_scores: np.ndarray,
    det_labels: np.ndarray,
    iou_threshold: float = 0.5,
    legacy: bool = False,
    convention: VocConvention | None = None,
) -> ImageMatch:
    """Match one image's detections to its objects, VOC style (see the module docstring).

    gt_boxes (N, 4) xyxy pixels, gt_labels (N,), gt_difficult (N,) bool or None;
    det_boxes (K, 4) xyxy pixels, det_scores (K,), det_labels (K,).
    """
    gt_boxes = np.asarray(gt_boxes, dtype=np.float64).reshape(-1, 4)
    gt_labels = np.asarray(gt_labels).reshape(-1)
    difficult = np.zeros(len(gt_labels), bool) if gt_difficult is None else np.asarray(gt_difficult, bool).reshape(-1)
    det_boxes = np.asarray(det_boxes, dtype=np.float64).reshape(-1, 4)
    det_scores = np.asarray(det_scores).reshape(-1)
    det_labels = np.asarray(det_labels).reshape(-1)
    k = len(det_boxes)

    plus_one, inclusive = CONVENTIONS[resolve_convention(convention, legacy)]
    iou = iou_matrix(det_boxes, gt_boxes, plus_one)  # (K, N)
    same_class = det_labels[:, None] == gt_labels[None, :]  # (K, N)
    # -1 marks "not an object of this class" so that a real IoU of 0 still wins argmax.
    iou_same = np.where(same_class, iou, -1.0)
    if len(gt_boxes):
        gt_index = np.argmax(iou_same, axis=1)  # first index on ties, as the devkit
        best = iou_same[np.arange(k), gt_index]
    else:
        gt_index = np.zeros(k, np.int64)
        best = np.full(k, -1.0)
    has_object = best >= 0
    gt_index = np.where(has_object, gt_index, -1).astype(np.int64)
    best = np.where(has_object, best, 0.0)

    hit = has_object & ((best >= iou_threshold) if inclusive else (best > iou_threshold))
    # A sentinel False at the end: gt_index -1 ("no object of this class") reads it.
    ignored = hit & np.append(difficult, False)[gt_index]
    candidate = hit & ~ignored

    # In descending score order (stable), an object is taken by the first candidate that
    # points at it; every later candidate pointing at it is a duplicate.
    order = np.argsort(-det_scores, kind="stable")
    cand_sorted = order[candidate[order]]
    _, first = np.unique(gt_index[cand_sorted], return_index=True)

    status = np.full(k, FALSE_POSITIVE, dtype=np.int8)
    status[ignored] = IGNORED
    status[cand_sorted[first]] = TRUE_POSITIVE
    return ImageMatch(status=status, gt_index=gt_index, iou=best)


@dataclass(frozen=True)
class VocResult:
    """Per-class VOC AP and the curves behind it (C classes)."""

    ap: np.ndarray  # (C,) float64 with the configured metric; nan: no non-difficult object
    num_gt: np.ndarray  # (C,) int64 non-difficult objects
    num_det: np.ndarray  # (C,) int64 detections, ignored ones included
    precision: list[np.ndarray]  # C arrays (M_c,), descending score order, ignored dropped
    recall: list[np.ndarray]  # C arrays (M_c,)
    scores: list[np.ndarray]  # C arrays (M_c,) the score at each point
    mean_ap: float  # mean of `ap` over classes with objects; nan if none has any
    metric: VocMetric
    iou_threshold: float
    convention: VocConvention

    def ap_as(self, metric: VocMetric) -> np.ndarray:
        """(C,) per-class AP recomputed from the stored curves with another metric."""
        return _class_aps(self.recall, self.precision, self.num_gt, metric)

    def mean_ap_as(self, metric: VocMetric) -> float:
        return mean_over_present(self.ap_as(metric), self.num_gt)


def mean_over_present(ap: np.ndarray, num_gt: np.ndarray) -> float:
    """Mean of per-class AP over classes with at least one object; nan when none has any."""
    present = np.asarray(num_gt) > 0
    return float(np.mean(np.asarray(ap)[present])) if present.any() else float("nan")


def _class_aps(
    recall: Sequence[np.ndarray], precision: Sequence[np.ndarray], num_gt: np.ndarray, metric: VocMetric
) -> np.ndarray:
    return np.array(
        [voc_ap(r, p, metric) if n > 0 else np.nan for r, p, n in zip(recall, precision, num_gt)],
        dtype=np.float64,
    )


def _check_labels(labels: np.ndarray, num_classes: int, what: str, image: int) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"evaluate_voc: image {image}: {what} labels must lie in [0, {num_classes}), "
            f"got values from {labels.min()} to {labels.max()}"
        )


def evaluate_voc(
    gts: Sequence[GroundTruth],
    dets: Sequence[Detections],
    num_classes: int,
    iou_threshold: float = 0.5,
    metric: VocMetric = "area",
    legacy: bool = False,
    convention: VocConvention | None = None,
) -> VocResult:
    """VOC AP for every class of a dataset (see the module docstring for the rules and conventions)."""
    convention = resolve_convention(convention, legacy)
    if len(gts) != len(dets):
        raise ValueError(f"evaluate_voc: {len(gts)} ground-truth images but {len(dets)} detection images")
    if metric not in ("area", "11point"):
        raise ValueError(f"evaluate_voc: metric must be 'area' or '11point', got {metric!r}")

    gt_label_parts: list[np.ndarray] = []
    status_parts: list[np.ndarray] = []
    score_parts: list[np.ndarray] = []
    label_parts: list[np.ndarray] = []
    # One loop over images (not boxes): the greedy matching state lives in one image.
    for i, ((g_boxes, g_labels, g_difficult), (d_boxes, d_scores, d_labels)) in enumerate(zip(gts, dets)):
        g_labels = np.asarray(g_labels, dtype=np.int64).reshape(-1)
        g_diff = np.zeros(len(g_labels), bool) if g_difficult is None else np.asarray(g_difficult, bool).reshape(-1)
        d_scores = np.asarray(d_scores, dtype=np.float64).reshape(-1)
        d_labels = np.asarray(d_labels, dtype=np.int64).reshape(-1)
        if len(np.asarray(d_boxes).reshape(-1, 4)) != len(d_scores) or len(d_scores) != len(d_labels):
            raise ValueError(f"evaluate_voc: image {i}: detection boxes, scores and labels differ in length")
        if not np.all(np.isfinite(d_scores)):
            raise ValueError(f"evaluate_voc: image {i}: detection scores must be finite")
        if len(np.asarray(g_boxes).reshape(-1, 4)) != len(g_labels) or len(g_diff) != len(g_labels):
            raise ValueError(f"evaluate_voc: image {i}: ground-truth boxes, labels and difficult differ in length")
        _check_labels(g_labels, num_classes, "ground-truth", i)
        _check_labels(d_labels, num_classes, "detection", i)
        match = match_image(g_boxes, g_labels, g_diff, d_boxes, d_scores, d_labels, iou_threshold,
                            convention=convention)
        gt_label_parts.append(g_labels[~g_diff])
        status_parts.append(match.status)
        score_parts.append(d_scores)
        label_parts.append(d_labels)

    gt_labels = np.concatenate(gt_label_parts) if gt_label_parts else np.zeros(0, np.int64)
    status = np.concatenate(status_parts) if status_parts else np.zeros(0, np.int8)
    scores = np.concatenate(score_parts) if score_parts else np.zeros(0)
    labels = np.concatenate(label_parts) if label_parts else np.zeros(0, np.int64)

    num_gt = np.bincount(gt_labels, minlength=num_classes).astype(np.int64)
    num_det = np.bincount(labels, minlength=num_classes).astype(np.int64)

    # Class by class, descending score; np.lexsort is stable, so ties keep image order.
    keep = status != IGNORED
    order = np.lexsort((-scores[keep], labels[keep]))
    s_labels = labels[keep][order]
    s_tp = (status[keep][order] == TRUE_POSITIVE).astype(np.float64)
    s_scores = scores[keep][order]
    bounds = np.searchsorted(s_labels, np.arange(num_classes + 1))

    precision: list[np.ndarray] = []
    recall: list[np.ndarray] = []
    class_scores: list[np.ndarray] = []
    for c in range(num_classes):
        tp = np.cumsum(s_tp[bounds[c] : bounds[c + 1]])
        seen = np.arange(1, len(tp) + 1, dtype=np.float64)  # tp + fp, ignored ones dropped
        precision.append(tp / seen)
        recall.append(tp / num_gt[c] if num_gt[c] > 0 else np.zeros_like(tp))
        class_scores.append(s_scores[bounds[c] : bounds[c + 1]])

    ap = _class_aps(recall, precision, num_gt, metric)
    return VocResult(
        ap=ap,
        num_gt=num_gt,
        num_det=num_det,
        precision=precision,
        recall=recall,
        scores=class_scores,
        mean_ap=mean_over_present(ap, num_gt),
        metric=metric,
        iou_threshold=float(iou_threshold),
        convention=convention,
    )
