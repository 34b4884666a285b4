"""``Prediction``: one image's detections in its own pixels, and ``detections.json``.

Torch-free (numpy only), so that the checkpoint path (``onestage.api``) and the ONNX runtime
(``onestage.export.runtime``) return and write the very same objects.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class Prediction:
    """One image's detections in its original pixels."""

    boxes: np.ndarray  # (K, 4) float32 xyxy, original-image pixels
    scores: np.ndarray  # (K,) float32, descending
    labels: np.ndarray  # (K,) int64 in [0, C)
    names: list[str]  # the class name of each detection
    width: int
    height: int

    def __len__(self) -> int:
        return len(self.scores)

    def to_json(self) -> dict[str, Any]:
        return {
            "width": self.width, "height": self.height,
            "detections": [
                {"box_xyxy": [round(float(v), 2) for v in b], "score": round(float(s), 4), "label": int(c), "class": n}
                for b, s, c, n in zip(self.boxes, self.scores, self.labels, self.names)
            ],
        }


def save_predictions(predictions: Sequence[Prediction], sources: Sequence[str], path: Path) -> Path:
    """``detections.json``: one entry per image with its source, size and detections."""
    path.write_text(json.dumps([{"image": s, **p.to_json()} for s, p in zip(sources, predictions)], indent=2))
    return path
