"""Stability error of video detection (Zhang & Wang, "On the Stability of Video Detection
and Tracking", 2016, arXiv 1611.06467, section 3), exactly as issue 18 defines it.

In every frame, detections are matched to the ground truth of their class VOC style
(``eval.voc.match_image``: descending score, each detection to the object it overlaps most,
a true positive at IoU >= 0.5 when that object is still free). The matched objects are then
grouped by ground-truth track (a *trajectory*: one object of one class in one video, over
the frames where it is annotated, in frame order). For a score threshold s an object is
*detected* in a frame when the detection that matched it has score >= s. Per trajectory k:

- fragment ratio ``f_k / (t_k - 1)``: t_k annotated frames, f_k changes of status
  (detected <-> missed) between consecutive annotated frames;
- centre error ``std(e_x) + std(e_y)`` with ``e_x = (x_p - x_g) / w_g``,
  ``e_y = (y_p - y_g) / h_g`` (box centres), over the frames where it is detected;
- scale-and-ratio error ``std(e_s) + std(e_r)`` with ``e_s = sqrt(w_p h_p / (w_g h_g))``,
  ``e_r = (w_p / h_p) / (w_g / h_g)``, over the same frames.

Standard deviations are population ones (ddof=0), as the paper's ``std``: a constant offset
or a constant scale factor costs nothing (that is accuracy, not stability).

Per class c: E_F, E_C, E_R are the means over the class's trajectories of those values, and
Phi = E_F + E_C + E_R. The dataset figure is the mean over classes (as mAP) of each error,
classes where it is undefined left out; its Phi is the sum of the three means.

Conventions where the paper is silent (also in README.md, "Video"):

- a trajectory of length 1 has no transition: it is left out of E_F (f/(t-1) is 0/0);
- a trajectory detected in fewer than 2 frames has no spread to measure: it is left out of
  E_C and E_R (a std of one value would be a free 0). A trajectory never detected still
  counts in E_F (it is steadily missed: 0 changes), and its misses lower recall/mAP;
- a frame where an object is missed contributes to f_k only; frames without any object
  contribute nothing; objects marked ``difficult`` (MOT ``conf`` 0) form no trajectory;
- a class with no trajectory (or none long enough) has NaN for that error and is left out of
  the class mean; a dataset where every class is NaN reports NaN.

Matching once with every detection gives every threshold's matching: taking detections in
descending score order, the matches of the detections with score >= s are exactly those of
the full run restricted to them. So each object keeps the score of the detection that
matched it, and a threshold is a comparison (``MatchedObjects.score >= s``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from onestage.eval.voc import TRUE_POSITIVE, match_image

# Score thresholds the errors are averaged over (issue 18): 0.1, 0.2, ..., 0.9.
THRESHOLDS: tuple[float, ...] = tuple(round(0.1 * k, 1) for k in range(1, 10))
ERROR_NAMES: tuple[str, ...] = ("fragment", "center", "scale_ratio", "total")


@dataclass(frozen=True)
class VideoFrame:
    """One frame's ground truth and detections (all boxes xyxy pixels of the frame)."""

    video: str
    frame: int  # index in the video (any increasing number: only the order is used)
    gt_boxes: np.ndarray  # (N, 4)
    gt_labels: np.ndarray  # (N,) in [0, C)
    gt_track_ids: np.ndarray  # (N,) int: the object's track id, unique within the video
    det_boxes: np.ndarray  # (K, 4)
    det_scores: np.ndarray  # (K,)
    det_labels: np.ndarray  # (K,)
    gt_difficult: np.ndarray | None = None  # (N,) bool: neither a trajectory nor a false positive


@dataclass(frozen=True)
class MatchedObjects:
    """One row per annotated (non-difficult) object per frame, rows sorted by (track, frame)."""

    track: np.ndarray  # (R,) int64 index into track_keys
    frame: np.ndarray  # (R,) int64
    gt: np.ndarray  # (R, 4) float64 xyxy
    det: np.ndarray  # (R, 4) float64 xyxy of the matched detection; NaN when none matched
    score: np.ndarray  # (R,) float64 score of the matched detection; -inf when none matched
    track_keys: list[tuple[str, int]]  # (video, track id) of each trajectory
    track_labels: np.ndarray  # (T,) int64 class of each trajectory


