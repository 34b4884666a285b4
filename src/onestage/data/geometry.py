"""Image geometry without torch: resizing, placement plans, normalization, box inversion.

The pure-numpy half of ``onestage.data.transforms`` (which adds torch tensors and the
training augmentations on top): the evaluation geometry lives here once, so that the
checkpoint path (``EvalTransform``, ``LetterboxEvalTransform``) and the ONNX runtime
(``onestage.export.runtime``, which must not import torch) pre-process and invert boxes
with the same code. Only numpy and OpenCV are imported.

Evaluation rules (``eval_plan``): "resize" stretches the image to S x S (aspect not kept);
"letterbox" scales the long side to S keeping the aspect ratio, centres the image and pads
with ``pad_value``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

import cv2
import numpy as np

Triple = tuple[float, float, float]
EvalRule = Literal["resize", "letterbox"]
IMAGENET_MEAN: Triple = (0.485, 0.456, 0.406)
IMAGENET_STD: Triple = (0.229, 0.224, 0.225)
YOLO_PAD_VALUE = 114  # grey letterbox padding, as the YOLO references use


def normalize_image(image: np.ndarray, mean: Triple, std: Triple) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (3, H, W) float32 ``(x / 255 - mean) / std``.

    Done channel by channel in numpy: as fast as torch with one thread and, unlike torch,
    not slowed down by thread contention when the trainer runs it on a busy main process.
    """
    out = np.empty((3,) + image.shape[:2], dtype=np.float32)
    for c in range(3):
        out[c] = image[..., c]
        out[c] -= np.float32(mean[c] * 255.0)
        out[c] *= np.float32(1.0 / (std[c] * 255.0))
    return out


def resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Resize (H, W, 3) uint8 to (height, width, 3), anti-aliased when shrinking.

    Bilinear alone aliases when an axis shrinks more than 2x (it reads 2x2 source pixels
    per output pixel). There, bilinear goes to ``2^n`` times the target (a shrink of at
    most 2x per axis) and a box average of exactly ``2^n`` x ``2^n`` pixels finishes;
    cv2's INTER_AREA has a fast path for integer factors, so this costs 0.1-0.3 ms where a
    direct INTER_AREA from 500x375 costs 1.1 ms (measured on the project's CPU).
    """
    src_h, src_w = image.shape[:2]
    if src_w == width and src_h == height:
        return image
    fx = max(0, math.floor(math.log2(src_w / width))) if src_w >= 2 * width else 0
    fy = max(0, math.floor(math.log2(src_h / height))) if src_h >= 2 * height else 0
    if fx == 0 and fy == 0:
        return cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
    mid = cv2.resize(image, (width << fx, height << fy), interpolation=cv2.INTER_LINEAR)
    return cv2.resize(mid, (width, height), interpolation=cv2.INTER_AREA)


@dataclass(frozen=True)
class Placement:
    """Axis-aligned map from source pixels to output pixels (pixel-edge coordinates):
    ``x_out = kx * x + bx``, ``y_out = ky * y + by``."""

    kx: float
    ky: float
    bx: float
    by: float

    def forward(self, boxes: np.ndarray) -> np.ndarray:
        """(N, 4) xyxy source pixels -> (N, 4) float32 xyxy output pixels."""
        scale = np.array([self.kx, self.ky, self.kx, self.ky], dtype=np.float64)
        shift = np.array([self.bx, self.by, self.bx, self.by], dtype=np.float64)
        return (boxes * scale + shift).astype(np.float32)

    def inverse(self, boxes: np.ndarray) -> np.ndarray:
        """(N, 4) xyxy output pixels -> (N, 4) float64 xyxy source pixels."""
        scale = np.array([self.kx, self.ky, self.kx, self.ky], dtype=np.float64)
        shift = np.array([self.bx, self.by, self.bx, self.by], dtype=np.float64)
        return (np.asarray(boxes, dtype=np.float64) - shift) / scale


@dataclass(frozen=True)
class Plan:
    """Where a source image goes in an S x S output.

    ``src``: integer rect (x1, y1, x2, y2) of the source that lands in the output, or None
    when nothing does; ``dst``: integer rect it is resized to (may overhang the output by
    less than a source pixel); ``placement``: the exact map pixels and boxes follow.
    """

    src: tuple[int, int, int, int] | None
    dst: tuple[int, int, int, int] | None
    placement: Placement


def _round(v: float) -> int:
    return int(math.floor(v + 0.5))


def plan_placement(width: int, height: int, kx: float, ky: float, bx: float, by: float, size: int) -> Plan:
    """Plan the nominal map ``x_out = kx * x + bx`` of a width x height image into S x S.

    The source rect is the visible part rounded outwards to whole source pixels; its
    corners are mapped and rounded to whole output pixels, and the map is re-derived from
    the two rects so that resizing the rect onto the rect is exactly the returned map.
    """
    sx1 = max(0, math.floor(-bx / kx))
    sx2 = min(width, math.ceil((size - bx) / kx))
    sy1 = max(0, math.floor(-by / ky))
    sy2 = min(height, math.ceil((size - by) / ky))
    if sx2 > sx1 and sy2 > sy1:
        dx1, dx2 = _round(kx * sx1 + bx), _round(kx * sx2 + bx)
        dy1, dy2 = _round(ky * sy1 + by), _round(ky * sy2 + by)
        if dx2 > dx1 and dy2 > dy1:
            ekx = (dx2 - dx1) / (sx2 - sx1)
            eky = (dy2 - dy1) / (sy2 - sy1)
            placement = Placement(ekx, eky, dx1 - ekx * sx1, dy1 - eky * sy1)
            return Plan((sx1, sy1, sx2, sy2), (dx1, dy1, dx2, dy2), placement)
    return Plan(None, None, Placement(kx, ky, bx, by))


def render(
    image: np.ndarray,
    plan: Plan,
    size: int,
    fill: tuple[int, int, int],
    patch_fn: Callable[[np.ndarray], np.ndarray] | None = None,
) -> np.ndarray:
    """(size, size, 3) uint8: the planned part of ``image`` resized onto a ``fill`` canvas.

    ``patch_fn`` (a colour jitter) sees only the resized image pixels, never the fill, so
    padding keeps exactly the fill colour (the SSD reference distorts before expanding).
    """
    if plan.src is None or plan.dst is None:
        return np.full((size, size, 3), fill, dtype=np.uint8)
    sx1, sy1, sx2, sy2 = plan.src
    dx1, dy1, dx2, dy2 = plan.dst
    patch = resize(image[sy1:sy2, sx1:sx2], dx2 - dx1, dy2 - dy1)
    if patch_fn is not None:
        patch = patch_fn(patch)
    if (dx1, dy1, dx2, dy2) == (0, 0, size, size):
        return np.ascontiguousarray(patch)
    canvas = np.full((size, size, 3), fill, dtype=np.uint8)
    cx1, cy1, cx2, cy2 = max(dx1, 0), max(dy1, 0), min(dx2, size), min(dy2, size)
    if cx2 > cx1 and cy2 > cy1:
        canvas[cy1:cy2, cx1:cx2] = patch[cy1 - dy1 : cy2 - dy1, cx1 - dx1 : cx2 - dx1]
    return canvas


def fill_colour(mean: Triple) -> tuple[int, int, int]:
    """The mean colour as uint8: it normalizes to ~0, so zoom-out padding carries no signal."""
    return tuple(int(round(m * 255)) for m in mean)  # type: ignore[return-value]


def eval_plan(rule: EvalRule, width: int, height: int, size: int) -> Plan:
    """Where a width x height image goes in the S x S network input under an evaluation rule
    (module docstring)."""
    if rule == "resize":
        return plan_placement(width, height, size / width, size / height, 0.0, 0.0, size)
    if rule == "letterbox":
        k = size / max(width, height)
        return plan_placement(width, height, k, k, 0.5 * (size - k * width), 0.5 * (size - k * height), size)
    raise ValueError(f"unknown evaluation rule {rule!r}; known: resize, letterbox")


def invert_boxes(plan: Plan, boxes_norm: np.ndarray, size: int, width: int, height: int) -> np.ndarray:
    """(K, 4) xyxy normalized network-input boxes -> (K, 4) float64 xyxy pixels of the
    width x height original image, clipped to it."""
    src = plan.placement.inverse(np.asarray(boxes_norm, dtype=np.float64).reshape(-1, 4) * size)
    src[:, 0::2] = np.clip(src[:, 0::2], 0, width)
    src[:, 1::2] = np.clip(src[:, 1::2], 0, height)
    return src
