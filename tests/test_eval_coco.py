"""COCO metrics: our wrapper against pycocotools' COCOeval, run here directly as the reference."""

from __future__ import annotations

import contextlib
import copy
import io
import json
from pathlib import Path

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from onestage.data.record import ImageRecord
from onestage.eval.coco import (
    COCO_METRIC_KEYS,
    coco_image_id_map,
    coco_metrics,
    detections_to_coco_results,
    records_to_coco_gt,
)

DATASETS = Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets"
COCO128_JSON = DATASETS / "coco128" / "annotations" / "instances_train2017.json"

pytestmark = pytest.mark.datasets


def reference_stats(gt_path: Path, results: list[dict]) -> np.ndarray:
    """pycocotools exactly as its README runs it."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(gt_path))
        coco_dt = coco_gt.loadRes(copy.deepcopy(results))
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return np.asarray(ev.stats)


def jittered_results(gt: dict, seed: int = 0) -> list[dict]:
    """Detections made from the ground truth (crowd objects included): 15% dropped, the
    rest jittered by ~8% of their size with random scores, a class-swapped copy of 10%,
    plus 3 false positives per image at random places and classes."""
    rng = np.random.default_rng(seed)
    anns = gt["annotations"]
    boxes = np.array([a["bbox"] for a in anns], dtype=np.float64)  # (N, 4) xywh
    image_ids = np.array([a["image_id"] for a in anns])
    cats = np.array([a["category_id"] for a in anns])
    keep = rng.random(len(anns)) > 0.15
    jitter = rng.normal(0.0, 0.08, size=boxes.shape) * boxes[:, [2, 3, 2, 3]]
    det = boxes + jitter
    det[:, 2:] = np.maximum(det[:, 2:], 1.0)
    scores = rng.uniform(0.05, 1.0, len(anns))
    all_cats = np.array([c["id"] for c in gt["categories"]])
    swap = rng.random(len(anns)) < 0.10
    out = [
        {"image_id": int(i), "category_id": int(c), "bbox": b.tolist(), "score": float(s)}
        for i, c, b, s in zip(image_ids[keep], cats[keep], det[keep], scores[keep])
    ]
    out += [
        {"image_id": int(i), "category_id": int(c), "bbox": b.tolist(), "score": float(s)}
        for i, c, b, s in zip(
            image_ids[swap], rng.choice(all_cats, swap.sum()), det[swap], rng.uniform(0.05, 1.0, swap.sum())
        )
    ]
    for img in gt["images"]:
        for _ in range(3):
            w, h = rng.uniform(10, 200, 2)
            x, y = rng.uniform(0, img["width"] - w), rng.uniform(0, img["height"] - h)
            out.append(
                {
                    "image_id": img["id"],
                    "category_id": int(rng.choice(all_cats)),
                    "bbox": [x, y, w, h],
                    "score": float(rng.uniform(0.01, 0.9)),
                }
            )
    return out


@pytest.fixture(scope="module")
def coco128() -> dict:
    return json.loads(COCO128_JSON.read_text())


@pytest.fixture(scope="module")
def coco128_results(coco128: dict) -> list[dict]:
    return jittered_results(coco128)


def test_fixture_has_crowd_and_is_not_trivial(coco128: dict, coco128_results: list[dict]):
    assert sum(a["iscrowd"] for a in coco128["annotations"]) == 10
    ref = reference_stats(COCO128_JSON, coco128_results)
    # A fixture where everything is 0 or 1 would prove nothing.
    assert 0.2 < ref[0] < 0.9 and 0.3 < ref[1] < 1.0


@pytest.mark.parametrize("backend", ["faster", "pycocotools"])
def test_every_number_matches_pycocotools(coco128: dict, coco128_results: list[dict], backend: str):
    ref = reference_stats(COCO128_JSON, coco128_results)
    ours = coco_metrics(coco128, coco128_results, backend=backend)
    assert list(ours) == list(COCO_METRIC_KEYS)
    np.testing.assert_allclose([ours[k] for k in COCO_METRIC_KEYS], ref, atol=1e-4, rtol=0)


def test_inputs_are_not_modified(coco128: dict, coco128_results: list[dict]):
    gt_before = json.dumps(coco128, sort_keys=True)
    res_before = json.dumps(coco128_results, sort_keys=True)
    coco_metrics(coco128, coco128_results)
    coco_metrics(coco128, coco128_results, backend="pycocotools")
    assert json.dumps(coco128, sort_keys=True) == gt_before
    assert json.dumps(coco128_results, sort_keys=True) == res_before


def tiny_gt(iscrowd: int) -> dict:
    # One 20x20 object (area 400: small) and a 40x40 crowd region, both class 1.
    return {
        "images": [{"id": 1, "width": 100, "height": 100}],
        "categories": [{"id": 1, "name": "a"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "area": 400.0, "iscrowd": 0},
            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [50, 50, 40, 40], "area": 1600.0, "iscrowd": iscrowd},
        ],
    }


TINY_RESULTS = [
    {"image_id": 1, "category_id": 1, "bbox": [55, 55, 10, 10], "score": 0.9},  # inside the crowd region
    {"image_id": 1, "category_id": 1, "bbox": [10, 10, 20, 20], "score": 0.8},  # the object, exactly
]


@pytest.mark.parametrize("backend", ["faster", "pycocotools"])
def test_crowd_region_absorbs_detections(backend: str):
    # With iscrowd: the 0.9 detection lies inside the crowd region (crowd IoU = area of
    # overlap / detection area = 1), so it is ignored; the object is found exactly at every
    # IoU -> AP 1, AR 1. Small: the object (area 400) -> 1. Medium/large: no object there
    # -> -1, COCO's "nothing to average".
    m = coco_metrics(tiny_gt(1), TINY_RESULTS, backend=backend)
    assert m["coco_ap"] == pytest.approx(1.0) and m["coco_ap50"] == pytest.approx(1.0)
    assert m["coco_ar100"] == pytest.approx(1.0) and m["coco_ap_small"] == pytest.approx(1.0)
    assert m["coco_ap_medium"] == -1.0 and m["coco_ap_large"] == -1.0
    # Without the crowd flag the region is a second object (medium, area 1600) that the 0.9
    # detection misses (IoU 100/1600): 0.9 FP then 0.8 TP, recall 1/2 -> AP50 = 1/2 at
    # COCO's 101 recall points: precision 1/2 for recall 0..0.5 (51 points) -> 51/101 * 1/2.
    m = coco_metrics(tiny_gt(0), TINY_RESULTS, backend=backend)
    assert m["coco_ap50"] == pytest.approx(51 / 101 * 0.5, abs=1e-6)
    assert m["coco_ar100"] == pytest.approx(0.5)


def test_empty_results_give_zeros(coco128: dict):
    assert coco_metrics(coco128, []) == dict.fromkeys(COCO_METRIC_KEYS, 0.0)
    assert coco_metrics(coco128, [], backend="pycocotools") == dict.fromkeys(COCO_METRIC_KEYS, 0.0)


def test_unknown_image_id_is_a_clear_error(coco128: dict):
    bad = [{"image_id": 123456789, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 0.5}]
    with pytest.raises(ValueError, match="entry 0: unknown image_id 123456789"):
        coco_metrics(coco128, bad)


def records_from_coco(gt: dict) -> tuple[list[ImageRecord], list[str], list[int]]:
    """Minimal COCO JSON reader for the test (the library's reader is tested elsewhere)."""
    cats = sorted(c["id"] for c in gt["categories"])
    names = {c["id"]: c["name"] for c in gt["categories"]}
    label_of = {c: i for i, c in enumerate(cats)}
    by_image: dict[int, list[dict]] = {img["id"]: [] for img in gt["images"]}
    for a in gt["annotations"]:
        by_image[a["image_id"]].append(a)
    records = []
    for img in gt["images"]:
        anns = by_image[img["id"]]
        xywh = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
        records.append(
            ImageRecord(
                image_id=img["id"],
                width=img["width"],
                height=img["height"],
                boxes=np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1),
                labels=[label_of[a["category_id"]] for a in anns],
                difficult=[bool(a["iscrowd"]) for a in anns],
                areas=np.array([a["area"] for a in anns], dtype=np.float64),
            )
        )
    return records, [names[c] for c in cats], cats


