"""``ImageRecord``: one image and its annotations as read from disk (a leaf module: it imports
nothing of onestage, so every reader, check and dataset can import it). Contracts: ``data/base.py``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class ImageRecord:
    """One image and its annotations, as read from disk (see the module docstring)."""

    image_id: int | str
    width: int
    height: int
    boxes: np.ndarray  # (N, 4) float32 xyxy absolute pixels
    labels: np.ndarray  # (N,) int64 in [0, C)
    difficult: np.ndarray | None = None  # (N,) bool; VOC `difficult`, COCO `iscrowd`
    path: Path | None = None  # image file; None for images held in memory (synthetic data)
    image: np.ndarray | None = None  # (H, W, 3) uint8 RGB when held in memory
    areas: np.ndarray | None = None  # (N,) COCO annotation `area` (segment area); box area when None
    # Video frames (format mot): each object's track id, the frame's 0-based index in its
    # video and the video's name; ``path`` is then the video file (or the frame's image).
    track_ids: np.ndarray | None = None  # (N,) int64
    frame_index: int | None = None
    video: str | None = None

    def __post_init__(self) -> None:
        self.boxes = np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4)
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        if self.difficult is None:
            self.difficult = np.zeros(len(self.labels), dtype=bool)
        self.difficult = np.asarray(self.difficult, dtype=bool).reshape(-1)
        if self.track_ids is not None:
            self.track_ids = np.asarray(self.track_ids, dtype=np.int64).reshape(-1)
            if len(self.track_ids) != len(self.labels):
                raise ValueError(f"{self.path or self.image_id}: {len(self.track_ids)} track ids for "
                                 f"{len(self.labels)} boxes")
        if not (len(self.boxes) == len(self.labels) == len(self.difficult)):
            raise ValueError(
                f"{self.path or self.image_id}: {len(self.boxes)} boxes, {len(self.labels)} labels, "
                f"{len(self.difficult)} difficult flags; they must be equal"
            )
