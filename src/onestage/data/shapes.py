"""Synthetic shapes: the project's demo and fast-convergence dataset, generated in memory.

Each image has a smooth colour-gradient background with moderate clutter (Gaussian noise,
thin random lines, soft low-contrast blobs; none of them are objects) and 0-6 filled
shapes drawn on top. A shape's class is its silhouette (circle, square, triangle, star,
cross); its colour is random, only chosen to contrast with the background under it, so
colour never tells the class. Sizes run log-uniformly from ``14 * size / 300`` pixels to
half the image, shapes are stretched (aspect 0.75-1.33) and rotated, and later shapes may
partly cover earlier ones, but never more than ``MAX_HIDDEN`` of an object's pixels.

Contract (``data/base.py``): every ``ImageRecord`` holds ``image`` (size, size, 3) uint8
RGB, ``path=None``, ``image_id`` the int index, ``boxes`` (N, 4) float32 xyxy absolute
pixels, tight around the *visible* pixels of each shape (pixel ``i`` spans ``[i, i+1)``;
a pixel belongs to a shape when the shape covers at least half of it), ``labels`` (N,)
int64 indices into the returned class names.

Determinism: image ``i`` is drawn from ``numpy.random.default_rng([seed, i])`` only, so
the same seed gives byte-identical images and the first ``k`` images do not depend on
``num_images``.
"""

from __future__ import annotations

import cv2
import numpy as np

from onestage.data.record import ImageRecord

SHAPE_CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross")

MAX_HIDDEN = 0.25  # largest fraction of an object's own pixels that later shapes may cover
MIN_SIZE_AT_300 = 16.0  # smallest shape extent in pixels at image size 300
BACKGROUND_ONLY_P = 0.05  # fraction of images with no object at all
MAX_OBJECTS = 6
MIN_CONTRAST = 120.0  # Euclidean RGB distance between a shape and the background under it
_SHIFT = 4  # cv2 fractional bits: vertices at 1/16 px, so small shapes keep their geometry
_PLACEMENT_TRIES = 20


def _star(points: int = 5, inner: float = 0.45) -> np.ndarray:
    # Chunkier than the regular pentagram (inner 0.382) so a 14 px star stays a star.
    angles = -np.pi / 2 + np.arange(2 * points) * np.pi / points
    radii = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack((radii * np.cos(angles), radii * np.sin(angles)), axis=1)


def _cross(arm: float = 0.34) -> np.ndarray:
    a = arm
    return np.array(
        [(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a), (a, 1), (-a, 1), (-a, a), (-1, a), (-1, -a), (-a, -a)]
    )


# Unit silhouettes inside [-1, 1]^2 (the circle is drawn by cv2.circle instead).
_POLYGONS: dict[str, np.ndarray] = {
    "square": np.array([(-1.0, -1.0), (1.0, -1.0), (1.0, 1.0), (-1.0, 1.0)]),
    # Equilateral, as tall as the others are wide (height 2): a 14 px triangle is 14 px tall.
    "triangle": np.array([(0.0, -1.0), (2 / np.sqrt(3), 1.0), (-2 / np.sqrt(3), 1.0)]),
    "star": _star(),
    "cross": _cross(),
}
# Largest distance of a unit vertex from the centre: bounds the rotated shape.
_REACH: dict[str, float] = {"circle": 1.0, **{k: float(np.linalg.norm(v, axis=1).max()) for k, v in _POLYGONS.items()}}
# Rotations beyond these repeat the same silhouette.
_SYMMETRY_DEG: dict[str, float] = {"square": 90.0, "triangle": 120.0, "star": 72.0, "cross": 90.0}


def shape_vertices(kind: str, cx: float, cy: float, extent: float, aspect: float, angle_deg: float) -> np.ndarray:
    """(K, 2) float polygon of a shape in pixels: the unit silhouette scaled to ``extent``
    (width ``extent * sqrt(aspect)``, height ``extent / sqrt(aspect)`` before rotation),
    rotated by ``angle_deg`` about its centre and moved to (cx, cy)."""
    if kind not in _POLYGONS:
        raise ValueError(f"shape {kind!r} has no polygon; polygon shapes: {', '.join(_POLYGONS)}")
    unit = _POLYGONS[kind]
    half = 0.5 * extent * np.array([np.sqrt(aspect), 1.0 / np.sqrt(aspect)])
    t = np.deg2rad(angle_deg)
    rot = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    return (unit * half) @ rot.T + np.array([cx, cy])


