"""Anchor utilities: k-means with the 1 - IoU distance, fit statistics, letterbox sizes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from onestage.anchors import anchor_fit, kmeans_anchors, letterbox_wh, normalize_anchors, split_by_scale
from onestage.config import AnchorsConfig


def three_clusters(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    centres = np.array([[150.0, 220.0], [10.0, 12.0], [60.0, 40.0]])  # deliberately not sorted
    rng = np.random.default_rng(seed)
    wh = np.concatenate([c * rng.uniform(0.95, 1.05, size=(40, 2)) for c in centres])
    return wh, centres


def test_kmeans_recovers_three_separated_clusters_sorted_by_area() -> None:
    wh, centres = three_clusters()
    anchors = kmeans_anchors(wh, k=3, seed=0)
    expected = centres[np.argsort(centres.prod(axis=1))]  # (10,12), (60,40), (150,220)
    assert anchors.shape == (3, 2)
    np.testing.assert_allclose(anchors, expected, rtol=0.03)
    assert np.all(np.diff(anchors.prod(axis=1)) > 0)


def test_kmeans_is_deterministic_and_checks_input() -> None:
    wh, _ = three_clusters(seed=3)
    np.testing.assert_array_equal(kmeans_anchors(wh, k=4, seed=7), kmeans_anchors(wh, k=4, seed=7))
    with pytest.raises(ValueError, match="at least"):
        kmeans_anchors(wh[:2], k=3)
    with pytest.raises(ValueError, match="positive"):
        kmeans_anchors(np.array([[10.0, 0.0], [5.0, 5.0], [3.0, 3.0]]), k=2)


def test_kmeans_centroids_are_member_means() -> None:
    # Two boxes per cluster, far apart: each anchor is the mean of its pair.
    wh = np.array([[10.0, 10.0], [12.0, 14.0], [100.0, 50.0], [110.0, 60.0]])
    np.testing.assert_allclose(kmeans_anchors(wh, k=2, seed=1), [[11.0, 12.0], [105.0, 55.0]])


def test_anchor_fit_by_hand() -> None:
    wh = np.array([[10.0, 10.0], [20.0, 20.0], [10.0, 40.0]])
    anchors = np.array([[10.0, 10.0], [20.0, 20.0]])
    # Best IoUs: 1, 1, and for (10, 40): vs (10,10) 100 / 400 = 0.25, vs (20,20) 200 / 600 = 1/3.
    mean_iou, share = anchor_fit(wh, anchors, threshold=0.5)
    assert mean_iou == pytest.approx((1 + 1 + 1 / 3) / 3, abs=1e-6)  # 0.7778
    assert share == pytest.approx(2 / 3)
    assert anchor_fit(wh, anchors, threshold=1 / 4)[1] == pytest.approx(1.0)  # 1/3 > 0.25
    assert anchor_fit(wh, anchors, threshold=1.0)[1] == 0.0  # "above" is strict


def test_letterbox_wh() -> None:
    boxes = np.array([[100.0, 50.0], [30.0, 60.0]])
    images = np.array([[640.0, 480.0], [300.0, 600.0]])
    # Scales min(416/640, 416/480) = 0.65 and min(416/300, 416/600) = 0.69333.
    np.testing.assert_allclose(letterbox_wh(boxes, images, 416), [[65.0, 32.5], [20.8, 41.6]])
    with pytest.raises(ValueError, match="image sizes"):
        letterbox_wh(boxes, images[:1], 416)


def test_normalize_and_split_anchors() -> None:
    groups = normalize_anchors(AnchorsConfig().sizes, 416)
    assert [g.shape for g in groups] == [(3, 2)] * 3
    assert torch.allclose(groups[0][0], torch.tensor([116 / 416, 90 / 416]))  # 0.2788, 0.2163
    wide = normalize_anchors([[(64, 32)]], (640, 320))
    assert torch.allclose(wide[0], torch.tensor([[0.1, 0.1]]))
    nine = np.array(
        [[10, 13], [16, 30], [33, 23], [30, 61], [62, 45], [59, 119], [116, 90], [156, 198], [373, 326]], dtype=float
    )
    # Largest three to the coarsest scale: this reproduces the default config exactly.
    assert split_by_scale(nine) == [[tuple(map(float, a)) for a in group] for group in AnchorsConfig().sizes]
    with pytest.raises(ValueError, match="positive"):
        normalize_anchors([[(10, 0)]], 416)
