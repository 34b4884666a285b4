"""TIDE error analysis (Bolya et al., "TIDE: A General Toolbox for Identifying Object
Detection Errors", ECCV 2020), ported from the paper's own code (the ``tidecv`` package,
``quantify.py``, ``ap.py``, ``errors/``) and checked against it (``benchmarks/tide_check.py``,
``tests/test_tide.py``).

Every detection that is not a true positive at the foreground IoU ``pos`` (0.5) gets exactly
one error, tested in this order (``IoU`` with any ground truth, ``IoU_cls`` with those of its
own class, ``bg`` the background IoU 0.1):

- ``Loc``  (localization): ``bg <= max IoU_cls <= pos``: right class, box not good enough;
- ``Cls``  (classification): ``max IoU >= pos`` with an object of another class;
- ``Dupe`` (duplicate): ``IoU_cls >= pos`` with an object another detection already took;
- ``Bkg``  (background): ``max IoU <= bg``: nothing there;
- ``Both`` (classification and localization): anything else;

and every object that no detection matched and no ``Loc``/``Cls`` error could claim is
``Miss``. The dAP of an error type is the AP gained by fixing all its errors and nothing
else: a ``Loc`` or ``Cls`` error becomes the true positive of its object (only the
highest-scored error per object; the others are removed), ``Dupe``, ``Bkg`` and ``Both``
detections are removed, a ``Miss`` object is removed from the ground truth. The two special
errors: ``FalsePos``, every false positive scored below every true positive (perfect
precision at the same recall); ``FalseNeg``, every unmatched object removed (perfect recall
at the same precision).

What TIDE's AP is, exactly as ``tidecv`` computes it (so its numbers are comparable with the
paper's, and differ slightly from ``coco_ap50``):
- per class, COCO's 101-point interpolated AP at the single IoU ``pos``; the mean over the
  classes that have an object or a detection (a class with detections and no object counts 0);
- crowd objects (``ImageRecord.difficult``: COCO ``iscrowd``, VOC ``difficult``) are ignore
  regions: an unmatched detection of their class covering more than ``pos`` of its own area
  with one is neither true nor false positive;
- at most ``max_dets`` (100) detections per image, the best scored;
- a negative dAP of a main error (interpolation bins) is reported as 0; special errors are not clipped.
Values are fractions in [0, 1] (tidecv prints them times 100).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from onestage.boxes import box_iou
from onestage.data.base import ImageRecord

MAIN_ERRORS: tuple[str, ...] = ("Cls", "Loc", "Both", "Dupe", "Bkg", "Miss")  # tidecv's order
SPECIAL_ERRORS: tuple[str, ...] = ("FalsePos", "FalseNeg")
ERROR_DESCRIPTIONS: dict[str, str] = {
    "Cls": "right box, wrong class",
    "Loc": "right class, box IoU between the background and foreground thresholds",
    "Both": "wrong class and poor box",
    "Dupe": "second detection of an object already found",
    "Bkg": "detection on background (IoU <= background threshold with every object)",
    "Miss": "object no detection found or could claim",
    "FalsePos": "AP with every false positive scored below every true positive",
    "FalseNeg": "AP with every missed object removed",
}

_TP, _FP, _IGNORED = 1, 0, -1
_NO_ERROR = -1
_KIND = {name: i for i, name in enumerate(MAIN_ERRORS)}  # error name -> code


@dataclass
class TideResult:
    """What ``tide_analysis`` returns; every AP a fraction in [0, 1]."""

    class_names: list[str]
    pos_threshold: float
    bg_threshold: float
    ap: float  # TIDE's mAP at pos_threshold
    main: dict[str, float]  # dAP per main error (MAIN_ERRORS)
    special: dict[str, float]  # dAP per special error (SPECIAL_ERRORS)
    counts: dict[str, int]  # number of errors of each main type
    class_ap: np.ndarray = field(repr=False)  # (C,) AP per class (0 for a class with no object)
    class_main: dict[str, np.ndarray] = field(repr=False)  # error -> (C,) dAP per class
    class_special: dict[str, np.ndarray] = field(repr=False)  # error -> (C,)
    class_counts: dict[str, np.ndarray] = field(repr=False)  # error -> (C,) counts
    num_gt: np.ndarray = field(repr=False)  # (C,) non-crowd objects


# ----------------------------------------------------------------------------- AP
def tide_ap(tp: np.ndarray, num_gt: int) -> float:
    """COCO's 101-point AP of one class, as ``tidecv.ap.APDataObject.get_ap`` (as a fraction).

    tp: (K,) bool, the detections already in ranking order. No objects: 0.
    """
    if num_gt <= 0 or len(tp) == 0:
        return 0.0
    tp = np.asarray(tp, dtype=bool)
    num_true = np.cumsum(tp)
    precision = num_true / np.arange(1, len(tp) + 1)
    recall = num_true / num_gt
    envelope = np.maximum.accumulate(precision[::-1])[::-1]  # remove the dips, as COCOeval
    # recall points k / 100 exactly as tidecv makes them (np.linspace gives 0.15000000000000002
    # for 0.15, which moves a point when a class's recall is exactly 0.15)
    idx = np.searchsorted(recall, np.arange(101) / 100, side="left")  # (101,)
    sampled = np.where(idx < len(tp), envelope[np.minimum(idx, len(tp) - 1)], 0.0)
    return float(sampled.mean())


def _class_aps(cls: np.ndarray, score: np.ndarray, tp: np.ndarray, order: np.ndarray,
               num_gt: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(AP per class (C,), whether the class counts in the mean (C,)).

    The points are ranked by descending score, ties by ``order`` (tidecv's list order,
    which decides ties through Python's stable sort).
    """
    aps = np.zeros(num_classes)
    present = num_gt > 0
    rank = np.lexsort((order, -score))
    cls, tp = cls[rank], tp[rank]
    for c in range(num_classes):
        mine = cls == c
        if mine.any():
            present[c] = True
        aps[c] = tide_ap(tp[mine], int(num_gt[c]))
    return aps, present


