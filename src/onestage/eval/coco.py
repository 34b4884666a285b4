"""COCO box metrics, through faster-coco-eval with pycocotools as the reference.

Both backends take the same inputs and give the same twelve numbers (DESIGN.md section 4:
"COCO metrics must agree with pycocotools"; the tests check it to 1e-4 on coco128 with
crowd objects). faster-coco-eval is the default because it runs the matching and the
accumulation in C++ (about 7x faster on 5000 images, see benchmarks/eval_speed.py).

Contracts:
- ``gt``: a COCO annotation dict (``images``, ``annotations`` with ``bbox`` as
  ``[x, y, w, h]`` pixels, ``area``, ``iscrowd``; ``categories``).
- ``results``: the COCO results format, a list of
  ``{"image_id": int, "category_id": int, "bbox": [x, y, w, h], "score": float}``.
- Detections from our models (see docs/contracts.md): per image a dict of numpy
  ``boxes`` (K, 4) xyxy original-image pixels, ``scores`` (K,), ``labels`` (K,) in [0, C).

Crowd objects (``iscrowd: 1``, which ``ImageRecord.difficult`` carries) are handled by the
evaluators exactly as COCO does: a detection matched to one is ignored, never a miss.
Like pycocotools, a metric with nothing to average (say no small objects) is -1.
"""

from __future__ import annotations

import contextlib
import io
from typing import Any, Literal, Mapping, Sequence

import numpy as np

from onestage.data.record import ImageRecord

CocoBackend = Literal["faster", "pycocotools"]

# The order of COCOeval.stats for boxes (pycocotools cocoeval.py, summarize()).
COCO_METRIC_KEYS: tuple[str, ...] = (
    "coco_ap",
    "coco_ap50",
    "coco_ap75",
    "coco_ap_small",
    "coco_ap_medium",
    "coco_ap_large",
    "coco_ar1",
    "coco_ar10",
    "coco_ar100",
    "coco_ar_small",
    "coco_ar_medium",
    "coco_ar_large",
)


def _silent(*args: Any, **kwargs: Any) -> None:
    """A print function that prints nothing (the evaluators log every step)."""


def _copy_gt(gt: Mapping[str, Any]) -> dict[str, Any]:
    """Copy deep enough that the evaluators' in-place edits (they add ``ignore`` to every
    annotation in ``_prepare``) never reach the caller's dict."""
    out = dict(gt)
    out["annotations"] = [dict(a) for a in gt.get("annotations", [])]
    out.setdefault("images", [])
    out.setdefault("categories", [])
    return out


def _stats_faster(gt: dict[str, Any], results: list[dict[str, Any]]) -> np.ndarray:
    from faster_coco_eval import COCO, COCOeval_faster

    coco_gt = COCO(gt, print_function=_silent)
    coco_dt = coco_gt.loadRes(results)
    evaluator = COCOeval_faster(coco_gt, coco_dt, "bbox", print_function=_silent)
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    return np.asarray(evaluator.stats[: len(COCO_METRIC_KEYS)], dtype=np.float64)


def _stats_pycocotools(gt: dict[str, Any], results: list[dict[str, Any]]) -> np.ndarray:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    coco_gt = COCO()  # pycocotools only reads files; hand it the dict instead
    coco_gt.dataset = gt
    coco_gt.createIndex()
    coco_dt = coco_gt.loadRes(results)
    evaluator = COCOeval(coco_gt, coco_dt, "bbox")
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    return np.asarray(evaluator.stats, dtype=np.float64)


_RESULT_KEYS = frozenset({"image_id", "category_id", "bbox", "score"})


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_))


def _entry_problems(i: int, r: Any, image_ids: set, category_ids: set) -> list[str]:
    """What is wrong with one results entry (empty when nothing)."""
    if not isinstance(r, dict):
        return [f"entry {i}: expected an object, got {type(r).__name__}"]
    missing = sorted(_RESULT_KEYS - r.keys())
    if missing:
        return [f"entry {i}: missing {', '.join(missing)}"]
    problems = []
    if r["image_id"] not in image_ids:
        problems.append(f"entry {i}: unknown image_id {r['image_id']!r} (not among the ground truth's images)")
    if r["category_id"] not in category_ids:
        problems.append(f"entry {i}: unknown category_id {r['category_id']!r} (known: {sorted(category_ids)})")
    bbox = r["bbox"]
    ok = isinstance(bbox, (list, tuple)) and len(bbox) == 4 and all(_is_number(v) for v in bbox)
    if not (ok and np.all(np.isfinite(bbox)) and bbox[2] >= 0 and bbox[3] >= 0):
        problems.append(f"entry {i}: bad bbox {bbox!r}; expected [x, y, w, h], finite numbers, w >= 0 and h >= 0")
    if not (_is_number(r["score"]) and np.isfinite(r["score"])):
        problems.append(f"entry {i}: bad score {r['score']!r}; expected a finite number")
    return problems


