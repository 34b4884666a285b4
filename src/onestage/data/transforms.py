"""Augmentation pipelines and evaluation transforms.

Contract (docs/contracts.md): a transform maps
``(image (H, W, 3) uint8 RGB, boxes (N, 4) xyxy absolute pixels, labels (N,) int64)`` to
``(image (3, S, S) float32 tensor normalized with mean/std, boxes (N', 4) float32 xyxy
normalized to [0, 1] of the network input, labels (N',) int64)``. Evaluation transforms
also offer ``invert_boxes(boxes_norm (K, 4), width, height) -> (K, 4)`` xyxy pixels of the
original image.

Box rule, the same in every transform: boxes are clipped to the output image; a box whose
area after clipping is less than ``min_visible`` of its area before (in output pixels) is
dropped, and so is a box narrower or shorter than 1 output pixel. The SSD crop also keeps
only boxes whose centre lies inside the crop (SSD paper, section 2.2, "Data augmentation").

Geometry is done in one step: every pipeline reduces its zoom-out / crop / letterbox /
affine scale-and-translate to one axis-aligned map ``x_out = kx * x + bx``, then resizes
only the part of the source image that lands in the output and pastes it onto a canvas of
the fill colour. A 4x zoom-out thus never builds the 4x canvas, and pixels and boxes go
through the same map (rounded to whole output pixels at the edges of the pasted patch, and
the boxes use the rounded map, so they stay exact).

Randomness: every random number is drawn from numpy's global generator (``np.random``);
the albumentations colour jitter is reseeded from it on each call. The training dataset
seeds numpy (and ``random``, torch) per sample from (seed, epoch, image index) before calling
a transform (``data.base.seed_sample``), so every augmentation is fixed by those three,
whichever data-loader worker or process draws the sample, and a resumed run repeats it.
"""

from __future__ import annotations

import os

import cv2
import numpy as np
import torch
from torch import Tensor

# The torch-free geometry (resizing, placement plans, normalization), shared with the ONNX
# runtime; re-exported here, where the transforms have always offered it.
from onestage.data.geometry import (  # noqa: F401
    IMAGENET_MEAN, IMAGENET_STD, YOLO_PAD_VALUE, Placement, Plan, Triple, eval_plan, fill_colour, invert_boxes,
    normalize_image, plan_placement, render, resize,
)

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no network call at import
import albumentations as A  # noqa: E402

# (image (3, S, S) float32 normalized, boxes (N, 4) float32 xyxy in [0, 1], labels (N,) int64)
Sample = tuple[Tensor, np.ndarray, np.ndarray]
# SSD min-IoU crop: the minimum overlaps of the SSD paper, None = keep the whole image.
SSD_CROP_MIN_IOUS: tuple[float | None, ...] = (None, 0.1, 0.3, 0.5, 0.7, 0.9)
SSD_CROP_TRIALS = 50


