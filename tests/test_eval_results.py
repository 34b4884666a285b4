"""Results files, the Evaluator interface, the table/JSON views and the error plots."""

from __future__ import annotations

import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest

from onestage.data.record import ImageRecord
from onestage.eval.coco import coco_image_id_map, coco_metrics, detections_to_coco_results, records_to_coco_gt
from onestage.eval.evaluator import EvalResult, Evaluator, format_table, result_to_json
from onestage.eval.plots import (
    classify_image,
    confusion_summary,
    draw_worst_images,
    plot_pr_curves,
    pr_figure,
    worst_images,
)
from onestage.eval.results import save_coco_results, score_results_file

DATASETS = Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets"
COCO128_JSON = DATASETS / "coco128" / "annotations" / "instances_train2017.json"

G0, G1, G2 = [0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10]
FAR = [100, 100, 110, 110]


def rec(image_id, boxes, labels, difficult=None, width=200, height=200) -> ImageRecord:
    return ImageRecord(
        image_id=image_id,
        width=width,
        height=height,
        boxes=np.asarray(boxes, np.float32).reshape(-1, 4),
        labels=labels,
        difficult=difficult,
    )


def dets(boxes, scores, labels) -> dict[str, np.ndarray]:
    return {
        "boxes": np.asarray(boxes, np.float32).reshape(-1, 4),
        "scores": np.asarray(scores, np.float32),
        "labels": np.asarray(labels, np.int64),
    }


# --------------------------------------------------------------------------- coco128 fixture
@pytest.fixture(scope="module")
def coco128() -> tuple[list[ImageRecord], list[str], list[int], list[dict], dict]:
    """Records read from the coco128 JSON and seeded detections made from them."""
    gt = json.loads(COCO128_JSON.read_text())
    cat_ids = sorted(c["id"] for c in gt["categories"])
    label_of = {c: i for i, c in enumerate(cat_ids)}
    names = {c["id"]: c["name"] for c in gt["categories"]}
    anns: dict[int, list[dict]] = {img["id"]: [] for img in gt["images"]}
    for a in gt["annotations"]:
        anns[a["image_id"]].append(a)
    rng = np.random.default_rng(1)
    records, detections = [], []
    for img in gt["images"]:
        xywh = np.array([a["bbox"] for a in anns[img["id"]]], np.float64).reshape(-1, 4)
        xyxy = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
        labels = np.array([label_of[a["category_id"]] for a in anns[img["id"]]], np.int64)
        records.append(
            ImageRecord(
                image_id=img["id"],
                width=img["width"],
                height=img["height"],
                boxes=xyxy,
                labels=labels,
                difficult=[bool(a["iscrowd"]) for a in anns[img["id"]]],
                areas=np.array([a["area"] for a in anns[img["id"]]]),
            )
        )
        keep = rng.random(len(labels)) > 0.2
        size = np.tile(xywh[:, 2:], 2)
        boxes = (xyxy + rng.normal(0, 0.07, xyxy.shape) * size)[keep]
        fp = rng.uniform(0, 1, (2, 4)) * np.array([img["width"], img["height"]] * 2)
        fp = np.concatenate([np.minimum(fp[:, :2], fp[:, 2:]), np.maximum(fp[:, :2], fp[:, 2:])], axis=1)
        detections.append(
            dets(
                np.concatenate([boxes, fp]),
                rng.uniform(0.05, 1.0, keep.sum() + 2),
                np.concatenate([labels[keep], rng.integers(0, len(cat_ids), 2)]),
            )
        )
    return records, [names[c] for c in cat_ids], cat_ids, detections, gt


# --------------------------------------------------------------------------- results files
@pytest.mark.datasets
def test_save_then_score_equals_scoring_in_memory(tmp_path: Path, coco128):
    records, names, cat_ids, detections, gt = coco128
    id_map = coco_image_id_map([r.image_id for r in records])
    image_ids = [id_map[r.image_id] for r in records]
    path = tmp_path / "sub" / "results.json"
    n = save_coco_results(path, image_ids, detections, cat_ids)
    assert n == sum(len(d["scores"]) for d in detections)
    saved = json.loads(path.read_text())
    # Original category ids, xywh pixels: first detection of the first image, checked by hand.
    first = saved[0]
    x1, y1, x2, y2 = detections[0]["boxes"][0].astype(float)
    assert first["image_id"] == records[0].image_id
    assert first["category_id"] == cat_ids[int(detections[0]["labels"][0])]
    np.testing.assert_allclose(first["bbox"], [x1, y1, x2 - x1, y2 - y1], rtol=1e-6)

    from_file = score_results_file(path, gt)
    in_memory = coco_metrics(gt, detections_to_coco_results(image_ids, detections, cat_ids))
    assert from_file == in_memory
    assert 0.1 < from_file["coco_ap"] < 0.95
    # And our own records-made ground truth gives the same numbers as the dataset's JSON.
    ours = score_results_file(path, records_to_coco_gt(records, names, cat_ids))
    np.testing.assert_allclose(list(ours.values()), list(from_file.values()), atol=1e-4)


