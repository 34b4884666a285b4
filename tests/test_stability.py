"""Stability error (Zhang & Wang 2016) on hand-made tracks, and against a plain loop."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onestage.eval.stability import (
    THRESHOLDS,
    VideoFrame,
    box_errors,
    format_stability,
    match_frames,
    stability_error,
    stability_to_json,
    threshold_at_recall,
    track_errors,
)

NAMES = ["a", "b"]


def moving_box(t: int, x0: float = 20.0, y0: float = 30.0, w: float = 40.0, h: float = 30.0) -> np.ndarray:
    """A box that moves 3 px right and 1 px down per frame and grows slowly: (4,) xyxy."""
    x, y, s = x0 + 3 * t, y0 + t, 1.0 + 0.01 * t
    return np.array([x, y, x + w * s, y + h * s])


def frames_from(tracks: dict[int, tuple[int, list]], num_frames: int, video: str = "v") -> list[VideoFrame]:
    """tracks: id -> (label, per-frame list of (gt box or None, det box or None, det score))."""
    out = []
    for t in range(num_frames):
        gb, gl, gi, db, ds, dl = [], [], [], [], [], []
        for tid, (label, per_frame) in tracks.items():
            gt, det, score = per_frame[t]
            if gt is not None:
                gb.append(gt), gl.append(label), gi.append(tid)
            if det is not None:
                db.append(det), ds.append(score), dl.append(label)
        out.append(VideoFrame(video, t, np.array(gb).reshape(-1, 4), np.array(gl, np.int64), np.array(gi, np.int64),
                              np.array(db).reshape(-1, 4), np.array(ds, np.float64), np.array(dl, np.int64)))
    return out


def test_ground_truth_as_detections_is_perfectly_stable():
    n = 12
    tracks = {
        1: (0, [(moving_box(t), moving_box(t), 0.95) for t in range(n)]),
        2: (1, [(moving_box(t, 150, 80, 25, 50), moving_box(t, 150, 80, 25, 50), 0.95) for t in range(n)]),
    }
    r = stability_error(frames_from(tracks, n), NAMES, fixed_threshold=0.5)
    np.testing.assert_array_equal(r.fixed, [0, 0, 0, 0])
    np.testing.assert_allclose(r.overall, 0.0, atol=1e-12)  # every threshold 0.1..0.9
    assert r.metrics()["stability_total"] == 0.0
    assert list(r.num_tracks) == [1, 1]


def test_alternate_frames_gives_changes_over_length_minus_one():
    n = 8
    always = {1: (0, [(moving_box(t), moving_box(t), 0.9) for t in range(n)])}
    # detected on frames 0, 1, 3, 5, 6, 7: changes at 1->2, 2->3, 3->4, 4->5: f = 4, t - 1 = 7
    pattern = [1, 1, 0, 1, 0, 1, 1, 1]
    gaps = {2: (0, [(moving_box(t, 200), moving_box(t, 200) if pattern[t] else None, 0.9) for t in range(n)])}
    r = stability_error(frames_from({**always, **gaps}, n), NAMES, fixed_threshold=0.5)
    t = r.tracks
    assert list(t.changes) == [0, 4] and list(t.length) == [8, 8]
    assert r.fixed_per_class[0, 0] == pytest.approx((0 + 4 / 7) / 2)
    # strict alternation: f = t - 1, ratio 1
    alt = {3: (1, [(moving_box(t), moving_box(t) if t % 2 == 0 else None, 0.9) for t in range(n)])}
    r2 = stability_error(frames_from(alt, n), NAMES, fixed_threshold=0.5)
    assert r2.fixed_per_class[1, 0] == pytest.approx(1.0)


def test_flicker_of_the_score_counts_only_at_thresholds_between_the_two_scores():
    n = 6
    # every frame matched, score 0.85 on even frames and 0.35 on odd ones: flicker at
    # 0.35 < s <= 0.85, steadily detected below, steadily missed above
    tracks = {1: (0, [(moving_box(t), moving_box(t), 0.85 if t % 2 == 0 else 0.35) for t in range(n)])}
    r = stability_error(frames_from(tracks, n), NAMES, fixed_threshold=0.5)
    frag = r.overall[:, 0]
    expected = np.array([0, 0, 0, 1, 1, 1, 1, 1, 0], float)  # at 0.9 never detected: no change
    np.testing.assert_allclose(frag, expected)
    assert r.averaged[0] == pytest.approx(5 / 9)
    assert r.fixed[0] == pytest.approx(1.0)


def test_threshold_at_recall_is_the_highest_score_that_detects_that_share():
    n = 5
    # track 1 matched with scores 0.9 .. 0.5; track 2 matched at 0.3 on frames 0-2 and never after
    scores = [0.9, 0.8, 0.7, 0.6, 0.5]
    tracks = {1: (0, [(moving_box(t), moving_box(t), scores[t]) for t in range(n)]),
              2: (1, [(moving_box(t, 200), moving_box(t, 200) if t < 3 else None, 0.3) for t in range(n)])}
    m = match_frames(frames_from(tracks, n))
    assert threshold_at_recall(m, 0.5) == 0.5  # 10 objects: the 5th best score detects 5 of them
    assert threshold_at_recall(m, 0.4) == 0.6
    assert threshold_at_recall(m, 0.1) == 0.9
    assert threshold_at_recall(m, 0.8) == 0.3
    t = track_errors(m, threshold_at_recall(m, 0.5))
    assert t.detected.sum() / t.length.sum() >= 0.5
    with pytest.raises(ValueError, match="80% of the annotated objects"):  # 2 objects never matched
        threshold_at_recall(m, 0.9)


def test_constant_offset_costs_nothing_and_known_jitter_is_given_back():
    n, d = 10, 0.07
    gts = [moving_box(t) for t in range(n)]
    w, h = [(g[2] - g[0], g[3] - g[1]) for g in gts][0]
    # constant offset: 0.1 w right, 0.05 h up, every frame (accuracy, not stability)
    offset = {1: (0, [(g, g + np.array([0.1, -0.05, 0.1, -0.05]) * np.array([g[2] - g[0], g[3] - g[1]] * 2), 0.9)
                      for g in gts])}
    r = stability_error(frames_from(offset, n), NAMES, fixed_threshold=0.5)
    assert r.fixed_per_class[0, 1] == pytest.approx(0.0, abs=1e-12)
    assert r.fixed_per_class[0, 2] == pytest.approx(0.0, abs=1e-12)
    # jitter: e_x = +d, -d, +d, ... (population std d), e_y constant -> E_C = d
    jitter = {1: (0, [(g, g + (d if t % 2 == 0 else -d) * (g[2] - g[0]) * np.array([1, 0, 1, 0]), 0.9)
                      for t, g in enumerate(gts)])}
    r = stability_error(frames_from(jitter, n), NAMES, fixed_threshold=0.5)
    assert r.fixed_per_class[0, 1] == pytest.approx(d, rel=1e-9)
    assert r.fixed_per_class[0, 2] == pytest.approx(0.0, abs=1e-12)


def scaled(box: np.ndarray, kw: float, kh: float) -> np.ndarray:
    cx, cy, w, h = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2, box[2] - box[0], box[3] - box[1]
    return np.array([cx - kw * w / 2, cy - kh * h / 2, cx + kw * w / 2, cy + kh * h / 2])


def test_constant_scale_factor_costs_nothing_and_alternating_scale_is_measured():
    n = 9
    gts = [moving_box(t) for t in range(n)]
    const = {1: (0, [(g, scaled(g, 1.15, 1.05), 0.9) for g in gts])}
    r = stability_error(frames_from(const, n), NAMES, fixed_threshold=0.5)
    assert r.fixed_per_class[0, 2] == pytest.approx(0.0, abs=1e-12)
    assert r.fixed_per_class[0, 1] == pytest.approx(0.0, abs=1e-12)
    # equal width and height factors 1.1 / 0.9 alternating: e_s = 1.1, 0.9 (std 0.1 over an
    # even count... 9 frames: 5 x 1.1 and 4 x 0.9), e_r = 1 constant
    alt = {1: (0, [(g, scaled(g, *(2 * [1.1 if t % 2 == 0 else 0.9])), 0.9) for t, g in enumerate(gts)])}
    r = stability_error(frames_from(alt, n), NAMES, fixed_threshold=0.5)
    es = np.array([1.1 if t % 2 == 0 else 0.9 for t in range(n)])
    assert r.fixed_per_class[0, 2] == pytest.approx(es.std(), rel=1e-9)


def test_short_and_never_detected_tracks_and_wrong_class():
    n = 5
    tracks = {
        # annotated in one frame only: left out of E_F (0/0) and of E_C, E_R
        1: (0, [(moving_box(0), moving_box(0), 0.9)] + [(None, None, 0)] * (n - 1)),
        # never detected: in E_F with 0 changes; no spread for E_C / E_R
        2: (0, [(moving_box(t, 200), None, 0) for t in range(n)]),
        # a detection of the other class does not match
        3: (1, [(moving_box(t, 100, 150), None, 0) for t in range(n)]),
    }
    frames = frames_from(tracks, n)
    wrong = [VideoFrame(f.video, f.frame, f.gt_boxes, f.gt_labels, f.gt_track_ids,
                        np.concatenate([f.det_boxes, moving_box(f.frame, 100, 150)[None]]),
                        np.append(f.det_scores, 0.9), np.append(f.det_labels, 0)) for f in frames]
    r = stability_error(wrong, NAMES, fixed_threshold=0.5)
    t = r.tracks
    assert math.isnan(t.fragment[0]) and t.fragment[1] == 0.0 and t.fragment[2] == 0.0
    assert list(t.detected) == [1, 0, 0]
    assert r.fixed_per_class[0, 0] == 0.0 and math.isnan(r.fixed_per_class[0, 1])
    assert math.isnan(r.fixed[1])  # no class has a trajectory detected twice
    js = stability_to_json(r)
    assert js["stability_center"] is None and js["stability_fragment"] == 0.0
    assert len(js["stability_per_threshold"]) == len(THRESHOLDS)
    assert "averaged over score thresholds 0.1..0.9" in format_stability(r)


def test_difficult_objects_form_no_trajectory():
    f = VideoFrame("v", 0, moving_box(0)[None], np.array([0]), np.array([7]), np.zeros((0, 4)), np.zeros(0),
                   np.zeros(0, np.int64), gt_difficult=np.array([True]))
    m = match_frames([f, f])
    assert len(m.track) == 0 and m.track_keys == []


def reference_track_errors(frames: list[VideoFrame], threshold: float) -> dict:
    """Per (video, id) plain-loop reference: (fragment, center, scale_ratio)."""
    m = match_frames(frames)
    out = {}
    for k, key in enumerate(m.track_keys):
        rows = np.flatnonzero(m.track == k)
        rows = rows[np.argsort(m.frame[rows])]
        det = [bool(m.score[i] >= threshold) for i in rows]
        f = sum(a != b for a, b in zip(det, det[1:]))
        frag = f / (len(det) - 1) if len(det) > 1 else float("nan")
        on = [i for i, d in zip(rows, det) if d]
        if len(on) >= 2:
            e = np.array([box_errors(m.det[i][None], m.gt[i][None])[0] for i in on])
            center, scale = np.std(e[:, 0]) + np.std(e[:, 1]), np.std(e[:, 2]) + np.std(e[:, 3])
        else:
            center = scale = float("nan")
        out[key] = (frag, center, scale)
    return out


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), threshold=st.sampled_from(THRESHOLDS))
def test_vectorized_errors_equal_a_plain_loop(seed, threshold):
    rng = np.random.default_rng(seed)
    n, num_tracks = int(rng.integers(1, 9)), int(rng.integers(1, 5))
    tracks = {}
    for tid in range(num_tracks):
        x0, y0 = rng.uniform(0, 300, 2)
        per = []
        for t in range(n):
            g = moving_box(t, x0, y0, *rng.uniform(20, 60, 2)) if rng.random() < 0.85 else None
            jitter = rng.normal(0, 2, 4)
            d = None if g is None or rng.random() < 0.3 else g + jitter
            per.append((g, d, float(rng.uniform(0, 1))))
        tracks[tid] = (int(rng.integers(0, 2)), per)
    frames = frames_from(tracks, n)
    m = match_frames(frames)
    got = track_errors(m, threshold)
    ref = reference_track_errors(frames, threshold)
    for k, key in enumerate(m.track_keys):
        np.testing.assert_allclose([got.fragment[k], got.center[k], got.scale_ratio[k]], ref[key], atol=1e-9)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), dx=st.floats(-0.15, 0.15), dy=st.floats(-0.15, 0.15),
       k=st.floats(0.85, 1.2))
def test_any_constant_offset_and_scale_give_zero_center_and_scale_error(seed, dx, dy, k):
    rng = np.random.default_rng(seed)
    n = 7
    gts = [moving_box(t, *rng.uniform(0, 200, 2), *rng.uniform(10, 80, 2)) for t in range(n)]
    dets = []
    for g in gts:
        w, h = g[2] - g[0], g[3] - g[1]
        dets.append(scaled(g, k, k) + np.array([dx * w, dy * h, dx * w, dy * h]))
    r = stability_error(frames_from({1: (0, [(g, d, 0.9) for g, d in zip(gts, dets)])}, n), NAMES)
    if r.tracks.detected[0] == n:  # every frame matched at IoU >= 0.5
        assert r.fixed_per_class[0, 1] == pytest.approx(0.0, abs=1e-9)
        assert r.fixed_per_class[0, 2] == pytest.approx(0.0, abs=1e-9)
        assert r.fixed_per_class[0, 0] == 0.0
