"""The stability step of an evaluation on video data, and the per-track timelines.

``add_stability`` turns records of a video dataset (``data.*.format: mot``: records with
``track_ids`` and ``frame_index``) plus their detections (docs/contracts.md: per image
``boxes`` (K, 4) xyxy pixels, ``scores`` (K,), ``labels`` (K,)) into the stability errors of
``eval.stability`` and adds them to the ``EvalResult`` (flat metric keys + ``result.stability``).

``draw_worst_tracks`` draws, for the tracks with the largest per-track Phi at the fixed
threshold, one PNG each: detected / missed per frame, then the centre errors e_x, e_y and the
scale errors e_s, e_r over time: the picture that shows flicker.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from onestage.data.record import ImageRecord
from onestage.eval.evaluator import EvalResult
from onestage.eval.stability import StabilityResult, VideoFrame, box_errors, stability_error


def is_video_dataset(records: Sequence[ImageRecord]) -> bool:
    return bool(records) and all(r.track_ids is not None and r.frame_index is not None for r in records)


def video_frames(records: Sequence[ImageRecord], dets: Sequence[Mapping[str, np.ndarray]]) -> list[VideoFrame]:
    """One ``VideoFrame`` per record (records of a video dataset, detections in the same order)."""
    if len(records) != len(dets):
        raise ValueError(f"stability: {len(records)} frames but {len(dets)} detection sets")
    return [
        VideoFrame(str(r.video), int(r.frame_index), r.boxes, r.labels, r.track_ids, d["boxes"], d["scores"],
                   d["labels"], gt_difficult=r.difficult)
        for r, d in zip(records, dets)
    ]


def add_stability(
    result: EvalResult,
    records: Sequence[ImageRecord],
    dets: Sequence[Mapping[str, np.ndarray]],
    class_names: Sequence[str],
    fixed_threshold: float,
) -> StabilityResult:
    """Compute the stability errors (matching at the result's IoU threshold) and add them to
    ``result.metrics`` (``stability_*`` keys) and ``result.stability``."""
    stab = stability_error(video_frames(records, dets), class_names, fixed_threshold=fixed_threshold,
                           iou_threshold=result.iou_threshold)
    result.metrics.update(stab.metrics())
    result.stability = stab
    return stab


def track_timeline(stab: StabilityResult, track: int) -> dict[str, np.ndarray]:
    """Per annotated frame of one trajectory at the fixed threshold: frame, detected, e_x,
    e_y, e_s, e_r (NaN where missed)."""
    m = stab.matched
    rows = np.flatnonzero(m.track == track)  # rows are sorted by (track, frame)
    detected = m.score[rows] >= stab.fixed_threshold
    errs = np.full((len(rows), 4), np.nan)
    if detected.any():
        errs[detected] = box_errors(m.det[rows[detected]], m.gt[rows[detected]])
    return {"frame": m.frame[rows], "detected": detected, "e_x": errs[:, 0], "e_y": errs[:, 1],
            "e_s": errs[:, 2], "e_r": errs[:, 3]}


def worst_tracks(stab: StabilityResult, count: int) -> list[int]:
    """Indices of the ``count`` trajectories with the largest Phi (at least 2 frames long)."""
    t = stab.tracks
    phi = np.where(t.length >= 2, t.total, -np.inf)
    order = np.argsort(-phi, kind="stable")
    return [int(k) for k in order[:count] if np.isfinite(phi[k])]


def timeline_figure(stab: StabilityResult, track: int) -> Figure:
    tl = track_timeline(stab, track)
    t = stab.tracks
    video, tid = stab.matched.track_keys[track]
    name = stab.class_names[int(stab.matched.track_labels[track])]
    fig = Figure(figsize=(8, 5.5))
    FigureCanvasAgg(fig)
    ax0, ax1, ax2 = fig.subplots(3, 1, sharex=True, gridspec_kw={"height_ratios": [1, 2, 2]})
    colours = np.where(tl["detected"], "tab:green", "tab:red")
    ax0.bar(tl["frame"], np.ones(len(tl["frame"])), width=1.0, color=colours)
    ax0.set_yticks([])
    ax0.set_ylabel("found", fontsize=8)
    ax0.set_title(
        f"{video} track {tid} ({name}) at score >= {stab.fixed_threshold:g}: green detected, red missed\n"
        f"f/(t-1) = {t.changes[track]}/{max(t.length[track] - 1, 0)} = {t.fragment[track]:.3f}, "
        f"centre std {t.center[track]:.3f}, scale std {t.scale_ratio[track]:.3f}", fontsize=9)
    for key, style in (("e_x", "-"), ("e_y", "--")):
        ax1.plot(tl["frame"], tl[key], style, marker=".", label=key)
    ax1.axhline(0, color="grey", lw=0.5)
    ax1.set_ylabel("centre error\n(fraction of w, h)", fontsize=8)
    for key, style in (("e_s", "-"), ("e_r", "--")):
        ax2.plot(tl["frame"], tl[key], style, marker=".", label=key)
    ax2.axhline(1, color="grey", lw=0.5)
    ax2.set_ylabel("scale / ratio", fontsize=8)
    ax2.set_xlabel("frame", fontsize=8)
    for ax in (ax1, ax2):
        ax.legend(fontsize=7, loc="upper right")
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    return fig


def draw_worst_tracks(stab: StabilityResult, out_dir: str | Path, count: int = 8) -> list[Path]:
    """One timeline PNG per worst track in ``out_dir``; returns the paths written."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for rank, k in enumerate(worst_tracks(stab, count)):
        video, tid = stab.matched.track_keys[k]
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in video)
        path = out_dir / f"{rank + 1:02d}_{safe}_track{tid}.png"
        timeline_figure(stab, k).savefig(path, dpi=90)
        paths.append(path)
    return paths