def draw_shape_alpha(
    kind: str, cx: float, cy: float, extent: float, aspect: float, angle_deg: float, height: int, width: int
) -> np.ndarray:
    """(height, width) uint8 coverage of one anti-aliased shape: 255 inside, 0 outside.

    The circle has diameter ``extent`` (aspect and angle unused). Vertices are passed to
    cv2 with ``_SHIFT`` fractional bits (1/16 px); cv2's anti-aliased edge is a 1 px band
    on the outline, so coverage reaches up to one pixel beyond the geometric outline.
    Boxes are measured on this rendered coverage, never on the outline.
    """
    alpha = np.zeros((height, width), dtype=np.uint8)
    # cv2's fixed-point convention puts pixel centres at integers; ours puts them at i + 0.5.
    scale = float(1 << _SHIFT)
    if kind == "circle":
        centre = (int(round((cx - 0.5) * scale)), int(round((cy - 0.5) * scale)))
        cv2.circle(alpha, centre, int(round(0.5 * extent * scale)), 255, -1, cv2.LINE_AA, _SHIFT)
    else:
        pts = np.round((shape_vertices(kind, cx, cy, extent, aspect, angle_deg) - 0.5) * scale).astype(np.int32)
        cv2.fillPoly(alpha, [pts], 255, cv2.LINE_AA, _SHIFT)
    return alpha


def shape_reach(kind: str, extent: float, aspect: float) -> float:
    """Radius of a disc holding the shape at any rotation, plus 2 px for anti-aliasing."""
    return 0.5 * extent * max(np.sqrt(aspect), 1 / np.sqrt(aspect)) * _REACH[kind] + 2


def shape_window(
    kind: str, cx: float, cy: float, extent: float, aspect: float, angle_deg: float
) -> tuple[int, int, np.ndarray]:
    """(x0, y0, alpha): the shape's coverage (h, w) uint8 on the pixel window whose top-left
    pixel is (x0, y0). The window may reach outside any image (``paint_shape`` clips it)."""
    reach = shape_reach(kind, extent, aspect)
    x0, y0 = int(np.floor(cx - reach)), int(np.floor(cy - reach))
    x1, y1 = int(np.ceil(cx + reach)), int(np.ceil(cy + reach))
    return x0, y0, draw_shape_alpha(kind, cx - x0, cy - y0, extent, aspect, angle_deg, y1 - y0, x1 - x0)


def paint_shape(
    image: np.ndarray, owner: np.ndarray, index: int, x0: int, y0: int, alpha: np.ndarray, colour: np.ndarray
) -> int:
    """Blend ``colour`` (3,) into image (H, W, 3) uint8 with coverage ``alpha`` (h, w) placed at
    (x0, y0), in place; pixels it covers at least half become ``index`` in owner (H, W).
    The part of the window outside the image is dropped. Returns the pixels it now owns."""
    height, width = owner.shape
    cx0, cy0 = max(x0, 0), max(y0, 0)
    cx1, cy1 = min(x0 + alpha.shape[1], width), min(y0 + alpha.shape[0], height)
    if cx1 <= cx0 or cy1 <= cy0:
        return 0
    a_u8 = alpha[cy0 - y0: cy1 - y0, cx0 - x0: cx1 - x0]
    win = image[cy0:cy1, cx0:cx1].astype(np.float32)
    a = a_u8.astype(np.float32)[..., None] / 255.0
    image[cy0:cy1, cx0:cx1] = np.clip(win * (1 - a) + colour * a + 0.5, 0, 255).astype(np.uint8)
    mask = a_u8 >= 128
    owner[cy0:cy1, cx0:cx1][mask] = index
    return int(mask.sum())


def owned_box(owner: np.ndarray, index: int, window: tuple[int, int, int, int] | None = None) -> tuple[np.ndarray, int]:
    """((4,) xyxy pixels tight around the pixels ``owner`` gives to ``index``, their count);
    a zero box and 0 when it owns none. ``window`` (x0, y0, x1, y1) limits the search."""
    x0, y0, x1, y1 = window if window is not None else (0, 0, owner.shape[1], owner.shape[0])
    x0, y0 = max(x0, 0), max(y0, 0)
    ys, xs = np.nonzero(owner[y0:y1, x0:x1] == index)
    if len(xs) == 0:
        return np.zeros(4, np.float32), 0
    return np.array([x0 + xs.min(), y0 + ys.min(), x0 + xs.max() + 1, y0 + ys.max() + 1], np.float32), len(xs)


