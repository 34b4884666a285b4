"""Pictures and error summaries that explain an evaluation.

- ``plot_pr_curves``: one precision/recall subplot per class, in a grid.
- ``confusion_summary``: where the false positives come from (after Hoiem et al.,
  "Diagnosing Error in Object Detectors", ECCV 2012, and TIDE, ECCV 2020).
- ``worst_images`` / ``draw_worst_images``: the images with most misses + false positives,
  ground truth in green and detections in red.

Matplotlib is used through its object API (``Figure`` + the Agg canvas), never pyplot, so
importing this module changes no global backend and works on machines without a display.

Detections follow docs/contracts.md: per image numpy ``boxes`` (K, 4) xyxy original-image
pixels, ``scores`` (K,), ``labels`` (K,) in [0, C).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import cv2
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from onestage.data.record import ImageRecord
from onestage.eval.evaluator import EvalResult
from onestage.eval.voc import IGNORED, TRUE_POSITIVE, iou_matrix, match_image

GT_COLOR = (0, 200, 0)  # RGB green
DET_COLOR = (230, 0, 0)  # RGB red

# Error kinds of a detection, in the order they are tested (the first that applies wins).
ERROR_KINDS: tuple[str, ...] = ("duplicate", "wrong_class", "localization", "both", "background")


# --------------------------------------------------------------------------- PR curves
def pr_figure(result: EvalResult, class_names: Sequence[str] | None = None) -> Figure:
    """The figure ``plot_pr_curves`` saves: a grid with one axes per class."""
    names = list(class_names) if class_names is not None else [r.name for r in result.per_class]
    n = len(names)
    cols = max(1, math.ceil(math.sqrt(n)))
    rows = max(1, math.ceil(n / cols))
    fig = Figure(figsize=(2.6 * cols, 2.4 * rows), dpi=100)
    FigureCanvasAgg(fig)
    for c, name in enumerate(names):
        ax = fig.add_subplot(rows, cols, c + 1)
        row = result.per_class[c]
        rec, prec = result.recall[c], result.precision[c]
        if row.num_gt > 0 and len(rec):
            # Start the curve at recall 0 with the first point's precision, as it is drawn
            # by the devkits (the step before the first detection).
            ax.step(np.concatenate(([0.0], rec)), np.concatenate(([prec[0]], prec)), where="post", color="C0")
        ap = "n/a" if math.isnan(row.ap) else f"{row.ap:.3f}"
        ax.set_title(f"{name}  AP {ap}  (gt {row.num_gt})", fontsize=8)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.05)
        ax.tick_params(labelsize=6)
        ax.grid(alpha=0.3)
        if c % cols == 0:
            ax.set_ylabel("precision", fontsize=7)
        if c >= n - cols:
            ax.set_xlabel("recall", fontsize=7)
    fig.suptitle(f"precision / recall at IoU {result.iou_threshold:g}", fontsize=10)
    fig.tight_layout()
    return fig


def plot_pr_curves(result: EvalResult, out_png: str | Path) -> Path:
    """Save one precision/recall subplot per class (grid) to ``out_png``."""
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    pr_figure(result).savefig(out_png)
    return out_png


# --------------------------------------------------------------------------- error analysis
@dataclass(frozen=True)
class ImageErrors:
    """One image's detections (above the score threshold) and objects, classified."""

    keep: np.ndarray  # (K,) bool: detections at or above the score threshold
    kind: np.ndarray  # (K',) str: "tp", "ignored" or one of ERROR_KINDS, kept detections only
    missed: np.ndarray  # (N,) bool: non-difficult objects no kept detection found


def classify_image(
    record: ImageRecord,
    detection: Mapping[str, np.ndarray],
    iou: float = 0.5,
    score_threshold: float = 0.5,
    background_iou: float = 0.1,
) -> ImageErrors:
    """Classify each detection at or above ``score_threshold`` in one image.

    VOC matching at ``iou`` decides true positives, ignored (difficult) and duplicates
    (same class, IoU >= ``iou`` with an object already taken). The other false positives,
    first rule that applies: ``wrong_class`` (IoU >= ``iou`` with an object of another
    class), ``localization`` (same class, ``background_iou`` <= IoU < ``iou``), ``both``
    (another class, ``background_iou`` <= IoU < ``iou``: TIDE's "Both" error),
    ``background`` (IoU < ``background_iou`` with every object).
    """
    boxes = np.asarray(detection["boxes"], dtype=np.float64).reshape(-1, 4)  # (K, 4) xyxy pixels
    scores = np.asarray(detection["scores"], dtype=np.float64).reshape(-1)
    labels = np.asarray(detection["labels"], dtype=np.int64).reshape(-1)
    keep = scores >= score_threshold
    boxes, scores, labels = boxes[keep], scores[keep], labels[keep]

    match = match_image(record.boxes, record.labels, record.difficult, boxes, scores, labels, iou)
    overlaps = iou_matrix(boxes, record.boxes)  # (K', N)
    other = labels[:, None] != record.labels[None, :]
    other_best = np.where(other, overlaps, 0.0).max(axis=1, initial=0.0)  # (K',)
    same_best = match.iou  # (K',) best IoU with an object of the detection's class

    kind = np.full(len(labels), "background", dtype="<U12")
    is_fp = match.status == 0
    rules = [
        ("duplicate", same_best >= iou),  # a false positive that reached `iou` found it taken
        ("wrong_class", other_best >= iou),
        ("localization", same_best >= background_iou),
        ("both", other_best >= background_iou),
    ]
    undecided = is_fp.copy()
    for name, cond in rules:
        hit = undecided & cond
        kind[hit] = name
        undecided &= ~hit
    kind[match.status == TRUE_POSITIVE] = "tp"
    kind[match.status == IGNORED] = "ignored"

    found = np.zeros(len(record.labels), dtype=bool)
    found[match.gt_index[match.status == TRUE_POSITIVE]] = True
    missed = ~found & ~record.difficult
    return ImageErrors(keep=keep, kind=kind, missed=missed)


