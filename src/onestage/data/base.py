"""The one dataset interface every format reads into.

A format reader (VOC, COCO JSON, YOLO txt, synthetic shapes) produces a list of
``ImageRecord`` plus the class names; ``DetectionDataset`` turns records into training
samples through a transform; ``collate`` pads a batch.

Contracts:
- ``ImageRecord.boxes``: (N, 4) float32 xyxy in absolute pixels of the image as stored on
  disk after EXIF orientation is applied (the frame a user sees in an image viewer).
- ``ImageRecord.labels``: (N,) int64 in [0, C): foreground class index into ``class_names``.
  SSD adds 1 internally because its class 0 is background; nothing else does.
- A sample (``DetectionDataset.__getitem__``): ``image`` (3, S, S) float32 normalized,
  ``boxes`` (N, 4) float32 xyxy normalized to [0, 1] of the network input, ``labels`` (N,),
  plus ``index`` into the records so that evaluation can look up the original size.
- A batch (``collate``): ``images`` (B, 3, S, S); ``boxes`` (B, M, 4) padded with zeros;
  ``labels`` (B, M) padded with -1 (``PAD_LABEL``); ``indices`` (B,).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from onestage.data.io import load_record_image
from onestage.data.problems import DataError
from onestage.data.record import ImageRecord

if TYPE_CHECKING:
    from onestage.data.mosaic import Mosaic

PAD_LABEL = -1


# A transform maps (image HxWx3 uint8 RGB, boxes (N,4) xyxy pixels, labels (N,)) to
# (image (3,S,S) float32 tensor, boxes (N,4) xyxy normalized, labels (N,)).
Transform = Callable[[np.ndarray, np.ndarray, np.ndarray], tuple[Tensor, np.ndarray, np.ndarray]]


@dataclass
class DetectionDataset(torch.utils.data.Dataset):
    """Records + class names + a transform = a map-style torch dataset."""

    records: Sequence[ImageRecord]
    class_names: list[str]
    transform: Transform
    image_loader: Callable[[ImageRecord], np.ndarray] = field(default=None)  # type: ignore[assignment]
    # With a seed, sample i of epoch e is augmented from a generator seeded by (seed, e, i):
    # the same whatever the number of workers, and after a resume in the middle of an epoch.
    seed: int | None = None
    epoch: int = 0
    # Keep every decoded image in memory, shrunk so that its longer side is at most this
    # many pixels (boxes scaled to match): large photographs are decoded once, not every
    # epoch. None: read from disk each time.
    cache_max_side: int | None = None
    # An image whose data turns out unreadable only when decoded (a JPEG truncated after a
    # valid header passes the readers' header checks): raise (False), or warn once, naming
    # the file, and use the next readable image in its place (True; training with
    # data.on_error: skip). Never for evaluation, where a substitute would count twice.
    skip_unreadable: bool = False
    # Training only: with probability mosaic.p a sample is its image tiled with three others
    # drawn at random (onestage.data.mosaic), before the transform. None: never.
    mosaic: Mosaic | None = None
    _cache: dict = field(default_factory=dict, repr=False)
    _unreadable: set = field(default_factory=set, repr=False)

    def __post_init__(self) -> None:
        if self.image_loader is None:
            self.image_loader = load_record_image

    def __len__(self) -> int:
        return len(self.records)

    def _readable(self, index: int) -> tuple[int, np.ndarray, float]:
        """(index actually used, image, scale): ``index`` itself unless it is unreadable and
        ``skip_unreadable`` is set, then the next readable one (wrapping around)."""
        for k in range(len(self.records)):
            i = (index + k) % len(self.records)
            if i in self._unreadable:
                continue
            try:
                image, scale = self._image(i, self.records[i])
                return i, image, scale
            except DataError as err:
                if not self.skip_unreadable:
                    raise
                self._unreadable.add(i)
                warnings.warn(f"{err}; skipped (data.on_error: skip): a readable image is used in its place", stacklevel=2)
        raise DataError(f"no readable image left among the {len(self.records)} images of this split")

    def _image(self, index: int, rec: ImageRecord) -> tuple[np.ndarray, float]:
        """(H, W, 3) uint8 RGB and the factor from record pixels to its pixels."""
        if self.cache_max_side is None:
            return self.image_loader(rec), 1.0
        if index not in self._cache:
            self._cache[index] = _shrink(self.image_loader(rec), self.cache_max_side)
        return self._cache[index]

    def __getitem__(self, index: int) -> dict:
        index, image, scale = self._readable(index)
        rec = self.records[index]
        if self.seed is not None:
            seed_sample(self.seed, self.epoch, index)
        # Training and evaluation never see `difficult` boxes' labels differently: they are
        # ignored by the evaluator only, so the model still learns from them.
        boxes, labels = rec.boxes * scale, rec.labels.copy()
        # (checked first so that a dataset without mosaic draws the same random numbers)
        if self.mosaic is not None and self.mosaic.p > 0 and np.random.random() < self.mosaic.p:
            image, boxes, labels = self.mosaic([(image, boxes, labels), *self._random_tiles(3)])
        image_t, boxes, labels = self.transform(image, boxes, labels)
        return {
            "image": image_t,
            "boxes": torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.as_tensor(labels, dtype=torch.int64).reshape(-1),
            "index": index,
        }

    def _random_tiles(self, count: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """``count`` (image, boxes in its pixels, labels) of random images, for a mosaic."""
        tiles = []
        for j in np.random.randint(len(self.records), size=count):
            j, image, scale = self._readable(int(j))
            tiles.append((image, self.records[j].boxes * scale, self.records[j].labels.copy()))
        return tiles


def _shrink(image: np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
    """Resize so that the longer side is at most ``max_side``; returns (image, scale)."""
    import cv2

    h, w = image.shape[:2]
    scale = min(1.0, max_side / max(h, w))
    if scale == 1.0:
        return image, 1.0
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    # the boxes follow the pixel grid actually produced (rounded sizes)
    return small, size[0] / w


def seed_sample(seed: int, epoch: int, index: int) -> None:
    """Seed every global generator a transform may draw from, for one sample."""
    import random

    value = int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)


def collate(samples: list[dict]) -> dict[str, Tensor]:
    """Stack images and pad boxes/labels to the largest count in the batch."""
    batch = len(samples)
    most = max([len(s["labels"]) for s in samples] + [1])
    boxes = torch.zeros(batch, most, 4)
    labels = torch.full((batch, most), PAD_LABEL, dtype=torch.int64)
    for i, s in enumerate(samples):
        n = len(s["labels"])
        boxes[i, :n] = s["boxes"]
        labels[i, :n] = s["labels"]
    return {
        "images": torch.stack([s["image"] for s in samples]),
        "boxes": boxes,
        "labels": labels,
        "indices": torch.tensor([s["index"] for s in samples], dtype=torch.int64),
    }
