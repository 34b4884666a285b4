"""One evaluation interface for VOC AP and COCO metrics (docs/contracts.md, "Evaluation").

``Evaluator.update(records, detections)`` is fed batch by batch; ``compute()`` returns an
``EvalResult`` whose ``metrics`` is one flat ``dict[str, float]``:

- ``voc_ap{T}``: VOC mAP at the configured IoU threshold (T = 50 for 0.5) with the
  configured metric (``area`` or ``11point``); ``voc_ap{T}_area`` and ``voc_ap{T}_11point``
  always, both computed from the same matching;
- ``coco_ap`` ... ``coco_ar_large`` (see ``coco.COCO_METRIC_KEYS``) when ``"coco"`` is in
  ``metrics``.

Memory: per image the evaluator keeps only small numpy arrays (float32 boxes and scores,
int32 labels, the size and id); never the record itself, which may hold its pixels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Mapping, Sequence

import numpy as np

from onestage.data.record import ImageRecord
from onestage.eval.coco import (
    coco_image_id_map,
    coco_metrics,
    detections_to_coco_results,
    records_to_coco_gt,
)
from onestage.eval.voc import VocConvention, VocMetric, evaluate_voc, resolve_convention

if TYPE_CHECKING:
    from onestage.eval.tide import TideResult

MetricName = Literal["voc", "coco"]


@dataclass(frozen=True)
class ClassRow:
    """One class's line of the AP table."""

    name: str
    ap: float  # nan when the class has no non-difficult object
    num_gt: int  # non-difficult objects
    num_det: int  # detections of the class
    ap_other: float = float("nan")  # the other VOC form (11-point when ap is area, and back)


@dataclass
class EvalResult:
    """What ``Evaluator.compute`` returns."""

    metrics: dict[str, float]  # flat: voc_ap50, voc_ap50_area, voc_ap50_11point, coco_*...
    per_class: list[ClassRow]  # in class order
    precision: list[np.ndarray] = field(repr=False)  # C arrays (M_c,) descending score order
    recall: list[np.ndarray] = field(repr=False)  # C arrays (M_c,)
    scores: list[np.ndarray] = field(repr=False)  # C arrays (M_c,)
    iou_threshold: float = 0.5
    voc_metric: VocMetric = "area"
    tide: TideResult | None = None  # a TideResult when TIDE ran (eval.tide.add_tide); result_to_json carries it
    # video data: eval.stability.StabilityResult (added by eval.stability_report.add_stability)
    stability: Any = field(default=None, repr=False)

    @property
    def voc_key(self) -> str:
        return voc_key(self.iou_threshold)


def voc_key(iou_threshold: float) -> str:
    """``voc_ap50`` for 0.5, ``voc_ap75`` for 0.75."""
    return f"voc_ap{int(round(iou_threshold * 100))}"


@dataclass(frozen=True)
class _StoredImage:
    image_id: int | str
    width: int
    height: int
    gt_boxes: np.ndarray  # (N, 4) float32 xyxy pixels
    gt_labels: np.ndarray  # (N,) int32
    gt_difficult: np.ndarray  # (N,) bool
    gt_areas: np.ndarray | None  # (N,) float32 COCO areas, or None
    det_boxes: np.ndarray  # (K, 4) float32 xyxy original-image pixels
    det_scores: np.ndarray  # (K,) float32
    det_labels: np.ndarray  # (K,) int32