# --------------------------------------------------------------------------- pure helpers
def check_sample(image: np.ndarray, boxes: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate a transform's input; return boxes (N, 4) float32 and labels (N,) int64."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        desc = f"shape {getattr(image, 'shape', None)} dtype {getattr(image, 'dtype', type(image).__name__)}"
        raise ValueError(f"transform input: expected an (H, W, 3) uint8 RGB image, got {desc}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"transform input: empty image of shape {image.shape}")
    boxes = np.asarray(boxes, dtype=np.float32).reshape(-1, 4)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if len(boxes) != len(labels):
        raise ValueError(f"transform input: {len(boxes)} boxes but {len(labels)} labels")
    return boxes, labels


def to_tensor(image: np.ndarray, mean: Triple, std: Triple) -> Tensor:
    """(H, W, 3) uint8 RGB -> (3, H, W) float32 tensor ``(x / 255 - mean) / std`` (``normalize_image``)."""
    return torch.from_numpy(normalize_image(image, mean, std))


def denormalize(image: Tensor, mean: Triple = IMAGENET_MEAN, std: Triple = IMAGENET_STD) -> np.ndarray:
    """(3, S, S) normalized tensor -> (S, S, 3) uint8 RGB: what the network sees, for drawing."""
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(f"denormalize: expected a (3, H, W) tensor, got shape {tuple(image.shape)}")
    x = image.detach().float().cpu().numpy().transpose(1, 2, 0)
    x = (x * np.asarray(std, dtype=np.float32) + np.asarray(mean, dtype=np.float32)) * 255.0
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def hflip(image: np.ndarray, boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mirror (H, W, 3) image and (N, 4) xyxy pixel boxes: x1' = W - x2, x2' = W - x1."""
    width = image.shape[1]
    flipped = boxes.copy()
    flipped[:, 0] = width - boxes[:, 2]
    flipped[:, 2] = width - boxes[:, 0]
    return np.ascontiguousarray(image[:, ::-1]), flipped


def clip_and_filter(
    boxes: np.ndarray, labels: np.ndarray, width: float, height: float, min_visible: float
) -> tuple[np.ndarray, np.ndarray]:
    """Clip (N, 4) xyxy pixel boxes to [0, width] x [0, height]; drop those that keep less
    than ``min_visible`` of their area, and those under 1 px wide or tall (module docstring)."""
    area_before = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])  # (N,)
    clipped = np.empty_like(boxes)
    clipped[:, 0::2] = np.clip(boxes[:, 0::2], 0, width)
    clipped[:, 1::2] = np.clip(boxes[:, 1::2], 0, height)
    w = clipped[:, 2] - clipped[:, 0]
    h = clipped[:, 3] - clipped[:, 1]
    keep = (area_before > 0) & (w >= 1) & (h >= 1) & (w * h >= min_visible * area_before)
    return clipped[keep], labels[keep]


def normalize_boxes(boxes: np.ndarray, size: int) -> np.ndarray:
    """(N, 4) pixels of an S x S image -> (N, 4) float32 in [0, 1]."""
    return np.clip(boxes / np.float32(size), 0.0, 1.0).astype(np.float32)


def _same_kind(values: np.ndarray, like: np.ndarray | Tensor) -> np.ndarray | Tensor:
    if isinstance(like, Tensor):
        dtype = like.dtype if like.is_floating_point() else torch.float32
        return torch.as_tensor(values, dtype=dtype, device=like.device)
    return values.astype(np.float32)


def _invert(plan: Plan, boxes_norm: np.ndarray | Tensor, size: int, width: int, height: int) -> np.ndarray | Tensor:
    """(K, 4) normalized network-input boxes -> (K, 4) pixels of the original image, clipped to it."""
    if isinstance(boxes_norm, Tensor):
        b = boxes_norm.detach().cpu().double().numpy()
    else:
        b = np.asarray(boxes_norm, dtype=np.float64)
    return _same_kind(invert_boxes(plan, b, size, width, height), boxes_norm)


# --------------------------------------------------------------------------- SSD sampling
def sample_zoom_out(width: int, height: int, max_ratio: float) -> tuple[float, float, float, float]:
    """SSD zoom-out ("expand"): a canvas ``r`` times the image, r ~ U(1, max_ratio), with the
    image at a uniform random position. Returns (canvas_w, canvas_h, left, top) in pixels."""
    ratio = np.random.uniform(1.0, max_ratio)
    canvas_w, canvas_h = width * ratio, height * ratio
    left = np.random.uniform(0.0, canvas_w - width)
    top = np.random.uniform(0.0, canvas_h - height)
    return float(canvas_w), float(canvas_h), float(left), float(top)


def sample_iou_crop(
    boxes: np.ndarray,
    width: float,
    height: float,
    *,
    min_ious: tuple[float | None, ...] = SSD_CROP_MIN_IOUS,
    trials: int = SSD_CROP_TRIALS,
    min_scale: float = 0.3,
    aspect_range: tuple[float, float] = (0.5, 2.0),
) -> tuple[np.ndarray, np.ndarray]:
    """SSD min-IoU random crop (SSD paper, section 2.2).

    boxes: (N, 4) xyxy pixels in a width x height image. Picks a minimum IoU from
    ``min_ious`` (None keeps the whole image), then samples ``trials`` patches at once
    (sides U(min_scale, 1) of the image's, aspect h/w within ``aspect_range``, uniform
    position) and takes the first whose centre-inside boxes include one with IoU >= the
    minimum (the rule of torchvision's ``RandomIoUCrop``). With no box, any patch of a valid
    aspect is taken. If no trial succeeds, the whole image is kept. Returns the crop (4,)
    float64 xyxy and keep (N,) bool, True for boxes whose centre lies strictly inside.
    """
    whole = np.array([0.0, 0.0, width, height])
    all_kept = np.ones(len(boxes), dtype=bool)
    min_iou = min_ious[np.random.randint(len(min_ious))]
    if min_iou is None:
        return whole, all_kept
    u = np.random.uniform(size=(trials, 4))
    cw = width * (min_scale + (1 - min_scale) * u[:, 0])  # (T,)
    ch = height * (min_scale + (1 - min_scale) * u[:, 1])
    left = (width - cw) * u[:, 2]
    top = (height - ch) * u[:, 3]
    crops = np.stack((left, top, left + cw, top + ch), axis=1)  # (T, 4)
    valid = (ch / cw >= aspect_range[0]) & (ch / cw <= aspect_range[1])  # (T,)
    if len(boxes):
        b = boxes.astype(np.float64)
        cx = 0.5 * (b[:, 0] + b[:, 2])  # (N,)
        cy = 0.5 * (b[:, 1] + b[:, 3])
        inside = (
            (crops[:, None, 0] < cx) & (cx < crops[:, None, 2]) & (crops[:, None, 1] < cy) & (cy < crops[:, None, 3])
        )  # (T, N)
        iw = np.clip(np.minimum(crops[:, None, 2], b[:, 2]) - np.maximum(crops[:, None, 0], b[:, 0]), 0, None)
        ih = np.clip(np.minimum(crops[:, None, 3], b[:, 3]) - np.maximum(crops[:, None, 1], b[:, 1]), 0, None)
        inter = iw * ih  # (T, N)
        area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
        iou = inter / np.maximum((cw * ch)[:, None] + area_b[None, :] - inter, 1e-12)
        best = np.where(inside, iou, -1.0).max(axis=1)  # (T,)
        valid &= best >= min_iou
    if not valid.any():
        return whole, all_kept
    k = int(np.argmax(valid))
    keep = inside[k] if len(boxes) else all_kept
    return crops[k], keep


# --------------------------------------------------------------------------- colour
def hsv_jitter(image: np.ndarray, gains: tuple[float, float, float] | np.ndarray) -> np.ndarray:
    """Multiply hue, saturation and value of (H, W, 3) uint8 RGB by ``gains`` through
    lookup tables (hue wraps around), as ultralytics' ``augment_hsv`` does for YOLO."""
    hue, sat, val = cv2.split(cv2.cvtColor(image, cv2.COLOR_RGB2HSV))
    x = np.arange(256, dtype=np.float32)
    lut_h = ((x * gains[0]) % 180).astype(np.uint8)
    lut_s = np.clip(x * gains[1], 0, 255).astype(np.uint8)
    lut_v = np.clip(x * gains[2], 0, 255).astype(np.uint8)
    merged = cv2.merge((cv2.LUT(hue, lut_h), cv2.LUT(sat, lut_s), cv2.LUT(val, lut_v)))
    return cv2.cvtColor(merged, cv2.COLOR_HSV2RGB)


def _reseeded(transform: A.BasicTransform) -> A.BasicTransform:
    # albumentations >= 2 keeps its own generator, blind to np.random.seed and so to the data
    # loader's per-worker seeding: draw its seed from numpy's global generator on every call.
    if hasattr(transform, "set_random_seed"):
        transform.set_random_seed(int(np.random.randint(0, 2**31 - 1)))
    return transform


# --------------------------------------------------------------------------- transforms
class EvalTransform:
    """Resize to S x S (no letterbox, aspect not kept) and normalize; boxes follow."""

    def __init__(self, size: int, mean: Triple = IMAGENET_MEAN, std: Triple = IMAGENET_STD) -> None:
        self.size, self.mean, self.std = size, mean, std

    def plan(self, width: int, height: int) -> Plan:
        return eval_plan("resize", width, height, self.size)

    def __call__(self, image: np.ndarray, boxes: np.ndarray, labels: np.ndarray) -> Sample:
        boxes, labels = check_sample(image, boxes, labels)
        plan = self.plan(image.shape[1], image.shape[0])
        out = render(image, plan, self.size, (0, 0, 0))
        out_boxes, labels = clip_and_filter(plan.placement.forward(boxes), labels, self.size, self.size, 0.0)
        return to_tensor(out, self.mean, self.std), normalize_boxes(out_boxes, self.size), labels

    def invert_boxes(self, boxes_norm: np.ndarray | Tensor, width: int, height: int) -> np.ndarray | Tensor:
        """(K, 4) xyxy normalized network-input boxes -> (K, 4) xyxy pixels of the
        width x height original, clipped to it; same kind (ndarray / Tensor) as given."""
        return _invert(self.plan(width, height), boxes_norm, self.size, width, height)


class LetterboxEvalTransform:
    """Scale the long side to S keeping the aspect ratio, centre, pad with ``pad_value``."""

    def __init__(
        self, size: int, mean: Triple = IMAGENET_MEAN, std: Triple = IMAGENET_STD, pad_value: int = YOLO_PAD_VALUE
    ) -> None:
        self.size, self.mean, self.std, self.pad_value = size, mean, std, pad_value

    def plan(self, width: int, height: int) -> Plan:
        return eval_plan("letterbox", width, height, self.size)

    def __call__(self, image: np.ndarray, boxes: np.ndarray, labels: np.ndarray) -> Sample:
        boxes, labels = check_sample(image, boxes, labels)
        plan = self.plan(image.shape[1], image.shape[0])
        out = render(image, plan, self.size, (self.pad_value,) * 3)
        out_boxes, labels = clip_and_filter(plan.placement.forward(boxes), labels, self.size, self.size, 0.0)
        return to_tensor(out, self.mean, self.std), normalize_boxes(out_boxes, self.size), labels

    def invert_boxes(self, boxes_norm: np.ndarray | Tensor, width: int, height: int) -> np.ndarray | Tensor:
        """(K, 4) xyxy normalized network-input boxes -> (K, 4) xyxy pixels of the
        width x height original (padding removed, scale undone, clipped to the image)."""
        return _invert(self.plan(width, height), boxes_norm, self.size, width, height)


class FlipOnlyTransform(EvalTransform):
    """Horizontal flip with probability ``p`` then resize: the reference-library comparison setting."""

    def __init__(self, size: int, mean: Triple = IMAGENET_MEAN, std: Triple = IMAGENET_STD, *, p: float = 0.5) -> None:
        super().__init__(size, mean, std)
        self.p = p

    def __call__(self, image: np.ndarray, boxes: np.ndarray, labels: np.ndarray) -> Sample:
        boxes, labels = check_sample(image, boxes, labels)
        plan = self.plan(image.shape[1], image.shape[0])
        out = render(image, plan, self.size, (0, 0, 0))
        out_boxes, labels = clip_and_filter(plan.placement.forward(boxes), labels, self.size, self.size, 0.0)
        if np.random.random() < self.p:
            out, out_boxes = hflip(out, out_boxes)
        return to_tensor(out, self.mean, self.std), normalize_boxes(out_boxes, self.size), labels


class SSDTrainTransform:
    """The SSD training augmentation (SSD paper, section 2.2; torchvision's SSD reference):

    1. photometric distortion (brightness, contrast, saturation, hue in random order:
       ``A.ColorJitter`` with the torchvision SSD recipe's ranges), on the image pixels only;
    2. zoom-out with probability ``zoom_out_p``: a canvas up to ``zoom_out`` times the image,
       filled with the mean colour (small objects for the coarse default boxes);
    3. min-IoU random crop (``sample_iou_crop``) when ``crop``; boxes whose centre leaves the
       crop are dropped;
    4. resize to S x S, then horizontal flip with probability ``flip``.

    Boxes are clipped to the output; a box keeping less than ``min_visible`` of its area
    after clipping is dropped, and so is one under 1 output pixel wide or tall. Random
    numbers come from numpy's global generator (see the module docstring).
    """

    def __init__(
        self,
        size: int,
        mean: Triple = IMAGENET_MEAN,
        std: Triple = IMAGENET_STD,
        *,
        photometric: bool = True,
        zoom_out: float = 4.0,
        min_visible: float = 0.3,
        zoom_out_p: float = 0.5,
        crop: bool = True,
        flip: float = 0.5,
    ) -> None:
        if zoom_out < 1:
            raise ValueError(f"SSDTrainTransform: zoom_out must be >= 1, got {zoom_out}")
        self.size, self.mean, self.std = size, mean, std
        self.photometric, self.zoom_out, self.min_visible = photometric, zoom_out, min_visible
        self.zoom_out_p, self.crop, self.flip = zoom_out_p, crop, flip
        self.fill = fill_colour(mean)
        # torchvision references/detection RandomPhotometricDistort ranges for SSD.
        self._jitter = A.ColorJitter(brightness=0.125, contrast=0.5, saturation=0.5, hue=0.05, p=1.0)

    def _distort(self, patch: np.ndarray) -> np.ndarray:
        return _reseeded(self._jitter)(image=patch)["image"]

    def __call__(self, image: np.ndarray, boxes: np.ndarray, labels: np.ndarray) -> Sample:
        boxes, labels = check_sample(image, boxes, labels)
        height, width = image.shape[:2]
        canvas_w, canvas_h, left, top = float(width), float(height), 0.0, 0.0
        if self.zoom_out > 1 and np.random.random() < self.zoom_out_p:
            canvas_w, canvas_h, left, top = sample_zoom_out(width, height, self.zoom_out)
        if self.crop:
            canvas_boxes = boxes + np.array([left, top, left, top], dtype=np.float32)
            crop, keep = sample_iou_crop(canvas_boxes, canvas_w, canvas_h)
        else:
            crop, keep = np.array([0.0, 0.0, canvas_w, canvas_h]), np.ones(len(boxes), dtype=bool)
        kx = self.size / (crop[2] - crop[0])
        ky = self.size / (crop[3] - crop[1])
        plan = plan_placement(width, height, kx, ky, (left - crop[0]) * kx, (top - crop[1]) * ky, self.size)
        out = render(image, plan, self.size, self.fill, self._distort if self.photometric else None)
        out_boxes, labels = clip_and_filter(
            plan.placement.forward(boxes[keep]), labels[keep], self.size, self.size, self.min_visible
        )
        if np.random.random() < self.flip:
            out, out_boxes = hflip(out, out_boxes)
        return to_tensor(out, self.mean, self.std), normalize_boxes(out_boxes, self.size), labels


class YOLOTrainTransform:
    """The YOLO training augmentation (as in ultralytics' ``random_perspective`` without
    rotation, shear or perspective):

    letterbox to S x S keeping the aspect ratio (pad ``pad_value``), then a random scale
    U(1 - scale, 1 + scale) about the centre and a translation U(-translate, translate) x S,
    HSV jitter (gains U(1 - g, 1 + g) for hue, saturation, value; ``hsv_jitter``) on the
    image pixels, horizontal flip with probability ``flip``. Same clipping/dropping rule as
    ``SSDTrainTransform``; random numbers from numpy's global generator.
    """

    def __init__(
        self,
        size: int,
        mean: Triple = IMAGENET_MEAN,
        std: Triple = IMAGENET_STD,
        *,
        hsv: tuple[float, float, float] = (0.015, 0.7, 0.4),
        scale: float = 0.5,
        translate: float = 0.1,
        flip: float = 0.5,
        min_visible: float = 0.3,
        pad_value: int = YOLO_PAD_VALUE,
    ) -> None:
        if not 0 <= scale < 1:
            raise ValueError(f"YOLOTrainTransform: scale must be in [0, 1), got {scale}")
        self.size, self.mean, self.std = size, mean, std
        self.hsv, self.scale, self.translate, self.flip = hsv, scale, translate, flip
        self.min_visible, self.pad_value = min_visible, pad_value

    def __call__(self, image: np.ndarray, boxes: np.ndarray, labels: np.ndarray) -> Sample:
        boxes, labels = check_sample(image, boxes, labels)
        height, width = image.shape[:2]
        s = np.random.uniform(1 - self.scale, 1 + self.scale)
        tx, ty = np.random.uniform(-self.translate, self.translate, size=2) * self.size
        k = self.size / max(width, height) * s
        bx = 0.5 * self.size + tx - 0.5 * k * width
        by = 0.5 * self.size + ty - 0.5 * k * height
        plan = plan_placement(width, height, k, k, bx, by, self.size)
        gains = np.random.uniform(-1, 1, size=3) * np.asarray(self.hsv) + 1
        jitter = (lambda patch: hsv_jitter(patch, gains)) if any(self.hsv) else None
        out = render(image, plan, self.size, (self.pad_value,) * 3, jitter)
        out_boxes, labels = clip_and_filter(
            plan.placement.forward(boxes), labels, self.size, self.size, self.min_visible
        )
        if np.random.random() < self.flip:
            out, out_boxes = hflip(out, out_boxes)
        return to_tensor(out, self.mean, self.std), normalize_boxes(out_boxes, self.size), labels