def match_frames(frames: Sequence[VideoFrame], iou_threshold: float = 0.5) -> MatchedObjects:
    """Match every frame once (VOC greedy, see the module docstring) and flatten by track.

    A track id whose class changes inside a video makes one trajectory per class.
    """
    keys: dict[tuple[str, int, int], int] = {}
    rows_track, rows_frame, rows_gt, rows_det, rows_score = [], [], [], [], []
    for f in frames:
        gt_boxes = np.asarray(f.gt_boxes, np.float64).reshape(-1, 4)
        gt_labels = np.asarray(f.gt_labels, np.int64).reshape(-1)
        ids = np.asarray(f.gt_track_ids, np.int64).reshape(-1)
        n = len(gt_boxes)
        difficult = np.zeros(n, bool) if f.gt_difficult is None else np.asarray(f.gt_difficult, bool).reshape(-1)
        if not (len(gt_labels) == len(ids) == len(difficult) == n):
            raise ValueError(f"video {f.video!r} frame {f.frame}: {n} boxes, {len(gt_labels)} labels, "
                             f"{len(ids)} track ids, {len(difficult)} difficult flags; they must be equal")
        det_boxes = np.asarray(f.det_boxes, np.float64).reshape(-1, 4)
        det_scores = np.asarray(f.det_scores, np.float64).reshape(-1)
        m = match_image(gt_boxes, gt_labels, difficult, det_boxes, det_scores, f.det_labels, iou_threshold)
        tp = np.flatnonzero(m.status == TRUE_POSITIVE)  # at most one per object
        det = np.full((n, 4), np.nan)
        score = np.full(n, -np.inf)
        det[m.gt_index[tp]] = det_boxes[tp]
        score[m.gt_index[tp]] = det_scores[tp]
        for j in np.flatnonzero(~difficult):
            rows_track.append(keys.setdefault((f.video, int(ids[j]), int(gt_labels[j])), len(keys)))
        keep = ~difficult
        rows_frame.append(np.full(int(keep.sum()), f.frame, np.int64))
        rows_gt.append(gt_boxes[keep])
        rows_det.append(det[keep])
        rows_score.append(score[keep])
    track = np.asarray(rows_track, np.int64)
    frame = np.concatenate(rows_frame) if rows_frame else np.zeros(0, np.int64)
    order = np.lexsort((frame, track))
    labels = np.zeros(len(keys), np.int64)
    for (_video, _tid, label), k in keys.items():
        labels[k] = label
    return MatchedObjects(
        track=track[order],
        frame=frame[order],
        gt=(np.concatenate(rows_gt) if rows_gt else np.zeros((0, 4)))[order],
        det=(np.concatenate(rows_det) if rows_det else np.zeros((0, 4)))[order],
        score=(np.concatenate(rows_score) if rows_score else np.zeros(0))[order],
        track_keys=[(v, t) for v, t, _ in keys],
        track_labels=labels,
    )


