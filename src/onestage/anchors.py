"""YOLO anchors: pixel sizes to normalized tensors, and fitting anchors to a dataset.

Anchors are (width, height) pairs. The config gives them in pixels of the network input,
one group per output scale, coarsest first (``AnchorsConfig.sizes``); the assigner, the
loss and the decoder take them normalized by the input size (``normalize_anchors``).

``kmeans_anchors`` is the "dimension clusters" of YOLOv2 (Redmon and Farhadi 2017,
section "Better", Figure 2), used for YOLOv3's nine anchors (YOLOv3 paper, section 2.1):
k-means on the boxes' widths and heights with the distance ``d = 1 - IoU(box, centroid)``,
both boxes placed at the origin, so that large boxes do not dominate as they would with
Euclidean distance. The IoU is ``onestage.boxes.wh_iou``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from onestage.boxes import wh_iou


def normalize_anchors(sizes: Sequence[Sequence[Sequence[float]]], input_size: int | tuple[int, int]) -> list[Tensor]:
    """Pixel anchors per scale -> [(A_s, 2)] float32 w, h normalized by the input (width, height).

    sizes: e.g. ``AnchorsConfig.sizes``, coarsest first; input_size: the square side or
    (width, height) of the network input the pixel sizes refer to.
    """
    width, height = (input_size, input_size) if isinstance(input_size, int) else input_size
    scale = torch.tensor([float(width), float(height)])
    groups = []
    for s, group in enumerate(sizes):
        t = torch.as_tensor(group, dtype=torch.float32).reshape(-1, 2)
        if t.shape[0] == 0 or bool((t <= 0).any()):
            raise ValueError(f"anchor group {s}: expected positive (w, h) pairs, got {list(group)}")
        groups.append(t / scale)
    return groups


def split_by_scale(anchors: np.ndarray, per_scale: Sequence[int] = (3, 3, 3)) -> list[list[tuple[float, float]]]:
    """(k, 2) anchors sorted by area ascending -> groups for ``AnchorsConfig.sizes``, coarsest first.

    The largest anchors go to the coarsest map (stride 32), as Darknet's ``mask = 6,7,8``.
    """
    if sum(per_scale) != len(anchors):
        raise ValueError(f"per_scale {list(per_scale)} sums to {sum(per_scale)}, but there are {len(anchors)} anchors")
    groups: list[list[tuple[float, float]]] = []
    end = len(anchors)
    for n in per_scale:
        groups.append([(float(w), float(h)) for w, h in anchors[end - n : end]])
        end -= n
    return groups


def _iou(wh: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """(N, 2), (k, 2) -> (N, k) width/height IoU (``boxes.wh_iou``, fp32) as float64 numpy."""
    a = torch.from_numpy(np.asarray(wh, dtype=np.float32))
    b = torch.from_numpy(np.asarray(centroids, dtype=np.float32))
    return wh_iou(a, b).double().numpy()


def _check_wh(wh: np.ndarray) -> np.ndarray:
    arr = np.asarray(wh, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"expected (N, 2) widths and heights, got shape {arr.shape}")
    if not np.isfinite(arr).all() or (arr <= 0).any():
        raise ValueError("widths and heights must be finite and positive (drop degenerate boxes first)")
    return arr


def _kmeans_pp_init(wh: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ (Arthur and Vassilvitskii 2007) with d = 1 - IoU: each new centroid is drawn
    with probability proportional to d^2 to the nearest centroid chosen so far."""
    centroids = [wh[rng.integers(len(wh))]]
    for _ in range(1, k):
        d = 1.0 - _iou(wh, np.stack(centroids)).max(axis=1)  # (N,)
        weights = d**2
        total = weights.sum()
        index = rng.integers(len(wh)) if total <= 0 else rng.choice(len(wh), p=weights / total)
        centroids.append(wh[index])
    return np.stack(centroids)


def kmeans_anchors(wh: np.ndarray, k: int = 9, iters: int = 300, seed: int = 0) -> np.ndarray:
    """k-means with d = 1 - IoU on box sizes -> (k, 2) anchors sorted by area (ascending).

    wh: (N, 2) box widths and heights in pixels of the network input (see ``letterbox_wh``).
    k-means++ initialisation from ``seed``; then Lloyd iterations (assign each box to the
    centroid of highest IoU, move each centroid to the mean of its boxes) until the
    assignment stops changing or ``iters`` is reached. A centroid that loses all its boxes
    is moved to the box worst covered by the others.
    """
    data = _check_wh(wh)
    if k < 1 or len(data) < k:
        raise ValueError(f"need at least k={k} >= 1 boxes, got {len(data)}")
    rng = np.random.default_rng(seed)
    centroids = _kmeans_pp_init(data, k, rng)
    assignment = np.full(len(data), -1)
    for _ in range(iters):
        iou = _iou(data, centroids)  # (N, k)
        new_assignment = iou.argmax(axis=1)
        if np.array_equal(new_assignment, assignment):
            break
        assignment = new_assignment
        for c in range(k):
            members = data[assignment == c]
            if len(members):
                centroids[c] = members.mean(axis=0)
            else:
                centroids[c] = data[iou.max(axis=1).argmin()]
    return centroids[np.argsort(centroids.prod(axis=1), kind="stable")]


def anchor_fit(wh: np.ndarray, anchors: np.ndarray, threshold: float) -> tuple[float, float]:
    """How well anchors cover boxes: (mean over boxes of the best anchor IoU,
    share of boxes whose best anchor IoU is > threshold).

    wh: (N, 2), anchors: (k, 2), both in the same units (pixels of the network input).
    """
    data = _check_wh(wh)
    best = _iou(data, _check_wh(anchors)).max(axis=1)  # (N,)
    return float(best.mean()), float((best > threshold).mean())


def letterbox_wh(boxes_wh: np.ndarray, image_sizes: np.ndarray, size: int) -> np.ndarray:
    """Box sizes after the letterbox resize of their image to a ``size`` x ``size`` input.

    boxes_wh: (N, 2) widths and heights in original-image pixels; image_sizes: (N, 2) the
    (width, height) of each box's image. The letterbox scales an image by
    ``min(size / width, size / height)`` (aspect ratio kept, the rest padded), so
    -> (N, 2) widths and heights in input pixels.
    """
    wh = np.asarray(boxes_wh, dtype=np.float64).reshape(-1, 2)
    sizes = np.asarray(image_sizes, dtype=np.float64).reshape(-1, 2)
    if len(sizes) != len(wh):
        raise ValueError(f"got {len(wh)} boxes but {len(sizes)} image sizes (one per box)")
    if (sizes <= 0).any():
        raise ValueError("image sizes must be positive")
    scale = np.minimum(size / sizes[:, 0], size / sizes[:, 1])  # (N,)
    return wh * scale[:, None]