def test_records_round_trip_to_the_same_metrics(coco128: dict, coco128_results: list[dict]):
    # Records (float32 xyxy) -> COCO dict -> the same numbers as the original JSON.
    records, names, cat_ids = records_from_coco(coco128)
    gt = records_to_coco_gt(records, names, cat_ids)
    assert len(gt["annotations"]) == len(coco128["annotations"])
    assert sum(a["iscrowd"] for a in gt["annotations"]) == 10
    ours = coco_metrics(gt, coco128_results)
    ref = reference_stats(COCO128_JSON, coco128_results)
    np.testing.assert_allclose([ours[k] for k in COCO_METRIC_KEYS], ref, atol=1e-4, rtol=0)


def test_records_to_coco_gt_fields():
    recs = [
        ImageRecord(
            image_id="b",
            width=50,
            height=40,
            boxes=[[1, 2, 11, 22], [0, 0, 5, 5]],
            labels=[1, 0],
            difficult=[False, True],
        ),
        ImageRecord(image_id="a", width=30, height=30, boxes=np.zeros((0, 4)), labels=[], areas=None),
    ]
    gt = records_to_coco_gt(recs, ["cat", "dog"])
    # Non-integer ids: rank of the sorted names, 1-based: "a" -> 1, "b" -> 2; the original kept.
    assert [(im["id"], im["original_id"]) for im in gt["images"]] == [(2, "b"), (1, "a")]
    assert gt["categories"] == [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]
    a0, a1 = gt["annotations"]
    # xyxy [1,2,11,22] -> xywh [1,2,10,20], area = box area 200; label 1 -> category 2.
    assert a0 == {"id": 1, "image_id": 2, "category_id": 2, "bbox": [1, 2, 10, 20], "area": 200.0, "iscrowd": 0}
    assert a1["iscrowd"] == 1 and a1["area"] == 25.0 and a1["category_id"] == 1
    # Given COCO segment areas win over box areas (they decide small/medium/large).
    recs[0].areas = np.array([150.0, 7.0])
    gt = records_to_coco_gt(recs, ["cat", "dog"], category_ids=[17, 3])
    assert [a["area"] for a in gt["annotations"]] == [150.0, 7.0]
    assert [a["category_id"] for a in gt["annotations"]] == [3, 17]


def test_image_id_map():
    assert coco_image_id_map([9, 4]) == {9: 9, 4: 4}
    assert coco_image_id_map(["000000000009", "000000000004"]) == {"000000000009": 9, "000000000004": 4}
    assert coco_image_id_map(["img_b", "img_a", "img_c"]) == {"img_a": 1, "img_b": 2, "img_c": 3}
    with pytest.raises(ValueError, match="appears twice"):
        coco_image_id_map(["x", "y", "x"])


def test_detections_to_coco_results():
    dets = [
        {"boxes": np.array([[1.0, 2.0, 4.0, 8.0]]), "scores": np.array([0.5]), "labels": np.array([1])},
        {"boxes": np.zeros((0, 4)), "scores": np.zeros(0), "labels": np.zeros(0, int)},
    ]
    out = detections_to_coco_results([7, 8], dets, category_ids=[5, 9])
    assert out == [{"image_id": 7, "category_id": 9, "bbox": [1.0, 2.0, 3.0, 6.0], "score": 0.5}]
    with pytest.raises(ValueError, match="labels must lie in"):
        detections_to_coco_results([7], dets[:1], category_ids=[5])