@pytest.mark.parametrize(
    "entry, message",
    [
        ({"image_id": 999999, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 0.5}, "unknown image_id 999999"),
        ({"image_id": 9, "category_id": 12, "bbox": [0, 0, 5, 5], "score": 0.5}, "unknown category_id 12"),
        ({"image_id": 9, "category_id": 1, "bbox": [0, 0, -5, 5], "score": 0.5}, "bad bbox"),
        ({"image_id": 9, "category_id": 1, "bbox": [0, 0, 5], "score": 0.5}, "bad bbox"),
        ({"image_id": 9, "category_id": 1, "bbox": [0, 0, 5, 5], "score": "high"}, "bad score"),
        ({"image_id": 9, "category_id": 1, "bbox": [0, 0, 5, 5]}, "missing score"),
    ],
)
@pytest.mark.datasets
def test_malformed_results_name_the_file_and_entry(tmp_path: Path, coco128, entry, message):
    gt = coco128[4]
    good = {"image_id": 9, "category_id": 1, "bbox": [1, 1, 5, 5], "score": 0.9}
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([good, entry]))
    with pytest.raises(ValueError, match=rf"bad\.json: malformed detections:\n  entry 1: {message}"):
        score_results_file(path, gt)


@pytest.mark.datasets
def test_unreadable_results_files(tmp_path: Path, coco128):
    gt = coco128[4]
    path = tmp_path / "broken.json"
    path.write_text("[{")
    with pytest.raises(ValueError, match="broken.json: not valid JSON"):
        score_results_file(path, gt)
    path.write_text('{"image_id": 9}')
    with pytest.raises(ValueError, match="broken.json: expected a JSON list"):
        score_results_file(path, gt)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        score_results_file(tmp_path / "missing.json", gt)


# --------------------------------------------------------------------------- Evaluator
def test_evaluator_by_hand():
    # One image, three objects; detections TP 0.9, FP 0.8, TP 0.7 (see test_eval_voc):
    # area AP 5/9, 11-point 6/11. Class 1 has no objects: nan, outside the mean.
    ev = Evaluator(["a", "b"], voc_metric="11point")
    ev.update([rec(1, [G0, G1, G2], [0, 0, 0])], [dets([G0, FAR, G1], [0.9, 0.8, 0.7], [0, 0, 0])])
    res = ev.compute()
    assert res.metrics["voc_ap50"] == pytest.approx(6 / 11)
    assert res.metrics["voc_ap50_11point"] == pytest.approx(6 / 11)
    assert res.metrics["voc_ap50_area"] == pytest.approx(5 / 9)
    assert set(res.metrics) == {"voc_ap50", "voc_ap50_11point", "voc_ap50_area"}
    assert res.per_class[0].ap == pytest.approx(6 / 11) and res.per_class[0].num_gt == 3
    assert res.per_class[0].num_det == 3 and math.isnan(res.per_class[1].ap)
    np.testing.assert_allclose(res.recall[0], [1 / 3, 1 / 3, 2 / 3])
    ev.reset()
    assert len(ev) == 0


def test_evaluator_key_follows_the_iou_threshold():
    # IoU([0,0,10,10], [0,0,10,7]) = 0.7: a match at 0.5, a miss at 0.75.
    for iou, key, ap in [(0.5, "voc_ap50", 1.0), (0.75, "voc_ap75", 0.0)]:
        ev = Evaluator(["a"], iou_threshold=iou)
        ev.update([rec(1, [G0], [0])], [dets([[0, 0, 10, 7]], [0.9], [0])])
        metrics = ev.compute().metrics
        assert metrics[key] == pytest.approx(ap)
        assert set(metrics) == {key, f"{key}_area", f"{key}_11point"}


