"""COCO JSON reader (``instances_*.json``: images, annotations, categories).

Contract: records in the order of the JSON's ``images`` list; ``image_id`` is the COCO
image id (an int, as COCO evaluation needs); ``boxes`` (N, 4) float32 xyxy absolute pixels
from COCO's ``bbox`` (x, y, w, h), clipped to the image; ``difficult`` = ``iscrowd`` (COCO
evaluation ignores crowd regions rather than counting them as misses, as VOC does with
``difficult``); ``areas`` = the annotation ``area`` (segment area, which defines COCO's
small/medium/large ranges). Images without annotations are kept as background records.
``CocoSpec.category_ids[i]`` is the original COCO category id of class index ``i``
(COCO ids run 1-90 with gaps; class indices are contiguous 0..C-1).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from onestage.data.record import ImageRecord
from onestage.data.io import image_info, note_image_quirks, safe_join
from onestage.data.problems import DataError, DatasetSpec, OnError, ProblemLog, fix_boxes


@dataclass
class CocoSpec(DatasetSpec):
    """A ``DatasetSpec`` plus the map from class index to original COCO category id."""

    category_ids: list[int] = field(default_factory=list)


def _load_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DataError(f"{path}: COCO annotation file not found")
    try:
        with path.open("rb") as f:
            data = json.load(f)
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: malformed JSON: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not a UTF-8 JSON file: {exc}") from exc
    if not isinstance(data, dict):
        raise DataError(f"{path}: the top level must be an object with images, annotations, categories")
    for key in ("images", "categories"):
        if not isinstance(data.get(key), list):
            raise DataError(f"{path}: missing or non-list {key!r} (found keys: {', '.join(data)})")
    if not isinstance(data.get("annotations", []), list):
        raise DataError(f"{path}: 'annotations' must be a list")
    return data


def _categories(path: Path, data: dict[str, Any], class_names: list[str] | None) -> tuple[list[str], list[int]]:
    """(class names, COCO category id per class index); ordered by id unless names are given."""
    cats: dict[int, str] = {}
    for k, c in enumerate(data["categories"]):
        if not isinstance(c, dict) or not isinstance(c.get("id"), int) or not isinstance(c.get("name"), str):
            raise DataError(f"{path}: category #{k} needs an integer 'id' and a string 'name', got {c!r}")
        if c["id"] in cats:
            raise DataError(f"{path}: category id {c['id']} appears twice ({cats[c['id']]!r}, {c['name']!r})")
        cats[c["id"]] = c["name"]
    if class_names is None:
        ids = sorted(cats)
        return [cats[i] for i in ids], ids
    by_name = {name: cid for cid, name in cats.items()}
    missing = [n for n in class_names if n not in by_name]
    if missing:
        raise DataError(f"{path}: class {', '.join(map(repr, missing))} is not among the file's "
                        f"categories: {', '.join(cats.values())}")
    return list(class_names), [by_name[n] for n in class_names]


def _image_entry(path: Path, k: int, im: Any) -> tuple[int, str, float, float]:
    if not isinstance(im, dict) or not isinstance(im.get("id"), int) or not isinstance(im.get("file_name"), str):
        raise DataError(f"{path}: images[{k}] needs an integer 'id' and a string 'file_name', got {im!r}")
    w, h = im.get("width", 0), im.get("height", 0)
    if not isinstance(w, (int, float)) or not isinstance(h, (int, float)):
        raise DataError(f"{path}: image {im['file_name']!r} has a non-numeric width/height")
    return im["id"], im["file_name"], float(w), float(h)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _annotation(ann: Any) -> tuple[list[float], Any, bool, float | None]:
    """Validated ([x, y, w, h], category_id, iscrowd, area or None) of one annotation.

    Raises DataError whose text names the annotation id and the problem.
    """
    if not isinstance(ann, dict):
        raise DataError(f"annotation {ann!r:.120} is not an object")
    bbox = ann.get("bbox")
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
        raise DataError(f"annotation id {ann.get('id')}: 'bbox' must be 4 finite numbers [x, y, w, h], got {bbox!r}")
    category = ann.get("category_id")
    if not isinstance(category, int) or isinstance(category, bool):
        raise DataError(f"annotation id {ann.get('id')}: 'category_id' must be an integer, got {category!r}")
    area = ann.get("area")
    if area is not None and not _is_number(area):
        raise DataError(f"annotation id {ann.get('id')}: 'area' must be a number, got {area!r}")
    return [float(v) for v in bbox], category, bool(ann.get("iscrowd", 0)), area


def _image_entries(annotation_file: Path, data: dict) -> list[tuple[int, str, float, float]]:
    """(id, file name, JSON width, JSON height) of every image; a repeated id is an error."""
    images: list[tuple[int, str, float, float]] = []
    known_ids: set[int] = set()
    for k, im in enumerate(data["images"]):
        entry = _image_entry(annotation_file, k, im)
        if entry[0] in known_ids:
            raise DataError(f"{annotation_file}: image id {entry[0]} appears twice in 'images'")
        known_ids.add(entry[0])
        images.append(entry)
    return images


def _annotations_by_image(annotation_file: Path, data: dict, known_ids: set[int], log: ProblemLog) -> dict[int, list[Any]]:
    """The annotations grouped by image once (no per-image scan of the whole list)."""
    per_image: dict[int, list[Any]] = {}
    for ann in data.get("annotations", []):
        image_id = ann.get("image_id") if isinstance(ann, dict) else None
        if not isinstance(image_id, int) or image_id not in known_ids:
            log.error(annotation_file, "bad_annotation",
                      f"annotation {ann!r:.120} refers to image_id {image_id!r}, which is not in 'images'")
            continue
        per_image.setdefault(image_id, []).append(ann)
    return per_image


def _record(
    image_id: int, path: Path, width: float, height: float, annotations: list[Any], label_of: dict[int, int],
    all_categories: dict[int, str], names: list[str], where: str, log: ProblemLog,
) -> ImageRecord | None:
    """One image's record from its annotations; None (logged) when one is malformed or of an unknown class."""
    try:
        parsed = [_annotation(a) for a in annotations]
    except DataError as exc:
        log.error(where, "bad_annotation", str(exc))
        return None
    xywh = np.asarray([p[0] for p in parsed], dtype=np.float64).reshape(-1, 4)  # (N, 4)
    cats = [p[1] for p in parsed]
    unknown = sorted({c for c in cats if c not in label_of})
    if unknown:
        shown = ", ".join(f"{c} ({all_categories[c]})" if c in all_categories else str(c) for c in unknown)
        log.error(where, "unknown_class", f"category_id {shown} is not among the known classes: {', '.join(names)}")
        return None
    labels = np.asarray([label_of[c] for c in cats], dtype=np.int64)
    crowd = np.asarray([p[2] for p in parsed], dtype=bool)
    # A missing `area` falls back to the box area, as pycocotools' loadRes does.
    areas = np.asarray([p[3] if p[3] is not None else p[0][2] * p[0][3] for p in parsed], dtype=np.float32)
    xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)  # (N, 4)
    boxes, keep = fix_boxes(xyxy, width, height, where, log)
    return ImageRecord(image_id=image_id, width=int(width), height=int(height), boxes=boxes, labels=labels[keep],
                       difficult=crowd[keep], path=path, areas=areas[keep])


