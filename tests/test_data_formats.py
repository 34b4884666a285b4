"""The format readers on the real datasets in ../shared/datasets.

Expected numbers are the README's (raccoon 200 images / 217 boxes; bccd 364 / 4,888;
coco128 929 train / 898 val boxes) and, per class, counted here by an independent parse
of the files (xml.etree, csv, plain text), not by the code under test.
"""

from __future__ import annotations

import csv
import json
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from onestage.data.coco import read_coco
from onestage.data.voc import read_voc
from onestage.data.yolo_txt import read_yolo

DATASETS = Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets"
BCCD = DATASETS / "bccd"
RACCOON = DATASETS / "raccoon"
COCO128 = DATASETS / "coco128"

pytestmark = pytest.mark.datasets


def _xml_class_counts(folder: Path) -> Counter:
    counts: Counter = Counter()
    for xml in folder.glob("*.xml"):
        counts.update(o.findtext("name") for o in ET.parse(xml).getroot().iter("object"))
    return counts


def _counts(spec) -> Counter:  # type: ignore[no-untyped-def]
    return Counter(spec.class_names[int(k)] for r in spec.records for k in r.labels)


# --------------------------------------------------------------------------- VOC
def test_bccd_counts_and_zero_area_boxes() -> None:
    raw = _xml_class_counts(BCCD / "BCCD" / "Annotations")
    assert sum(raw.values()) == 4888 and raw == {"RBC": 4155, "WBC": 372, "Platelets": 361}

    spec = read_voc(BCCD)  # the devkit layout one level down (BCCD/Annotations, BCCD/JPEGImages)
    assert len(spec.records) == 364
    assert spec.class_names == ["Platelets", "RBC", "WBC"]  # sorted distinct names
    # The two zero-area boxes (both RBC, both 1-pixel points) are dropped and reported.
    assert _counts(spec) == {"RBC": 4155 - 2, "WBC": 372, "Platelets": 361}
    degenerate = spec.problems.of_kind("box_degenerate")
    assert sorted(Path(p.file).name for p in degenerate) == ["BloodImage_00338.xml", "BloodImage_00343.xml"]
    assert all(p.action == "dropped" and "zero area" in p.message for p in degenerate)
    assert "(504, 337, 504, 337)" in degenerate[0].message
    assert len(spec.problems) == 2 and not spec.problems.errors

    rec = next(r for r in spec.records if r.image_id == "BloodImage_00338")
    assert (rec.width, rec.height) == (640, 480)
    assert rec.path is not None and rec.path.name == "BloodImage_00338.jpg"
    # First object of BloodImage_00338.xml: RBC 453, 81, 555, 182 (VOC corners kept as written).
    np.testing.assert_array_equal(rec.boxes[0], [453, 81, 555, 182])
    assert rec.boxes.dtype == np.float32 and len(rec.boxes) == 13


def test_bccd_imagesets_splits() -> None:
    sizes = {}
    for split in ("train", "val", "test"):
        spec = read_voc(BCCD / "BCCD", split=split, class_names=["RBC", "WBC", "Platelets"])
        listed = (BCCD / "BCCD" / "ImageSets" / "Main" / f"{split}.txt").read_text().split()
        assert [r.image_id for r in spec.records] == listed
        assert spec.class_names == ["RBC", "WBC", "Platelets"]  # given order is kept
        sizes[split] = len(spec.records)
    assert sizes == {"train": 205, "val": 87, "test": 72}


def test_raccoon_labelimg_layout_and_csv_splits() -> None:
    spec = read_voc(RACCOON)  # annotations/ + images/
    assert len(spec.records) == 200
    assert _counts(spec) == {"raccoon": 217} == _xml_class_counts(RACCOON / "annotations")
    # Nothing wrong; three grayscale JPEGs converted to RGB are noted (issue 21: every quirk said).
    assert not spec.problems.errors and spec.problems.counts() == {"image_converted": 3}
    rec = next(r for r in spec.records if r.image_id == "raccoon-1")
    assert (rec.width, rec.height) == (650, 417)
    np.testing.assert_array_equal(rec.boxes, [[81, 88, 522, 408]])

    total = 0
    for name, n_images in (("train_labels.csv", 160), ("test_labels.csv", 40)):
        with (RACCOON / "data" / name).open() as f:
            rows = list(csv.DictReader(f))
        split = read_voc(RACCOON, split=f"data/{name}")
        assert len(split.records) == n_images == len({r["filename"] for r in rows})
        # The CSV has one row per box: the split's box count must match it.
        assert sum(len(r.boxes) for r in split.records) == len(rows)
        total += len(split.records)
    assert total == 200


# --------------------------------------------------------------------------- YOLO
def _label_lines(folder: Path) -> dict[str, int]:
    return {p.stem: sum(1 for line in p.read_text().splitlines() if line.strip()) for p in folder.glob("*.txt")}