def _mean(aps: np.ndarray, present: np.ndarray) -> float:
    return float(aps[present].mean()) if present.any() else 0.0


# ----------------------------------------------------------------------------- matching
@dataclass
class _Tables:
    """Every kept detection and every non-crowd object of the split, after matching."""

    # detections, in tidecv's order (image by image, descending score within an image)
    d_cls: list[np.ndarray] = field(default_factory=list)  # (K,) int
    d_score: list[np.ndarray] = field(default_factory=list)  # (K,) float64
    d_status: list[np.ndarray] = field(default_factory=list)  # (K,) _TP / _FP / _IGNORED
    d_error: list[np.ndarray] = field(default_factory=list)  # (K,) error code or _NO_ERROR
    d_gt: list[np.ndarray] = field(default_factory=list)  # (K,) global object index of a Loc/Cls error, else -1
    # objects
    g_cls: list[np.ndarray] = field(default_factory=list)  # (N,) int
    g_used: list[np.ndarray] = field(default_factory=list)  # (N,) bool: matched by a detection

    def cat(self, name: str, dtype: Any) -> np.ndarray:
        parts = getattr(self, name)
        return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)


def _greedy_match(cls_iou: np.ndarray, pos: float) -> tuple[np.ndarray, np.ndarray]:
    """tidecv's matching: detections in score order each take the free same-class object of
    highest IoU (first on ties) when that IoU >= pos. cls_iou: (K, N) -> (K,) bool, (N,) bool."""
    buf = cls_iou.copy()
    det_used = np.zeros(len(buf), dtype=bool)
    gt_used = np.zeros(buf.shape[1], dtype=bool)
    if buf.shape[1] == 0:
        return det_used, gt_used
    # buf only loses entries, so a detection below pos with every object at the start never matches
    for k in np.flatnonzero(buf.max(1) >= pos):
        j = int(np.argmax(buf[k]))
        if buf[k, j] >= pos:
            det_used[k] = gt_used[j] = True
            buf[:, j] = 0.0
    return det_used, gt_used


