"""Mosaic: four training images tiled around a random centre (YOLOv4 section 3.3; YOLOv5's
``load_mosaic``), made *before* the augmentation pipeline so that any preset follows it.

Why: a few hundred photographs with one large object each teach a detector little about
objects next to each other, partly hidden by an edge, or small. A mosaic shows four images'
objects at once, cut by the tile borders, and the pipeline's crop or affine then picks a
region of it, so the network sees far more object layouts and contexts per epoch.

Layout (pixels of a ``2s x 2s`` canvas, ``s`` the tile size): each image is resized so that
its longer side is ``s``; the centre ``(xc, yc)`` is drawn uniformly from ``[s/2, 3s/2]^2``;
tile 0 ends at the centre from the top left, tile 1 starts at it to the top right, tile 2 to
the bottom left, tile 3 to the bottom right. A tile is cut where it would leave the canvas,
so tiles never overlap. Boxes follow their tile's map and are clipped to the tile's visible
region; the usual ``min_visible`` rule drops those mostly cut away.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from onestage.data.transforms import clip_and_filter

# (image (H, W, 3) uint8 RGB, boxes (N, 4) float32 xyxy pixels, labels (N,) int64)
Tile = tuple[np.ndarray, np.ndarray, np.ndarray]


def tile_regions(width: int, height: int, xc: int, yc: int, canvas: int, k: int) -> tuple[tuple[int, int, int, int], tuple[int, int, int, int]]:
    """Where tile ``k`` (0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right) of a
    ``width x height`` image goes on a ``canvas x canvas`` mosaic centred at (xc, yc).

    Returns (canvas region, image region), both (x1, y1, x2, y2) integer pixels of the same
    size: the image region is the part of the image that lands on the canvas.
    """
    left, top = k % 2 == 0, k < 2
    x1a, x2a = (max(xc - width, 0), xc) if left else (xc, min(xc + width, canvas))
    y1a, y2a = (max(yc - height, 0), yc) if top else (yc, min(yc + height, canvas))
    # a left tile keeps its right part, a top tile its bottom part (they touch the centre)
    x1b = width - (x2a - x1a) if left else 0
    y1b = height - (y2a - y1a) if top else 0
    return (x1a, y1a, x2a, y2a), (x1b, y1b, x1b + (x2a - x1a), y1b + (y2a - y1a))


def mosaic(
    tiles: list[Tile], size: int, center: tuple[float, float], fill: tuple[int, int, int], min_visible: float
) -> Tile:
    """Tile four (image, boxes, labels) around ``center`` on a ``2*size`` square canvas.

    ``center`` is in canvas pixels (draw it from [size/2, 3*size/2]). Returns the canvas
    (2s, 2s, 3) uint8, its boxes (M, 4) float32 xyxy pixels and labels (M,).
    """
    if len(tiles) != 4:
        raise ValueError(f"mosaic: needs 4 tiles, got {len(tiles)}")
    canvas_side = 2 * size
    xc, yc = int(round(center[0])), int(round(center[1]))
    canvas = np.empty((canvas_side, canvas_side, 3), dtype=np.uint8)
    canvas[:] = fill
    all_boxes, all_labels = [], []
    for k, (image, boxes, labels) in enumerate(tiles):
        h, w = image.shape[:2]
        r = size / max(h, w)
        nw, nh = max(1, round(w * r)), max(1, round(h * r))
        resized = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_AREA if r < 1 else cv2.INTER_LINEAR)
        (x1a, y1a, x2a, y2a), (x1b, y1b, x2b, y2b) = tile_regions(nw, nh, xc, yc, canvas_side, k)
        if x2a <= x1a or y2a <= y1a:
            continue  # the centre sits on the canvas edge on this side: the tile is not shown
        canvas[y1a:y2a, x1a:x2a] = resized[y1b:y2b, x1b:x2b]
        # image pixels -> canvas pixels: scale by the resize, shift by the tile offset
        scale = np.array([nw / w, nh / h, nw / w, nh / h], dtype=np.float32)
        shift = np.array([x1a - x1b, y1a - y1b] * 2, dtype=np.float32)
        placed = np.asarray(boxes, dtype=np.float32).reshape(-1, 4) * scale + shift
        # clip to the tile's own region, then express in canvas pixels again
        origin = np.array([x1a, y1a, x1a, y1a], dtype=np.float32)
        kept, kept_labels = clip_and_filter(placed - origin, np.asarray(labels).reshape(-1), x2a - x1a, y2a - y1a, min_visible)
        all_boxes.append(kept + origin)
        all_labels.append(kept_labels)
    boxes_out = np.concatenate(all_boxes).astype(np.float32) if all_boxes else np.zeros((0, 4), np.float32)
    labels_out = np.concatenate(all_labels).astype(np.int64) if all_labels else np.zeros((0,), np.int64)
    return canvas, boxes_out.reshape(-1, 4), labels_out


@dataclass(frozen=True)
class Mosaic:
    """A dataset's mosaic setting: with probability ``p`` a training sample is a mosaic of
    its image and three others drawn at random (``DetectionDataset`` does the drawing)."""

    p: float
    size: int  # tile size: the network input size
    fill: tuple[int, int, int]
    min_visible: float = 0.3

    def __post_init__(self) -> None:
        if not 0.0 <= self.p <= 1.0:
            raise ValueError(f"mosaic: probability must be in [0, 1], got {self.p}")

    def __call__(self, tiles: list[Tile]) -> Tile:
        center = np.random.uniform(0.5 * self.size, 1.5 * self.size, size=2)
        return mosaic(tiles, self.size, (float(center[0]), float(center[1])), self.fill, self.min_visible)


def mosaic_closed(step: int, total_steps: int, close_last: float) -> bool:
    """Whether training at optimizer step ``step`` of ``total_steps`` is in its last
    ``close_last`` fraction, where ``data.augment.close_mosaic`` turns mosaic off."""
    return close_last > 0 and step >= (1.0 - close_last) * total_steps