def box_errors(det: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """(R, 4) xyxy detections x (R, 4) xyxy ground truth -> (R, 4) columns e_x, e_y, e_s, e_r."""
    wg, hg = gt[:, 2] - gt[:, 0], gt[:, 3] - gt[:, 1]
    wp, hp = det[:, 2] - det[:, 0], det[:, 3] - det[:, 1]
    e_x = ((det[:, 0] + det[:, 2]) - (gt[:, 0] + gt[:, 2])) / (2 * wg)
    e_y = ((det[:, 1] + det[:, 3]) - (gt[:, 1] + gt[:, 3])) / (2 * hg)
    e_s = np.sqrt(wp * hp / (wg * hg))
    e_r = (wp / hp) / (wg / hg)
    return np.stack([e_x, e_y, e_s, e_r], axis=1)


def _grouped_std(values: np.ndarray, groups: np.ndarray, num_groups: int) -> tuple[np.ndarray, np.ndarray]:
    """Population std of each column per group: values (R, D), groups (R,) -> ((G, D), counts (G,))."""
    count = np.bincount(groups, minlength=num_groups).astype(np.float64)  # (G,)
    safe = np.maximum(count, 1)[:, None]
    sums = np.stack([np.bincount(groups, values[:, d], minlength=num_groups) for d in range(values.shape[1])], 1)
    mean = sums / safe  # (G, D)
    dev = (values - mean[groups]) ** 2  # two passes: no cancellation for tight tracks
    var = np.stack([np.bincount(groups, dev[:, d], minlength=num_groups) for d in range(values.shape[1])], 1)
    return np.sqrt(var / safe), count


@dataclass(frozen=True)
class TrackErrors:
    """Per-trajectory values at one score threshold (T trajectories)."""

    length: np.ndarray  # (T,) t_k, annotated frames
    changes: np.ndarray  # (T,) f_k
    detected: np.ndarray  # (T,) frames detected
    fragment: np.ndarray  # (T,) f_k / (t_k - 1); NaN when t_k < 2
    center: np.ndarray  # (T,) std(e_x) + std(e_y); NaN when detected < 2
    scale_ratio: np.ndarray  # (T,) std(e_s) + std(e_r); NaN when detected < 2

    @property
    def total(self) -> np.ndarray:
        """(T,) per-trajectory Phi, undefined parts counted as 0 (used to rank tracks)."""
        return np.nan_to_num(self.fragment) + np.nan_to_num(self.center) + np.nan_to_num(self.scale_ratio)


def track_errors(m: MatchedObjects, threshold: float) -> TrackErrors:
    """Per-trajectory fragment, centre and scale-ratio errors at score >= ``threshold``."""
    num = len(m.track_keys)
    detected = m.score >= threshold  # (R,)
    same = m.track[1:] == m.track[:-1]  # rows are sorted by (track, frame)
    change = same & (detected[1:] != detected[:-1])
    changes = np.bincount(m.track[1:][change], minlength=num)
    length = np.bincount(m.track, minlength=num)
    with np.errstate(divide="ignore", invalid="ignore"):
        fragment = np.where(length >= 2, changes / np.maximum(length - 1, 1), np.nan)
    errs = box_errors(m.det[detected], m.gt[detected])  # (D, 4)
    std, count = _grouped_std(errs, m.track[detected], num)
    spread = count >= 2
    center = np.where(spread, std[:, 0] + std[:, 1], np.nan)
    scale_ratio = np.where(spread, std[:, 2] + std[:, 3], np.nan)
    return TrackErrors(length, changes, count.astype(np.int64), fragment, center, scale_ratio)


def _class_means(values: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(T,) per-track values with NaN = undefined -> (C,) per-class means over defined ones."""
    ok = ~np.isnan(values)
    n = np.bincount(labels[ok], minlength=num_classes)
    s = np.bincount(labels[ok], values[ok], minlength=num_classes)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(n > 0, s / np.maximum(n, 1), np.nan)


def _nanmean(x: np.ndarray, axis: int | None = None) -> np.ndarray | float:
    ok = ~np.isnan(x)
    n = ok.sum(axis=axis)
    s = np.where(ok, x, 0.0).sum(axis=axis)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(n > 0, s / np.maximum(n, 1), np.nan)


@dataclass
class StabilityResult:
    """Errors per class and for the dataset, at each threshold of ``thresholds``."""

    class_names: list[str]
    thresholds: np.ndarray  # (S,) score thresholds
    per_class: np.ndarray  # (S, C, 4) fragment, center, scale_ratio, total per class; NaN: undefined
    overall: np.ndarray  # (S, 4) mean over classes of each error; total = sum of the three
    fixed_threshold: float
    fixed: np.ndarray  # (4,) overall at fixed_threshold
    fixed_per_class: np.ndarray  # (C, 4)
    num_tracks: np.ndarray  # (C,) trajectories per class
    tracks: TrackErrors | None = field(default=None, repr=False)  # per track at fixed_threshold
    matched: MatchedObjects | None = field(default=None, repr=False)

    @property
    def averaged(self) -> np.ndarray:
        """(4,) each error averaged over the thresholds where it is defined; total = sum."""
        avg = np.asarray(_nanmean(self.overall[:, :3], axis=0), dtype=np.float64)
        return np.append(avg, avg.sum())

    def metrics(self) -> dict[str, float]:
        """Flat metric keys: ``stability_<error>`` averaged over THRESHOLDS (the headline),
        ``stability_<error>_fixed`` at ``fixed_threshold`` (also given as a key)."""
        out = {f"stability_{n}": float(v) for n, v in zip(ERROR_NAMES, self.averaged)}
        out.update({f"stability_{n}_fixed": float(v) for n, v in zip(ERROR_NAMES, self.fixed)})
        out["stability_threshold"] = float(self.fixed_threshold)
        return out


def _errors_at(m: MatchedObjects, threshold: float, num_classes: int) -> tuple[np.ndarray, np.ndarray, TrackErrors]:
    """((C, 4) per class, (4,) overall, per-track) at one threshold."""
    t = track_errors(m, threshold)
    cols = [_class_means(v, m.track_labels, num_classes) for v in (t.fragment, t.center, t.scale_ratio)]
    per_class = np.stack(cols + [cols[0] + cols[1] + cols[2]], axis=1)  # (C, 4)
    overall = np.asarray(_nanmean(per_class[:, :3], axis=0), dtype=np.float64)
    return per_class, np.append(overall, overall.sum()), t


def stability_error(
    frames: Sequence[VideoFrame] | MatchedObjects,
    class_names: Sequence[str],
    fixed_threshold: float = 0.5,
    thresholds: Sequence[float] = THRESHOLDS,
    iou_threshold: float = 0.5,
) -> StabilityResult:
    """The stability errors of a set of video frames (see the module docstring)."""
    m = frames if isinstance(frames, MatchedObjects) else match_frames(frames, iou_threshold)
    num_classes = len(class_names)
    if len(m.track_labels) and (m.track_labels.min() < 0 or m.track_labels.max() >= num_classes):
        raise ValueError(f"stability: ground-truth labels must be in [0, {num_classes}), got {m.track_labels.max()}")
    per_class, overall = [], []
    for s in thresholds:
        pc, ov, _ = _errors_at(m, float(s), num_classes)
        per_class.append(pc)
        overall.append(ov)
    fixed_pc, fixed, tracks = _errors_at(m, float(fixed_threshold), num_classes)
    return StabilityResult(
        class_names=list(class_names),
        thresholds=np.asarray(thresholds, np.float64),
        per_class=np.stack(per_class) if per_class else np.zeros((0, num_classes, 4)),
        overall=np.stack(overall) if overall else np.zeros((0, 4)),
        fixed_threshold=float(fixed_threshold),
        fixed=fixed,
        fixed_per_class=fixed_pc,
        num_tracks=np.bincount(m.track_labels, minlength=num_classes),
        tracks=tracks,
        matched=m,
    )


def threshold_at_recall(m: MatchedObjects, recall: float) -> float:
    """The highest score threshold at which at least ``recall`` of the annotated objects (the
    rows of ``m``) are detected. Comparing detectors at a fixed threshold confounds stability
    with recall: a detector that rarely passes the threshold misses most objects steadily and
    has a low E_F. At equal recall the errors compare like with like. Raises ``ValueError``
    when the detector never reaches that recall at any score."""
    if not 0.0 < recall <= 1.0:
        raise ValueError(f"recall must be in (0, 1], got {recall}")
    scores = np.sort(m.score)[::-1]  # -inf: objects no detection matched
    k = max(math.ceil(recall * len(scores) - 1e-9), 1)  # - 1e-9: 0.5 * 10 is 5 objects, not 6
    if len(scores) == 0 or not np.isfinite(scores[k - 1]):
        reach = float(np.isfinite(scores).mean()) if len(scores) else 0.0
        raise ValueError(f"stability: the detector finds {reach:.0%} of the annotated objects at any score; "
                         f"recall {recall:g} is out of reach")
    return float(scores[k - 1])


# --------------------------------------------------------------------------- report
def _f(x: float) -> str:
    return "   n/a" if math.isnan(x) else f"{x:6.3f}"


def format_stability(result: StabilityResult) -> str:
    """Per-class table at the fixed threshold and averaged, then the per-threshold figures."""
    lo, hi = (result.thresholds.min(), result.thresholds.max()) if len(result.thresholds) else (math.nan, math.nan)
    width = max([len("mean"), len("class")] + [len(n) for n in result.class_names])
    avg_pc = np.asarray(_nanmean(result.per_class, axis=0))  # (C, 4) each error averaged over thresholds
    avg_pc[:, 3] = avg_pc[:, :3].sum(axis=1)
    head = "   E_F    E_C    E_R    Phi"
    lines = [
        f"stability error (Zhang & Wang 2016; lower is steadier): at score >= {result.fixed_threshold:g} | "
        f"averaged over score thresholds {lo:g}..{hi:g}",
        f"{'class':<{width}}  {'tracks':>6}  {head}  |{head}",
    ]
    for c, name in enumerate(result.class_names):
        a = " ".join(_f(v) for v in result.fixed_per_class[c])
        b = " ".join(_f(v) for v in avg_pc[c])
        lines.append(f"{name:<{width}}  {int(result.num_tracks[c]):>6d}  {a}  | {b}")
    lines.append("-" * len(lines[1]))
    a = " ".join(_f(v) for v in result.fixed)
    b = " ".join(_f(v) for v in result.averaged)
    lines.append(f"{'mean':<{width}}  {int(result.num_tracks.sum()):>6d}  {a}  | {b}")
    lines.append("per score threshold (mean over classes):")
    for s, o in zip(result.thresholds, result.overall):
        lines.append(f"  score >= {s:.1f}: E_F {_f(o[0])}  E_C {_f(o[1])}  E_R {_f(o[2])}  Phi {_f(o[3])}")
    return "\n".join(lines)


def _jf(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


def stability_to_json(result: StabilityResult) -> dict:
    """A JSON-ready dict: the flat metric keys, then per-threshold and per-class figures."""
    out: dict = {k: _jf(v) for k, v in result.metrics().items()}
    out["stability_averaged_over"] = [float(s) for s in result.thresholds]
    out["stability_per_threshold"] = [
        {"threshold": float(s), **{n: _jf(v) for n, v in zip(ERROR_NAMES, o)}}
        for s, o in zip(result.thresholds, result.overall)
    ]
    out["stability_per_class"] = [
        {"name": name, "tracks": int(result.num_tracks[c]),
         **{f"{n}_fixed": _jf(v) for n, v in zip(ERROR_NAMES, result.fixed_per_class[c])}}
        for c, name in enumerate(result.class_names)
    ]
    return out