def _crowd_ignored(boxes: np.ndarray, labels: np.ndarray, det_used: np.ndarray, crowd_boxes: np.ndarray,
                   crowd_labels: np.ndarray, pos: float) -> np.ndarray:
    """(K,) bool: unmatched detections inside a crowd region of their class (intersection over
    the detection's own area > pos, pycocotools' crowd IoU)."""
    if len(crowd_boxes) == 0 or len(boxes) == 0:
        return np.zeros(len(boxes), dtype=bool)
    b = torch.from_numpy(boxes)
    c = torch.from_numpy(crowd_boxes)
    lt = torch.maximum(b[:, None, :2], c[None, :, :2])
    rb = torch.minimum(b[:, None, 2:], c[None, :, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)  # (K, R)
    area = (b[:, 2:] - b[:, :2]).clamp(min=0).prod(-1)[:, None]  # (K, 1)
    crowd_iou = torch.where(area > 0, inter / area.clamp(min=1e-300), torch.zeros_like(inter)).numpy()
    same = labels[:, None] == crowd_labels[None, :]
    return ~det_used & np.any((crowd_iou > pos) & same, axis=1)


def _classify_errors(iou: np.ndarray, same: np.ndarray, gt_used: np.ndarray, pos: float, bg: float
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Error code and claimed object (Loc / Cls; else -1) of every detection (tidecv's
    ``TIDERun._eval_image`` tests, in its order). iou, same: (K, N) with N > 0."""
    cls_iou = iou * same
    noncls_iou = iou * ~same
    used_cls = iou * same * gt_used[None, :]
    k_all = np.arange(len(iou))
    loc_j, cls_j = cls_iou.argmax(1), noncls_iou.argmax(1)
    loc_v, cls_v = cls_iou[k_all, loc_j], noncls_iou[k_all, cls_j]
    is_loc = (bg <= loc_v) & (loc_v <= pos)
    is_cls = ~is_loc & (cls_v >= pos)
    is_dupe = ~is_loc & ~is_cls & (used_cls.max(1) >= pos)
    is_bkg = ~is_loc & ~is_cls & ~is_dupe & (iou.max(1) <= bg)
    error = np.full(len(iou), _KIND["Both"])
    error[is_loc], error[is_cls] = _KIND["Loc"], _KIND["Cls"]
    error[is_dupe], error[is_bkg] = _KIND["Dupe"], _KIND["Bkg"]
    claimed = np.where(is_loc, loc_j, np.where(is_cls, cls_j, -1))
    return error, claimed


def _match_image(tables: _Tables, rec: ImageRecord, det: Mapping[str, np.ndarray], gt_offset: int,
                 pos: float, bg: float, max_dets: int) -> int:
    """Match one image, append its rows to ``tables``; returns its number of non-crowd objects."""
    crowd = np.asarray(rec.difficult, dtype=bool)
    gt_boxes = np.asarray(rec.boxes, dtype=np.float64).reshape(-1, 4)[~crowd]  # (N, 4) xyxy pixels
    gt_labels = np.asarray(rec.labels, dtype=np.int64)[~crowd]  # (N,)
    scores = np.asarray(det["scores"], dtype=np.float64).reshape(-1)
    order = np.argsort(-scores, kind="stable")[:max_dets]  # tidecv: list.sort, then the first max_dets
    boxes = np.asarray(det["boxes"], dtype=np.float64).reshape(-1, 4)[order]  # (K, 4) xyxy pixels
    labels = np.asarray(det["labels"], dtype=np.int64).reshape(-1)[order]  # (K,)
    scores = scores[order]
    iou = box_iou(torch.from_numpy(boxes), torch.from_numpy(gt_boxes), dtype=torch.float64).numpy()  # (K, N)
    same = labels[:, None] == gt_labels[None, :]
    det_used, gt_used = _greedy_match(iou * same, pos)
    ignored = _crowd_ignored(boxes, labels, det_used, np.asarray(rec.boxes, np.float64).reshape(-1, 4)[crowd],
                             np.asarray(rec.labels, np.int64)[crowd], pos)
    status = np.where(det_used, _TP, np.where(ignored, _IGNORED, _FP))
    if len(gt_boxes) == 0:  # nothing to be confused with: every false positive is background
        error, claimed = np.full(len(boxes), _KIND["Bkg"]), np.full(len(boxes), -1)
    else:
        error, claimed = _classify_errors(iou, same, gt_used, pos, bg)
    error = np.where(det_used, _NO_ERROR, error)
    claimed = np.where(det_used | (claimed < 0), -1, claimed + gt_offset)
    tables.d_cls.append(labels)
    tables.d_score.append(scores)
    tables.d_status.append(status)
    tables.d_error.append(error)
    tables.d_gt.append(claimed)
    tables.g_cls.append(gt_labels)
    tables.g_used.append(gt_used)
    return len(gt_boxes)


# ----------------------------------------------------------------------------- fixing
@dataclass(frozen=True)
class _Split:
    """The matched split as flat arrays (detections in tidecv's order)."""

    d_cls: np.ndarray  # (D,)
    d_score: np.ndarray  # (D,)
    d_status: np.ndarray  # (D,)
    d_error: np.ndarray  # (D,)
    d_gt: np.ndarray  # (D,)
    g_cls: np.ndarray  # (G,)
    g_used: np.ndarray  # (G,)
    g_fixer: np.ndarray  # (G,) detection index whose Loc/Cls fix claims the object, or -1
    g_missed: np.ndarray  # (G,) bool: Miss errors
    num_classes: int

    @property
    def num_gt(self) -> np.ndarray:
        return np.bincount(self.g_cls, minlength=self.num_classes)


def _fixers(d_score: np.ndarray, d_error: np.ndarray, d_gt: np.ndarray, g_used: np.ndarray) -> np.ndarray:
    """(G,) per object, the Loc/Cls error that its fix turns into its true positive: the
    highest scored among those claiming a still-free object (the first on ties, as
    ``BestGTMatch`` sees them in order)."""
    fixer = np.full(len(g_used), -1)
    best = np.full(len(g_used), -np.inf)
    for k in np.flatnonzero(d_gt >= 0):
        j = d_gt[k]
        if not g_used[j] and best[j] < d_score[k]:
            best[j], fixer[j] = d_score[k], k
    return fixer


def _baseline(split: _Split) -> tuple[np.ndarray, np.ndarray]:
    """Per-class AP and presence of the data as matched (ignored detections left out)."""
    keep = split.d_status != _IGNORED
    order = np.arange(len(split.d_cls))[keep]
    return _class_aps(split.d_cls[keep], split.d_score[keep], split.d_status[keep] == _TP, order,
                      split.num_gt, split.num_classes)


def _fixed(split: _Split, kind: str | None, *, special: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-class AP with the errors of ``kind`` fixed (tidecv ``TIDERun.fix_errors``), or
    with a special error fixed. The list tidecv ranks holds the error points first, then the
    true positives: that order decides score ties."""
    n = len(split.d_cls)
    idx = np.arange(n)
    cls, score = split.d_cls.copy(), split.d_score.copy()
    tp = split.d_status == _TP
    keep = split.d_status != _IGNORED  # an ignored detection has no point until a fix gives it one
    num_gt = split.num_gt.copy()
    code = _KIND.get(kind, -99) if kind is not None else -99
    fixing = split.d_error == code
    if kind in ("Loc", "Cls"):
        claimed = split.d_gt
        fixes = fixing & (claimed >= 0)
        wins = np.zeros(n, dtype=bool)
        wins[fixes] = split.g_fixer[claimed[fixes]] == idx[fixes]
        keep = np.where(fixing, wins, keep)
        tp = tp | wins
        if kind == "Cls":  # the fixed detection takes its object's class
            cls = np.where(wins, split.g_cls[np.maximum(claimed, 0)], cls)
    elif kind in ("Both", "Dupe", "Bkg"):
        keep = keep & ~fixing
    elif kind == "Miss":
        num_gt -= np.bincount(split.g_cls[split.g_missed], minlength=split.num_classes)
    if special == "FalsePos":
        score = np.where(tp, 1.0, 0.0)
    elif special == "FalseNeg":
        num_gt -= np.bincount(split.g_cls[~split.g_used], minlength=split.num_classes)
    group = np.where(split.d_status == _TP, 1, 0)  # error points first, then true positives
    order = group * n + idx
    return _class_aps(cls[keep], score[keep], tp[keep], order[keep], num_gt, split.num_classes)


# ----------------------------------------------------------------------------- entry point
def _build_split(records: Sequence[ImageRecord], detections: Sequence[Mapping[str, np.ndarray]],
                 num_classes: int, pos: float, bg: float, max_dets: int) -> _Split:
    if len(records) != len(detections):
        raise ValueError(f"tide_analysis: {len(records)} records but {len(detections)} detection sets")
    tables = _Tables()
    offset = 0
    for rec, det in zip(records, detections):
        offset += _match_image(tables, rec, det, offset, pos, bg, max_dets)
    d_score = tables.cat("d_score", np.float64)
    d_error = tables.cat("d_error", np.int64)
    d_gt = tables.cat("d_gt", np.int64)
    g_cls, g_used = tables.cat("g_cls", np.int64), tables.cat("g_used", bool)
    d_cls = tables.cat("d_cls", np.int64)
    for what, lab in (("detection", d_cls), ("ground-truth", g_cls)):
        if lab.size and (lab.min() < 0 or lab.max() >= num_classes):
            raise ValueError(f"tide_analysis: {what} labels must lie in [0, {num_classes})")
    fixer = _fixers(d_score, d_error, d_gt, g_used)
    return _Split(d_cls=d_cls, d_score=d_score, d_status=tables.cat("d_status", np.int64), d_error=d_error,
                  d_gt=d_gt, g_cls=g_cls, g_used=g_used, g_fixer=fixer, g_missed=~g_used & (fixer < 0),
                  num_classes=num_classes)


def tide_analysis(
    records: Sequence[ImageRecord],
    detections: Sequence[Mapping[str, np.ndarray]],
    class_names: Sequence[str],
    *,
    pos_threshold: float = 0.5,
    bg_threshold: float = 0.1,
    max_dets: int = 100,
) -> TideResult:
    """TIDE's error breakdown of ``detections`` against ``records`` (the Evaluator's inputs).

    records: one ``ImageRecord`` per image (boxes xyxy pixels, labels in [0, C), difficult =
    crowd); detections: per image ``boxes`` (K, 4) xyxy original-image pixels, ``scores``
    (K,), ``labels`` (K,) in [0, C).
    """
    if not 0 < bg_threshold <= pos_threshold <= 1:
        raise ValueError(f"tide_analysis: need 0 < bg_threshold <= pos_threshold <= 1, "
                         f"got {bg_threshold} and {pos_threshold}")
    num_classes = len(class_names)
    split = _build_split(records, detections, num_classes, pos_threshold, bg_threshold, max_dets)
    base_aps, base_present = _baseline(split)
    ap = _mean(base_aps, base_present)
    main: dict[str, float] = {}
    class_main: dict[str, np.ndarray] = {}
    for kind in MAIN_ERRORS:
        aps, present = _fixed(split, kind)
        main[kind] = max(_mean(aps, present) - ap, 0.0)
        class_main[kind] = np.maximum(aps - base_aps, 0.0)
    special: dict[str, float] = {}
    class_special: dict[str, np.ndarray] = {}
    for kind in SPECIAL_ERRORS:
        aps, present = _fixed(split, None, special=kind)
        special[kind] = _mean(aps, present) - ap
        class_special[kind] = aps - base_aps
    class_counts = {kind: _count(split, kind) for kind in MAIN_ERRORS}
    return TideResult(
        class_names=list(class_names), pos_threshold=pos_threshold, bg_threshold=bg_threshold, ap=ap,
        main=main, special=special, counts={k: int(v.sum()) for k, v in class_counts.items()},
        class_ap=base_aps, class_main=class_main, class_special=class_special, class_counts=class_counts,
        num_gt=split.num_gt,
    )


def tide_of_results(records: Sequence[ImageRecord], gt: Mapping[str, Any], results: Sequence[Mapping[str, Any]],
                    class_names: Sequence[str]) -> TideResult:
    """TIDE of a COCO results list (``onestage eval --results``) against ``records``.

    gt: ``coco.records_to_coco_gt(records, class_names, ...)``, whose images follow the
    records and whose categories follow the classes: it maps the results' image and
    category ids back to records and labels.
    """
    image_index = {img["id"]: i for i, img in enumerate(gt["images"])}
    label_of = {cat["id"]: c for c, cat in enumerate(gt["categories"])}
    per_image: list[list[Mapping[str, Any]]] = [[] for _ in records]
    for r in results:
        per_image[image_index[r["image_id"]]].append(r)
    dets = []
    for rows in per_image:
        xywh = np.array([r["bbox"] for r in rows], dtype=np.float64).reshape(-1, 4)
        dets.append({"boxes": np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1),  # (K, 4) xyxy pixels
                     "scores": np.array([r["score"] for r in rows], dtype=np.float64),
                     "labels": np.array([label_of[r["category_id"]] for r in rows], dtype=np.int64)})
    return tide_analysis(records, dets, class_names)


def _count(split: _Split, kind: str) -> np.ndarray:
    """(C,) errors of ``kind`` per class: a detection's class, or a missed object's."""
    if kind == "Miss":
        return np.bincount(split.g_cls[split.g_missed], minlength=split.num_classes)
    return np.bincount(split.d_cls[split.d_error == _KIND[kind]], minlength=split.num_classes)


# ----------------------------------------------------------------------------- output
def tide_to_json(result: TideResult) -> dict[str, Any]:
    """JSON-ready: overall and per-class dAP (fractions), error counts, thresholds."""
    return {
        "pos_threshold": result.pos_threshold,
        "bg_threshold": result.bg_threshold,
        "ap": result.ap,
        "main": dict(result.main),
        "special": dict(result.special),
        "counts": dict(result.counts),
        "per_class": [
            {
                "name": name,
                "num_gt": int(result.num_gt[c]),
                "ap": float(result.class_ap[c]),
                "main": {k: float(v[c]) for k, v in result.class_main.items()},
                "special": {k: float(v[c]) for k, v in result.class_special.items()},
                "counts": {k: int(v[c]) for k, v in result.class_counts.items()},
            }
            for c, name in enumerate(result.class_names)
        ],
    }


def format_tide(result: TideResult) -> str:
    """The TIDE table: dAP (in AP points x 100, as the paper prints them) and error counts."""
    names = list(MAIN_ERRORS) + list(SPECIAL_ERRORS)
    head = f"TIDE (foreground IoU {result.pos_threshold:g}, background IoU {result.bg_threshold:g}): " \
           f"AP {100 * result.ap:.2f}"
    lines = [head, f"{'':<7}" + "".join(f"{n:>9}" for n in names)]
    values = [result.main[n] for n in MAIN_ERRORS] + [result.special[n] for n in SPECIAL_ERRORS]
    lines.append(f"{'dAP':<7}" + "".join(f"{100 * v:>9.2f}" for v in values))
    lines.append(f"{'count':<7}" + "".join(f"{result.counts[n]:>9d}" for n in MAIN_ERRORS))
    return "\n".join(lines)


def add_tide(result: Any, records: Sequence[ImageRecord], detections: Sequence[Mapping[str, np.ndarray]],
             class_names: Sequence[str], out_dir: Path | None = None, quiet: bool = False) -> TideResult:
    """TIDE for ``onestage eval`` and the end of training: attach it to the ``EvalResult``
    (``result_to_json`` then carries it into ``--json``), print its table unless ``quiet``,
    and with ``out_dir`` write ``result.json`` there: the whole result as JSON (metrics,
    per-class AP, TIDE), which the HTML report reads."""
    from onestage.eval.evaluator import result_to_json

    tide = tide_analysis(records, detections, class_names)
    result.tide = tide
    if not quiet:
        print(format_tide(tide))
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "result.json").write_text(json.dumps(result_to_json(result), indent=2))
    return tide