def _empty_counts() -> dict[str, int]:
    return dict.fromkeys(("true_positives", "false_positives", *ERROR_KINDS, "missed", "ignored"), 0)


def confusion_summary(
    records: Sequence[ImageRecord],
    detections: Sequence[Mapping[str, np.ndarray]],
    class_names: Sequence[str],
    iou: float = 0.5,
    score_threshold: float = 0.5,
    background_iou: float = 0.1,
) -> dict:
    """Counts of true positives, misses and each kind of false positive (see
    ``classify_image``), overall and under ``"per_class"`` (a false positive counts for
    its detected class, a miss for the object's class)."""
    if len(records) != len(detections):
        raise ValueError(f"confusion_summary: {len(records)} records but {len(detections)} detection sets")
    total = _empty_counts()
    per_class = {name: _empty_counts() for name in class_names}
    for rec, det in zip(records, detections):
        err = classify_image(rec, det, iou, score_threshold, background_iou)
        kept_labels = np.asarray(det["labels"], dtype=np.int64).reshape(-1)[err.keep]
        for name, key in [("tp", "true_positives"), ("ignored", "ignored")] + [(k, k) for k in ERROR_KINDS]:
            counts = np.bincount(kept_labels[err.kind == name], minlength=len(class_names))
            total[key] += int(counts.sum())
            for c in np.flatnonzero(counts):
                per_class[class_names[c]][key] += int(counts[c])
        missed = np.bincount(rec.labels[err.missed], minlength=len(class_names))
        total["missed"] += int(missed.sum())
        for c in np.flatnonzero(missed):
            per_class[class_names[c]]["missed"] += int(missed[c])
    for counts in [total, *per_class.values()]:
        counts["false_positives"] = sum(counts[k] for k in ERROR_KINDS)
    return {**total, "per_class": per_class}


def worst_images(
    records: Sequence[ImageRecord],
    detections: Sequence[Mapping[str, np.ndarray]],
    k: int,
    score_threshold: float = 0.5,
    iou: float = 0.5,
) -> list[int]:
    """Indices of the (at most) ``k`` images with the most misses + false positives at
    ``score_threshold``, worst first; ties keep dataset order; error-free images are left out."""
    if len(records) != len(detections):
        raise ValueError(f"worst_images: {len(records)} records but {len(detections)} detection sets")
    errors = np.zeros(len(records), dtype=np.int64)
    for i, (rec, det) in enumerate(zip(records, detections)):
        err = classify_image(rec, det, iou, score_threshold)
        fp = np.isin(err.kind, ERROR_KINDS).sum()
        errors[i] = int(err.missed.sum()) + int(fp)
    order = np.argsort(-errors, kind="stable")
    return [int(i) for i in order[:k] if errors[i] > 0]


# --------------------------------------------------------------------------- drawing
def _draw_labelled_boxes(
    image: np.ndarray, boxes: np.ndarray, texts: Sequence[str], color: tuple[int, int, int]
) -> np.ndarray:
    """Draw (K, 4) xyxy pixel boxes with a caption each on an (H, W, 3) uint8 RGB image, in place.

    Local on purpose: the shared ``data.check.draw_boxes`` draws one colour per class,
    and here colour means ground truth vs detection.
    """
    h, w = image.shape[:2]
    thick = max(1, round(min(h, w) / 300))
    scale = max(0.35, min(h, w) / 900)
    for (x1, y1, x2, y2), text in zip(np.round(boxes).astype(int).tolist(), texts):
        cv2.rectangle(image, (x1, y1), (x2, y2), color, thick)
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
        ty = max(th + base, y1)
        cv2.rectangle(image, (x1, ty - th - base), (x1 + tw, ty), color, -1)
        cv2.putText(image, text, (x1, ty - base), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA)
    return image


def draw_worst_images(
    records: Sequence[ImageRecord],
    detections: Sequence[Mapping[str, np.ndarray]],
    class_names: Sequence[str],
    out_dir: str | Path,
    k: int,
    image_loader: Callable[[ImageRecord], np.ndarray],
    score_threshold: float = 0.5,
) -> list[Path]:
    """Write the ``k`` worst images (see ``worst_images``) as PNG files into ``out_dir``:
    ground truth in green with its class, detections at or above ``score_threshold`` in red
    with class and score. ``image_loader(record)`` returns (H, W, 3) uint8 RGB."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for rank, i in enumerate(worst_images(records, detections, k, score_threshold)):
        rec, det = records[i], detections[i]
        image = np.ascontiguousarray(image_loader(rec), dtype=np.uint8).copy()
        gt_texts = [class_names[c] + (" (difficult)" if d else "") for c, d in zip(rec.labels, rec.difficult)]
        _draw_labelled_boxes(image, rec.boxes, gt_texts, GT_COLOR)
        scores = np.asarray(det["scores"], dtype=np.float64).reshape(-1)
        keep = scores >= score_threshold
        boxes = np.asarray(det["boxes"], dtype=np.float64).reshape(-1, 4)[keep]
        labels = np.asarray(det["labels"], dtype=np.int64).reshape(-1)[keep]
        det_texts = [f"{class_names[c]} {s:.2f}" for c, s in zip(labels, scores[keep])]
        _draw_labelled_boxes(image, boxes, det_texts, DET_COLOR)
        stem = rec.path.stem if rec.path is not None else str(rec.image_id)
        path = out_dir / f"{rank:03d}_{stem}.png"
        if not cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR)):
            raise OSError(f"{path}: could not write the image")
        written.append(path)
    return written