class Evaluator:
    """Accumulates ground truth and detections, then computes VOC and/or COCO metrics."""

    def __init__(
        self,
        class_names: list[str],
        *,
        metrics: Sequence[MetricName] = ("voc",),
        iou_threshold: float = 0.5,
        voc_metric: VocMetric = "area",
        category_ids: list[int] | None = None,
        voc_convention: VocConvention = "continuous",
    ) -> None:
        unknown = set(metrics) - {"voc", "coco"}
        if unknown:
            raise ValueError(f"Evaluator: unknown metrics {sorted(unknown)}; allowed: 'voc', 'coco'")
        if voc_metric not in ("area", "11point"):
            raise ValueError(f"Evaluator: voc_metric must be 'area' or '11point', got {voc_metric!r}")
        if not 0 < iou_threshold <= 1:
            raise ValueError(f"Evaluator: iou_threshold must lie in (0, 1], got {iou_threshold}")
        if category_ids is not None and len(category_ids) != len(class_names):
            raise ValueError(
                f"Evaluator: {len(category_ids)} category ids for {len(class_names)} classes; they must match"
            )
        self.class_names = list(class_names)
        self.metrics = tuple(metrics)
        self.iou_threshold = float(iou_threshold)
        self.voc_metric: VocMetric = voc_metric
        self.voc_convention: VocConvention = resolve_convention(voc_convention)
        # COCO category id of each label; 1..C unless the dataset brought its own (COCO 1-90).
        self.category_ids = list(category_ids) if category_ids is not None else list(range(1, len(class_names) + 1))
        self._images: list[_StoredImage] = []

    def reset(self) -> None:
        self._images = []

    def __len__(self) -> int:
        return len(self._images)

    def update(self, records: Sequence[ImageRecord], detections: Sequence[Mapping[str, np.ndarray]]) -> None:
        """Add a batch: one record and one detection dict per image.

        detections[i]: ``boxes`` (K, 4) xyxy pixels of the original image, ``scores`` (K,),
        ``labels`` (K,) in [0, C).
        """
        if len(records) != len(detections):
            raise ValueError(f"Evaluator.update: {len(records)} records but {len(detections)} detection sets")
        num_classes = len(self.class_names)
        for rec, det in zip(records, detections):
            missing = {"boxes", "scores", "labels"} - set(det)
            if missing:
                raise ValueError(f"Evaluator.update: image {rec.image_id!r}: detections lack {sorted(missing)}")
            boxes = np.asarray(det["boxes"], dtype=np.float32).reshape(-1, 4)
            scores = np.asarray(det["scores"], dtype=np.float32).reshape(-1)
            labels = np.asarray(det["labels"]).reshape(-1).astype(np.int32)
            if not (len(boxes) == len(scores) == len(labels)):
                raise ValueError(
                    f"Evaluator.update: image {rec.image_id!r}: {len(boxes)} boxes, {len(scores)} scores, "
                    f"{len(labels)} labels"
                )
            for what, lab in (("detection", labels), ("ground-truth", rec.labels)):
                if lab.size and (lab.min() < 0 or lab.max() >= num_classes):
                    raise ValueError(
                        f"Evaluator.update: image {rec.image_id!r}: {what} labels must lie in [0, {num_classes})"
                    )
            self._images.append(
                _StoredImage(
                    image_id=rec.image_id,
                    width=int(rec.width),
                    height=int(rec.height),
                    gt_boxes=np.asarray(rec.boxes, dtype=np.float32).reshape(-1, 4).copy(),
                    gt_labels=rec.labels.astype(np.int32),
                    gt_difficult=np.asarray(rec.difficult, dtype=bool).copy(),
                    gt_areas=None if rec.areas is None else np.asarray(rec.areas, dtype=np.float32).copy(),
                    det_boxes=boxes.copy(),
                    det_scores=scores.copy(),
                    det_labels=labels,
                )
            )

    def compute(self) -> EvalResult:
        """Metrics over everything added since the last ``reset``."""
        gts = [(im.gt_boxes, im.gt_labels, im.gt_difficult) for im in self._images]
        dets = [(im.det_boxes, im.det_scores, im.det_labels) for im in self._images]
        voc = evaluate_voc(gts, dets, len(self.class_names), self.iou_threshold, self.voc_metric,
                           convention=self.voc_convention)
        key = voc_key(self.iou_threshold)
        metrics: dict[str, float] = {}
        if "voc" in self.metrics:
            metrics[key] = voc.mean_ap
            metrics[f"{key}_area"] = voc.mean_ap_as("area")
            metrics[f"{key}_11point"] = voc.mean_ap_as("11point")
        if "coco" in self.metrics:
            metrics.update(self._coco())
        other = voc.ap_as("11point" if self.voc_metric == "area" else "area")
        per_class = [
            ClassRow(name=n, ap=float(a), num_gt=int(g), num_det=int(d), ap_other=float(o))
            for n, a, g, d, o in zip(self.class_names, voc.ap, voc.num_gt, voc.num_det, other)
        ]
        return EvalResult(
            metrics=metrics,
            per_class=per_class,
            precision=voc.precision,
            recall=voc.recall,
            scores=voc.scores,
            iou_threshold=self.iou_threshold,
            voc_metric=self.voc_metric,
        )

    def _coco(self) -> dict[str, float]:
        records = [
            ImageRecord(
                image_id=im.image_id,
                width=im.width,
                height=im.height,
                boxes=im.gt_boxes,
                labels=im.gt_labels,
                difficult=im.gt_difficult,
                areas=im.gt_areas,
            )
            for im in self._images
        ]
        gt = records_to_coco_gt(records, self.class_names, self.category_ids)
        id_map = coco_image_id_map([im.image_id for im in self._images])
        results = detections_to_coco_results(
            [id_map[im.image_id] for im in self._images],
            [{"boxes": im.det_boxes, "scores": im.det_scores, "labels": im.det_labels} for im in self._images],
            self.category_ids,
        )
        return coco_metrics(gt, results)