def _all_valid(results: list, image_ids: set, category_ids: set) -> bool:
    """Fast whole-list check (comprehensions + numpy); details come from _entry_problems."""
    if not all(isinstance(r, dict) and _RESULT_KEYS <= r.keys() for r in results):
        return False
    if not all(r["image_id"] in image_ids and r["category_id"] in category_ids for r in results):
        return False
    try:
        boxes = np.asarray([r["bbox"] for r in results])
        scores = np.asarray([r["score"] for r in results])
    except ValueError:  # ragged bbox lists
        return False
    if boxes.shape != (len(results), 4) or boxes.dtype.kind not in "iuf" or scores.dtype.kind not in "iuf":
        return False
    return bool(np.all(np.isfinite(boxes)) and np.all(boxes[:, 2:] >= 0) and np.all(np.isfinite(scores)))


def validate_coco_results(results: Any, gt: Mapping[str, Any], source: str = "results") -> None:
    """Raise ValueError naming ``source`` and the first bad entries of a results list.

    Checks what the evaluators would otherwise answer with a bare assert or a wrong number:
    a list of objects, known image and category ids, a bbox of four finite numbers with
    non-negative width and height, a finite score.
    """
    if not isinstance(results, list):
        raise ValueError(f"{source}: expected a JSON list of detections, got {type(results).__name__}")
    image_ids = {img["id"] for img in gt.get("images", [])}
    category_ids = {cat["id"] for cat in gt.get("categories", [])}
    if _all_valid(results, image_ids, category_ids):
        return
    problems: list[str] = []
    for i, r in enumerate(results):
        problems.extend(_entry_problems(i, r, image_ids, category_ids))
        if len(problems) >= 5:
            break
    if not problems:  # every entry passes alone; together they do not form a table
        problems.append("entries differ in the shape or type of their fields")
    raise ValueError(f"{source}: malformed detections:\n  " + "\n  ".join(problems))


def coco_metrics(
    gt: Mapping[str, Any], results: Sequence[Mapping[str, Any]], backend: CocoBackend = "faster"
) -> dict[str, float]:
    """The twelve COCO box metrics (keys ``COCO_METRIC_KEYS``) of ``results`` against ``gt``.

    No detections at all: every metric is 0 (pycocotools cannot load an empty result list,
    and a model that finds nothing has found nothing). Neither argument is modified.
    """
    if not results:
        return dict.fromkeys(COCO_METRIC_KEYS, 0.0)
    gt_copy = _copy_gt(gt)
    # The evaluators add id/area/segmentation to each result dict: give them copies.
    res_copy = [dict(r) for r in results]
    validate_coco_results(res_copy, gt_copy)
    with contextlib.redirect_stdout(io.StringIO()):
        if backend == "faster":
            stats = _stats_faster(gt_copy, res_copy)
        elif backend == "pycocotools":
            stats = _stats_pycocotools(gt_copy, res_copy)
        else:
            raise ValueError(f"coco_metrics: backend must be 'faster' or 'pycocotools', got {backend!r}")
    return {k: float(v) for k, v in zip(COCO_METRIC_KEYS, stats)}


# --------------------------------------------------------------------------- conversions
def coco_image_id_map(image_ids: Sequence[int | str]) -> dict[int | str, int]:
    """Map dataset image ids to the integers COCO needs, deterministically.

    - all ids integers: kept as they are;
    - all ids decimal strings (``"000000000009"``, COCO file stems): their integer value;
    - otherwise (file stems such as ``"BloodImage_00001"``): 1-based rank of ``str(id)`` in
      sorted order, so the mapping does not depend on the order records were read in.
    Duplicate ids are an error: COCO would merge the two images.
    """
    ids = list(image_ids)
    seen: set[int | str] = set()
    for x in ids:
        if x in seen:
            raise ValueError(f"image id {x!r} appears twice; COCO evaluation needs unique image ids")
        seen.add(x)
    if all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in ids):
        return {x: int(x) for x in ids}
    if all(isinstance(x, str) and x.isdecimal() for x in ids):
        mapped = {x: int(x) for x in ids}
        if len(set(mapped.values())) == len(ids):
            return mapped
    ranked = sorted(ids, key=str)
    return {x: rank + 1 for rank, x in enumerate(ranked)}


def _default_category_ids(class_names: Sequence[str], category_ids: Sequence[int] | None) -> list[int]:
    # 1-based by default: pycocotools stores a match as the matched ground truth's id and
    # reads 0 as "unmatched", and COCO's own category ids start at 1.
    ids = list(range(1, len(class_names) + 1)) if category_ids is None else [int(c) for c in category_ids]
    if len(ids) != len(class_names):
        raise ValueError(f"{len(ids)} category ids for {len(class_names)} class names; they must match")
    if len(set(ids)) != len(ids):
        raise ValueError(f"category ids must be unique, got {ids}")
    return ids


