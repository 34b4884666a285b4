"""COCO results files: write detections in the format the COCO server and pycocotools read,
and score such a file against a ground truth.

File format (cocodataset.org, "Results Format"): a JSON list of
``{"image_id": int, "category_id": int, "bbox": [x, y, w, h], "score": float}`` with the
dataset's original category ids and boxes in original-image pixels (x, y the top-left).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from onestage.eval.coco import CocoBackend, coco_metrics, detections_to_coco_results, validate_coco_results


def save_coco_results(
    path: str | Path,
    image_ids: Sequence[int],
    detections: Sequence[Mapping[str, np.ndarray]],
    category_ids: Sequence[int],
) -> int:
    """Write the detections as a COCO results JSON file; returns the number of entries.

    image_ids: the COCO id of each image (see ``coco.coco_image_id_map``); detections: per
    image ``boxes`` (K, 4) xyxy original-image pixels, ``scores`` (K,), ``labels`` (K,) in
    [0, C); category_ids: (C,) the dataset's id for each label. Written to a temporary file
    and renamed, so an interrupted run never leaves half a file.
    """
    results = detections_to_coco_results(image_ids, detections, category_ids)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(results, f)
    os.replace(tmp, path)
    return len(results)


def load_coco_results(results_path: str | Path, gt: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Read and check a results file; errors name the file and the first bad entries."""
    results_path = Path(results_path)
    if not results_path.is_file():
        raise FileNotFoundError(f"{results_path}: no such results file")
    try:
        results = json.loads(results_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{results_path}: not valid JSON: {exc}") from exc
    validate_coco_results(results, gt, source=str(results_path))
    return results


def score_results_file(
    results_path: str | Path, gt: Mapping[str, Any], backend: CocoBackend = "faster"
) -> dict[str, float]:
    """The COCO metrics (``coco.COCO_METRIC_KEYS``) of a results file against ``gt``,
    a COCO annotation dict (``coco.records_to_coco_gt`` makes one from records)."""
    return coco_metrics(gt, load_coco_results(results_path, gt), backend=backend)