def _fmt(x: float) -> str:
    return "   n/a" if math.isnan(x) else f"{x:6.3f}"


def format_table(result: EvalResult) -> str:
    """Per-class AP sorted by AP (best first, classes without objects last), then the mean.

    The AP column is the configured VOC metric at the configured IoU; the mean row is the
    mAP over classes with objects and the total counts.
    """
    # sorted() is stable: equal APs keep class order.
    rows = sorted(result.per_class, key=lambda r: (math.isnan(r.ap), 0.0 if math.isnan(r.ap) else -r.ap))
    width = max([len("class"), len("mean")] + [len(r.name) for r in rows])
    title = f"AP@{result.iou_threshold:g} ({result.voc_metric})"
    other = f"({'11point' if result.voc_metric == 'area' else 'area'})"
    col = max(6, len(title))
    ocol = len(other)
    lines = [f"{'class':<{width}}  {title:>{col}}  {other:>{ocol}}  {'gt':>7}  {'det':>8}"]
    for r in rows:
        lines.append(f"{r.name:<{width}}  {_fmt(r.ap):>{col}}  {_fmt(r.ap_other):>{ocol}}  {r.num_gt:>7d}  {r.num_det:>8d}")
    present = [r for r in rows if r.num_gt > 0]
    mean = float(np.mean([r.ap for r in present])) if present else float("nan")
    mean_other = float(np.mean([r.ap_other for r in present])) if present else float("nan")
    lines.append("-" * len(lines[0]))
    lines.append(
        f"{'mean':<{width}}  {_fmt(mean):>{col}}  {_fmt(mean_other):>{ocol}}  {sum(r.num_gt for r in rows):>7d}  "
        f"{sum(r.num_det for r in rows):>8d}"
    )
    if result.stability is not None:
        from onestage.eval.stability import format_stability

        lines += ["", format_stability(result.stability)]
    return "\n".join(lines)


def _json_float(x: float) -> float | None:
    """JSON has no NaN: a class without objects reports ``null``."""
    return None if math.isnan(x) else float(x)


def result_to_json(result: EvalResult) -> dict[str, Any]:
    """A JSON-ready dict (metrics, per-class rows, settings); NaN becomes null. On video data
    the stability figures come as top-level keys too (``eval.stability.stability_to_json``)."""
    out: dict[str, Any] = {
        "metrics": {k: _json_float(v) for k, v in result.metrics.items()},
        "per_class": [
            {"name": r.name, "ap": _json_float(r.ap), "num_gt": r.num_gt, "num_det": r.num_det}
            for r in result.per_class
        ],
        "iou_threshold": result.iou_threshold,
        "voc_metric": result.voc_metric,
    }
    if result.stability is not None:
        from onestage.eval.stability import stability_to_json

        out.update(stability_to_json(result.stability))
    if result.tide is not None:
        from onestage.eval.tide import tide_to_json

        out["tide"] = tide_to_json(result.tide)
    return out