def read_coco(
    annotation_file: Path,
    image_dir: Path,
    *,
    class_names: list[str] | None = None,
    on_error: OnError = "raise",
    verify_sizes: bool = True,
) -> CocoSpec:
    """Read a COCO JSON file and its image folder into records (module docstring: contract).

    class_names: fixes the class order by category name (an annotation of another
    category is an ``unknown_class`` error for its image); None: categories by id.
    verify_sizes: read each image's header and use its real size when the JSON's
    width/height are missing or wrong (``size_mismatch``); False trusts the JSON.
    A malformed JSON file raises ``DataError`` whatever on_error says: nothing in it
    can be trusted. A malformed annotation makes its image an error (skipped under "skip").
    """
    annotation_file = Path(annotation_file)
    image_dir = Path(image_dir)
    log = ProblemLog(on_error)
    data = _load_json(annotation_file)
    names, category_ids = _categories(annotation_file, data, class_names)
    images = _image_entries(annotation_file, data)
    per_image = _annotations_by_image(annotation_file, data, {entry[0] for entry in images}, log)
    label_of = {cid: i for i, cid in enumerate(category_ids)}
    all_categories = {c["id"]: c["name"] for c in data["categories"]}
    records: list[ImageRecord] = []
    for image_id, file_name, json_w, json_h in images:
        where = f"{annotation_file} (image {file_name!r})"
        try:
            path = safe_join(image_dir, file_name)
        except DataError as exc:
            log.error(where, "path_escape", str(exc))
            continue
        if not path.is_file():
            log.error(path, "missing_image", f"image file not found (listed in {annotation_file} as id {image_id})")
            continue
        width, height = json_w, json_h
        if verify_sizes or width <= 0 or height <= 0:
            try:
                info = image_info(path)
            except DataError as exc:
                log.error(path, "corrupt_image", str(exc).removeprefix(f"{path}: "))
                continue
            note_image_quirks(info, path, log)
            width, height = info.width, info.height
            if json_w > 0 and json_h > 0 and (json_w, json_h) != (width, height):
                log.fix(where, "size_mismatch", f"JSON says {json_w:g}x{json_h:g} but the image is "
                        f"{width}x{height} (EXIF orientation applied); using the image size", "kept")
        record = _record(image_id, path, width, height, per_image.get(image_id, []), label_of, all_categories,
                         names, where, log)
        if record is not None:
            records.append(record)
    return CocoSpec(records=records, class_names=names, problems=log, category_ids=category_ids)