def background(rng: np.random.Generator, size: int, clutter: bool) -> np.ndarray:
    """(size, size, 3) uint8: a colour gradient along a random direction, plus, with clutter,
    soft low-contrast blobs and thin random lines (none of them objects).

    The smooth part is computed at a quarter of the resolution and upsampled bilinearly
    (exact for the linear gradient, invisible for the blurred blobs): 16x fewer pixels.
    """
    low = max(8, size // 4)
    c0, c1 = rng.uniform(30, 225, size=(2, 3)).astype(np.float32)
    theta = rng.uniform(0, 2 * np.pi)
    coords = (np.arange(low, dtype=np.float32) + 0.5) / low - 0.5
    t = np.cos(theta) * coords[None, :] + np.sin(theta) * coords[:, None]  # (low, low)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    field = c0 + (c1 - c0) * t[..., None]  # (low, low, 3) float32
    if clutter:
        for _ in range(int(rng.integers(0, 4))):
            # Blurred, low-contrast ellipses: no sharp silhouette, so not confused with a circle.
            mask = np.zeros((low, low), dtype=np.uint8)
            centre = (int(rng.integers(0, low)), int(rng.integers(0, low)))
            axes = (max(1, int(rng.uniform(0.05, 0.25) * low)), max(1, int(rng.uniform(0.05, 0.25) * low)))
            cv2.ellipse(mask, centre, axes, float(rng.uniform(0, 180)), 0, 360, 255, -1)
            soft = cv2.GaussianBlur(mask, (0, 0), max(0.5, 0.02 * low)).astype(np.float32)[..., None] / 255.0
            field = field + soft * rng.uniform(-40, 40, size=3).astype(np.float32)
    field_u8 = np.clip(field + 0.5, 0, 255).astype(np.uint8)
    out = cv2.resize(field_u8, (size, size), interpolation=cv2.INTER_LINEAR)
    if clutter:
        for _ in range(int(rng.integers(0, 6))):
            p0 = tuple(int(v) for v in rng.integers(0, size, 2))
            p1 = tuple(int(v) for v in rng.integers(0, size, 2))
            colour = tuple(int(v) for v in rng.integers(0, 256, 3))
            cv2.line(out, p0, p1, colour, int(rng.integers(1, 3)), cv2.LINE_AA)
    return out


def add_noise(rng: np.random.Generator, image: np.ndarray) -> np.ndarray:
    """Luminance noise over everything, objects included: uniform, sigma 2-8 grey levels.

    Uniform noise from raw random bytes: 20x cheaper than Gaussian at 300x300 and just as
    good a texture for this purpose.
    """
    size_h, size_w = image.shape[:2]
    sigma = rng.uniform(2.0, 8.0)
    raw = np.frombuffer(rng.bytes(size_h * size_w), dtype=np.uint8).reshape(size_h, size_w)
    noise = (raw.astype(np.float32) - 127.5) * np.float32(sigma / 73.6)  # uniform on 0..255 has std 73.6
    return cv2.add(image, cv2.merge([noise, noise, noise]), dtype=cv2.CV_8U)


def contrasting_colour(rng: np.random.Generator, under: np.ndarray) -> np.ndarray:
    """(3,) float32 random colour at least MIN_CONTRAST from the mean colour ``under`` (3,)."""
    candidates = rng.integers(0, 256, size=(16, 3)).astype(np.float32)
    far = np.linalg.norm(candidates - under, axis=1) >= MIN_CONTRAST
    if far.any():
        return candidates[int(np.argmax(far))]
    corners = np.array([[a, b, c] for a in (0, 255) for b in (0, 255) for c in (0, 255)], dtype=np.float32)
    return corners[int(np.argmax(np.linalg.norm(corners - under, axis=1)))]


def render_image(
    rng: np.random.Generator, size: int, kinds: tuple[str, ...], clutter: bool = True
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Draw one image.

    Returns image (size, size, 3) uint8 RGB, boxes (N, 4) float32 xyxy pixels tight around
    the visible pixels, labels (N,) int64 indices into ``kinds``, and visible (N,) float32:
    the fraction of each object's own pixels left uncovered (>= 1 - MAX_HIDDEN).
    """
    image = background(rng, size, clutter)
    owner = np.full((size, size), -1, dtype=np.int16)  # which object each pixel shows
    full_area: list[int] = []  # pixels each object owned when drawn
    visible_px: list[int] = []  # pixels each object still owns
    labels: list[int] = []
    windows: list[tuple[int, int, int, int]] = []

    count = 0 if rng.random() < BACKGROUND_ONLY_P else int(rng.integers(1, MAX_OBJECTS + 1))
    min_extent = MIN_SIZE_AT_300 * size / 300.0
    max_extent = 0.5 * size
    for _ in range(count):
        for _try in range(_PLACEMENT_TRIES):
            label = int(rng.integers(0, len(kinds)))
            kind = kinds[label]
            extent = float(np.exp(rng.uniform(np.log(min_extent), np.log(max_extent))))
            aspect = 1.0 if kind == "circle" else float(np.exp(rng.uniform(np.log(0.75), np.log(4 / 3))))
            angle = float(rng.uniform(0, _SYMMETRY_DEG.get(kind, 360.0)))
            reach = shape_reach(kind, extent, aspect)
            if 2 * reach >= size:
                continue
            cx = float(rng.uniform(reach, size - reach))
            cy = float(rng.uniform(reach, size - reach))
            x0, y0, alpha = shape_window(kind, cx, cy, extent, aspect, angle)
            mask = alpha >= 128
            area = int(mask.sum())
            if area == 0:
                continue
            y1, x1 = y0 + alpha.shape[0], x0 + alpha.shape[1]
            # Pixels of earlier objects this one would cover: none may lose more than MAX_HIDDEN.
            covered = owner[y0:y1, x0:x1][mask]
            hidden = np.bincount(covered[covered >= 0], minlength=len(labels))
            if np.any(np.asarray(visible_px) - hidden < (1 - MAX_HIDDEN) * np.asarray(full_area)):
                continue
            colour = contrasting_colour(rng, image[y0:y1, x0:x1].astype(np.float32).reshape(-1, 3).mean(axis=0))
            paint_shape(image, owner, len(labels), x0, y0, alpha, colour)
            visible_px = [v - int(h) for v, h in zip(visible_px, hidden)] + [area]
            full_area.append(area)
            labels.append(label)
            windows.append((x0, y0, x1, y1))
            break

    boxes = np.zeros((len(labels), 4), dtype=np.float32)
    visible = np.zeros(len(labels), dtype=np.float32)
    for k, window in enumerate(windows):  # at most MAX_OBJECTS: not a hot path
        box, pixels = owned_box(owner, k, window)
        boxes[k] = box
        visible[k] = pixels / full_area[k]

    if clutter:
        image = add_noise(rng, image)
    return image, boxes, np.asarray(labels, dtype=np.int64), visible


def make_shapes(
    num_images: int,
    *,
    size: int = 300,
    seed: int = 0,
    class_names: tuple[str, ...] = SHAPE_CLASSES,
    clutter: bool = True,
) -> tuple[list[ImageRecord], list[str]]:
    """Generate ``num_images`` synthetic images in memory (see the module docstring).

    ``class_names``: which shapes to draw and in which label order (a subset of
    ``SHAPE_CLASSES``). ``clutter=False`` keeps only the plain gradient background (for
    figures and tests). Returns the records and the class names.
    """
    if num_images < 0:
        raise ValueError(f"shapes dataset: num_images must be >= 0, got {num_images}")
    if size < 32:
        raise ValueError(f"shapes dataset: size must be >= 32 pixels, got {size}")
    names = tuple(class_names)
    unknown = [n for n in names if n not in SHAPE_CLASSES]
    if unknown or not names or len(set(names)) != len(names):
        raise ValueError(
            f"shapes dataset: class_names {list(names)} must be distinct names from {', '.join(SHAPE_CLASSES)}"
        )
    records = []
    for i in range(num_images):
        rng = np.random.default_rng([seed, i])
        image, boxes, labels, _ = render_image(rng, size, names, clutter)
        records.append(
            ImageRecord(image_id=i, width=size, height=size, boxes=boxes, labels=labels, path=None, image=image)
        )
    return records, list(names)