@pytest.mark.datasets
def test_evaluator_batches_equal_one_pass(coco128):
    records, names, cat_ids, detections, _ = coco128
    whole = Evaluator(names, metrics=("voc", "coco"), category_ids=cat_ids)
    whole.update(records, detections)
    batched = Evaluator(names, metrics=("voc", "coco"), category_ids=cat_ids)
    for start, stop in [(0, 40), (40, 41), (41, len(records))]:
        batched.update(records[start:stop], detections[start:stop])
    a, b = whole.compute(), batched.compute()
    assert a.metrics == b.metrics
    assert result_to_json(a) == result_to_json(b)  # per-class rows, with nan as null
    for pa, pb in zip(a.precision + a.recall, b.precision + b.recall):
        np.testing.assert_array_equal(pa, pb)
    assert {"voc_ap50", "coco_ap", "coco_ar_large"} <= set(a.metrics)
    assert 0.2 < a.metrics["voc_ap50"] < 1.0 and 0.1 < a.metrics["coco_ap"] < a.metrics["coco_ap50"]
    # The Evaluator's COCO numbers are those of the dataset's own JSON.
    gt = coco128[4]
    id_map = coco_image_id_map([r.image_id for r in records])
    direct = coco_metrics(gt, detections_to_coco_results([id_map[r.image_id] for r in records], detections, cat_ids))
    for k, v in direct.items():
        assert a.metrics[k] == pytest.approx(v, abs=1e-4)


def test_evaluator_rejects_mismatched_input():
    ev = Evaluator(["a"])
    with pytest.raises(ValueError, match="1 records but 2 detection sets"):
        ev.update([rec(1, [G0], [0])], [dets([], [], []), dets([], [], [])])
    with pytest.raises(ValueError, match=r"image 1: detection labels must lie in \[0, 1\)"):
        ev.update([rec(1, [G0], [0])], [dets([G0], [0.9], [1])])
    with pytest.raises(ValueError, match="unknown metrics"):
        Evaluator(["a"], metrics=("voc", "lvis"))  # type: ignore[arg-type]


def three_class_result() -> EvalResult:
    # cat: 1 object found (AP 1); dog: 2 objects, one found after a FP (AP 1/2 * 1/2 = 1/4);
    # fish: no object, one detection (nan).
    ev = Evaluator(["dog", "cat", "fish"])
    ev.update(
        [rec(1, [G0, G1, G2], [1, 0, 0])],
        [dets([G0, FAR, G1, FAR], [0.9, 0.8, 0.7, 0.6], [1, 0, 0, 2])],
    )
    return ev.compute()


def test_format_table_sorted_by_ap_with_mean():
    table = format_table(three_class_result())
    lines = table.splitlines()
    assert [line.split()[0] for line in lines[1:4]] == ["cat", "dog", "fish"]
    # second AP column: the 11-point form. dog's PR points are (r 0, p 0), (r 1/2, p 1/2): the
    # 11 recall levels 0, 0.1, ..., 0.5 see precision 1/2, the other five 0 -> 6 * 0.5 / 11 = 3/11.
    assert lines[1].split()[-4:] == ["1.000", "1.000", "1", "1"]
    assert lines[2].split()[-4:] == ["0.250", "0.273", "2", "2"]
    assert lines[3].split()[-4:] == ["n/a", "n/a", "0", "1"]
    # mean over cat and dog: (1 + 1/4) / 2 = 0.625 and (1 + 3/11) / 2 = 0.636; 3 objects, 4 detections.
    assert lines[-1].split() == ["mean", "0.625", "0.636", "3", "4"]


def test_result_to_json_is_strict_json():
    out = result_to_json(three_class_result())
    text = json.dumps(out, allow_nan=False)  # raises on NaN
    back = json.loads(text)
    assert back["metrics"]["voc_ap50"] == pytest.approx(0.625)
    assert back["per_class"][2] == {"name": "fish", "ap": None, "num_gt": 0, "num_det": 1}


# --------------------------------------------------------------------------- plots
def test_pr_curves_one_axes_per_class(tmp_path: Path):
    res = three_class_result()
    fig = pr_figure(res)
    assert len(fig.axes) == 3
    assert [ax.get_title() for ax in fig.axes] == [
        "dog  AP 0.250  (gt 2)",
        "cat  AP 1.000  (gt 1)",
        "fish  AP n/a  (gt 0)",
    ]
    out = plot_pr_curves(res, tmp_path / "pr.png")
    image = cv2.imread(str(out))
    assert image is not None and image.shape[0] > 100 and image.shape[1] > 100