def records_to_coco_gt(
    records: Sequence[ImageRecord],
    class_names: Sequence[str],
    category_ids: Sequence[int] | None = None,
) -> dict[str, Any]:
    """A COCO annotation dict for the records (the ground truth COCOeval reads).

    Boxes xyxy -> xywh pixels; ``iscrowd`` from ``difficult``; ``area`` from
    ``record.areas`` when the reader kept COCO's segment areas (small/medium/large are
    decided on it), else the box area. Category ids: ``category_ids[label]``, default 1..C.
    Image ids go through ``coco_image_id_map``; an image whose id had to be mapped keeps
    its original id under ``"original_id"``.
    """
    cat_ids = np.asarray(_default_category_ids(class_names, category_ids), dtype=np.int64)  # (C,)
    id_map = coco_image_id_map([r.image_id for r in records])
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    next_ann_id = 1  # 1-based, see _default_category_ids
    for rec in records:
        coco_id = id_map[rec.image_id]
        image: dict[str, Any] = {
            "id": coco_id,
            "width": int(rec.width),
            "height": int(rec.height),
            "file_name": rec.path.name if rec.path is not None else str(rec.image_id),
        }
        if coco_id != rec.image_id:
            image["original_id"] = rec.image_id
        images.append(image)
        boxes = rec.boxes.astype(np.float64).reshape(-1, 4)  # (N, 4) xyxy pixels
        if len(boxes) == 0:
            continue
        if rec.labels.min() < 0 or rec.labels.max() >= len(class_names):
            raise ValueError(f"image {rec.image_id!r}: labels must lie in [0, {len(class_names)})")
        xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)  # (N, 4)
        areas = (
            np.asarray(rec.areas, dtype=np.float64).reshape(-1)
            if rec.areas is not None
            else np.clip(xywh[:, 2], 0, None) * np.clip(xywh[:, 3], 0, None)
        )
        if len(areas) != len(boxes):
            raise ValueError(f"image {rec.image_id!r}: {len(areas)} areas for {len(boxes)} boxes")
        crowd = np.asarray(rec.difficult, dtype=bool).astype(int)
        cats = cat_ids[rec.labels]
        for bbox, area, iscrowd, cat in zip(xywh.tolist(), areas.tolist(), crowd.tolist(), cats.tolist()):
            annotations.append(
                {
                    "id": next_ann_id,
                    "image_id": coco_id,
                    "category_id": cat,
                    "bbox": bbox,
                    "area": area,
                    "iscrowd": iscrowd,
                }
            )
            next_ann_id += 1
    categories = [{"id": int(c), "name": str(n)} for c, n in zip(cat_ids.tolist(), class_names)]
    return {"images": images, "annotations": annotations, "categories": categories}


def detections_to_coco_results(
    image_ids: Sequence[int],
    dets: Sequence[Mapping[str, np.ndarray]],
    category_ids: Sequence[int],
) -> list[dict[str, Any]]:
    """COCO results for per-image detections.

    image_ids: the COCO (integer) id of each image, as in ``records_to_coco_gt``;
    dets: per image ``boxes`` (K, 4) xyxy original-image pixels, ``scores`` (K,),
    ``labels`` (K,) in [0, C); category_ids: (C,) the COCO category id of each label.
    """
    if len(image_ids) != len(dets):
        raise ValueError(f"{len(image_ids)} image ids for {len(dets)} detection sets; they must match")
    cat_ids = np.asarray(category_ids, dtype=np.int64)  # (C,)
    out: list[dict[str, Any]] = []
    for image_id, det in zip(image_ids, dets):
        boxes = np.asarray(det["boxes"], dtype=np.float64).reshape(-1, 4)  # (K, 4) xyxy
        scores = np.asarray(det["scores"], dtype=np.float64).reshape(-1)  # (K,)
        labels = np.asarray(det["labels"], dtype=np.int64).reshape(-1)  # (K,)
        if not (len(boxes) == len(scores) == len(labels)):
            raise ValueError(f"image {image_id}: {len(boxes)} boxes, {len(scores)} scores, {len(labels)} labels")
        if labels.size and (labels.min() < 0 or labels.max() >= len(cat_ids)):
            raise ValueError(f"image {image_id}: detection labels must lie in [0, {len(cat_ids)})")
        xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)  # (K, 4)
        cats = cat_ids[labels]
        iid = int(image_id)
        out.extend(
            {"image_id": iid, "category_id": c, "bbox": b, "score": s}
            for b, s, c in zip(xywh.tolist(), scores.tolist(), cats.tolist())
        )
    return out