def test_coco128_yolo_train() -> None:
    spec = read_yolo(COCO128 / "data.yaml", "train2017")
    assert len(spec.class_names) == 80 and spec.class_names[0] == "person" and spec.class_names[79] == "toothbrush"
    assert len(spec.records) == 128
    assert sum(len(r.boxes) for r in spec.records) == 929
    images = {p.stem for p in (COCO128 / "images" / "train2017").glob("*.jpg")}
    lines = _label_lines(COCO128 / "labels" / "train2017")
    assert sum(n for stem, n in lines.items() if stem in images) == 929
    # The two background images (no label file) are kept with no boxes.
    background = sorted(r.image_id for r in spec.records if len(r.boxes) == 0)
    assert background == sorted(images - set(lines)) == ["000000000250", "000000000508"]
    # The two label files without an image are reported (not errors) and not used.
    orphans = spec.problems.of_kind("orphan_label")
    assert sorted(Path(p.file).name for p in orphans) == ["000000000656.txt", "000000000659.txt"]
    assert not spec.problems.errors and len(spec.problems.of_kind("orphan_label")) == 2
    # ... and the one grayscale JPEG converted to RGB is noted.
    assert spec.problems.counts() == {"orphan_label": 2, "image_converted": 1}
    # Every kept box lies inside its image (42 boxes overshoot by rounding and are clipped silently).
    for r in spec.records:
        assert (r.boxes >= 0).all() and (r.boxes[:, 2] <= r.width).all() and (r.boxes[:, 3] <= r.height).all()


def test_coco128_yolo_val_by_yaml_key() -> None:
    spec = read_yolo(COCO128, "val")  # the folder: its data.yaml maps val -> images/val2017
    assert len(spec.records) == 128
    assert sum(len(r.boxes) for r in spec.records) == 898 == sum(_label_lines(COCO128 / "labels" / "val2017").values())
    assert not spec.problems.errors and spec.problems.counts() == {"image_converted": 1}  # one grayscale JPEG


# --------------------------------------------------------------------------- COCO JSON
def test_coco128_json() -> None:
    ann = COCO128 / "annotations" / "instances_train2017.json"
    spec = read_coco(ann, COCO128 / "images" / "train2017")
    data = json.loads(ann.read_text())
    assert len(spec.records) == 128
    assert sum(len(r.boxes) for r in spec.records) == len(data["annotations"]) == 939
    assert sum(int(r.difficult.sum()) for r in spec.records) == 10  # iscrowd kept as difficult
    assert spec.category_ids == sorted(c["id"] for c in data["categories"])
    assert spec.category_ids[0] == 1 and spec.category_ids[-1] == 90 and len(spec.class_names) == 80
    assert sorted(r.path.name for r in spec.records if len(r.boxes) == 0) == ["000000000250.jpg", "000000000508.jpg"]

    # The first annotation in the file, checked by hand: image 74, bbox xywh
    # (61.87, 276.25, 296.42, 103.18) -> xyxy (61.87, 276.25, 358.29, 379.43), category 18 (dog).
    rec = next(r for r in spec.records if r.image_id == 74)
    k = int(np.argmin(np.abs(rec.boxes[:, 0] - 61.87)))
    np.testing.assert_allclose(rec.boxes[k], [61.87, 276.25, 358.29, 379.43], atol=1e-3)
    assert spec.class_names[rec.labels[k]] == "dog" and spec.category_ids[rec.labels[k]] == 18
    assert rec.areas is not None and rec.areas[k] == pytest.approx(18234.62355, rel=1e-6)


def test_coco128_yolo_and_json_agree() -> None:
    yolo = read_yolo(COCO128 / "data.yaml", "train2017")
    coco = read_coco(COCO128 / "annotations" / "instances_train2017.json", COCO128 / "images" / "train2017")
    by_name = {r.path.name: r for r in coco.records}
    coco_to_yolo = np.array([yolo.class_names.index(n) for n in coco.class_names])
    compared = 0
    for y in yolo.records:
        c = by_name[y.path.name]
        assert (y.width, y.height) == (c.width, c.height)
        keep = ~c.difficult  # YOLO labels leave COCO's crowd regions out
        c_boxes, c_labels = c.boxes[keep], coco_to_yolo[c.labels[keep]]
        assert len(c_boxes) == len(y.boxes), y.path.name
        if len(c_boxes) == 0:
            continue
        scale = np.array([y.width, y.height, y.width, y.height], dtype=np.float64)
        # Match each YOLO box to the nearest COCO box of the same class; a one-to-one match
        # within 1e-4 of the image size means both readers produced the same annotations.
        err = (np.abs(y.boxes[:, None, :].astype(np.float64) - c_boxes[None, :, :]) / scale).max(-1)  # (Ny, Nc)
        err[y.labels[:, None] != c_labels[None, :]] = np.inf
        nearest = err.argmin(axis=1)
        assert len(set(nearest.tolist())) == len(nearest), y.path.name
        assert err[np.arange(len(nearest)), nearest].max(initial=0.0) < 1e-4, y.path.name
        compared += len(nearest)
    assert compared == 929