def confusion_case() -> tuple[list[ImageRecord], list[dict]]:
    # Objects: dog A=[0,0,10,10], cat B=[40,0,50,10], dog C=[80,0,90,10] difficult, and in a
    # second image a dog D=[0,0,10,10] that nobody finds.
    records = [
        rec(1, [[0, 0, 10, 10], [40, 0, 50, 10], [80, 0, 90, 10]], [0, 1, 0], [False, False, True]),
        rec(2, [[0, 0, 10, 10]], [0]),
    ]
    detections = [
        dets(
            [
                [0, 0, 10, 10],  # dog 0.9 on A: true positive
                [0, 0, 10, 9],  # dog 0.8 on A again (IoU 0.9): duplicate
                [40, 0, 50, 10],  # dog 0.7 on the cat: wrong class
                [40, 0, 50, 4],  # cat 0.65 on the cat, IoU 0.4: localization (the cat is still free)
                [0, 0, 10, 4],  # cat 0.6 on the dog A, IoU 0.4 with another class: both
                [150, 150, 160, 160],  # dog 0.55 on nothing: background
                [80, 0, 90, 10],  # dog 0.5 on difficult C: ignored
                [150, 0, 160, 10],  # dog 0.1: below the score threshold, not counted
            ],
            [0.9, 0.8, 0.7, 0.65, 0.6, 0.55, 0.5, 0.1],
            [0, 0, 0, 1, 1, 0, 0, 0],
        ),
        dets([], [], []),
    ]
    return records, detections


def test_classify_image_each_kind():
    records, detections = confusion_case()
    err = classify_image(records[0], detections[0], iou=0.5, score_threshold=0.3)
    assert err.keep.tolist() == [True] * 7 + [False]
    assert err.kind.tolist() == ["tp", "duplicate", "wrong_class", "localization", "both", "background", "ignored"]
    # The cat B is missed (only a 0.4 IoU box); C is difficult, so never missed.
    assert err.missed.tolist() == [False, True, False]


def test_confusion_summary_counts():
    records, detections = confusion_case()
    s = confusion_summary(records, detections, ["dog", "cat"], score_threshold=0.3)
    assert {k: s[k] for k in s if k != "per_class"} == {
        "true_positives": 1,
        "false_positives": 5,
        "duplicate": 1,
        "wrong_class": 1,
        "localization": 1,
        "both": 1,
        "background": 1,
        "missed": 2,  # cat B in image 1, dog D in image 2
        "ignored": 1,
    }
    assert s["per_class"]["cat"]["localization"] == 1 and s["per_class"]["cat"]["both"] == 1
    assert s["per_class"]["cat"]["missed"] == 1 and s["per_class"]["dog"]["missed"] == 1
    assert s["per_class"]["dog"]["false_positives"] == 3


def test_worst_images_and_drawing(tmp_path: Path):
    records, detections = confusion_case()
    # Image 1: 5 FP + 1 miss = 6; image 2: 1 miss. A third image without error is left out.
    records.append(rec(3, [G0], [0]))
    detections.append(dets([G0], [0.9], [0]))
    assert worst_images(records, detections, k=5, score_threshold=0.3) == [0, 1]
    assert worst_images(records, detections, k=1, score_threshold=0.3) == [0]

    def loader(r: ImageRecord) -> np.ndarray:
        return np.zeros((r.height, r.width, 3), np.uint8)

    paths = draw_worst_images(records, detections, ["dog", "cat"], tmp_path, 2, loader, score_threshold=0.3)
    assert [p.name for p in paths] == ["000_1.png", "001_2.png"]
    image = cv2.cvtColor(cv2.imread(str(paths[0])), cv2.COLOR_BGR2RGB)
    # Ground truth drawn green, detections red, on a black image.
    green = (image[..., 1] > 150) & (image[..., 0] < 50)
    red = (image[..., 0] > 150) & (image[..., 1] < 50)
    assert green.sum() > 20 and red.sum() > 20
    # The image 2 has only a missed object: green, no red.
    image2 = cv2.cvtColor(cv2.imread(str(paths[1])), cv2.COLOR_BGR2RGB)
    assert ((image2[..., 0] > 150) & (image2[..., 1] < 50)).sum() == 0
    assert ((image2[..., 1] > 150) & (image2[..., 0] < 50)).sum() > 20
