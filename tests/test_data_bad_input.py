"""Bad input: every case names the file and the problem, and under on_error="skip" every
other image still arrives intact. Also the problem log and box sanitizing on their own."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from onestage.data.coco import read_coco
from onestage.data.problems import DataError, DatasetSpec, Problem, ProblemLog, sanitize_boxes
from onestage.data.voc import read_voc
from onestage.data.yolo_txt import read_yolo

W, H = 64, 48  # every synthetic image here is 64 x 48


def _image(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((H, W, 3), value, dtype=np.uint8)).save(path)


def _assert_others_intact(spec: DatasetSpec, clean: DatasetSpec, bad: set) -> None:
    """Every record of the clean read, except the bad ones, arrives unchanged."""
    expected = {r.image_id: r for r in clean.records if r.image_id not in bad}
    got = {r.image_id: r for r in spec.records}
    assert set(got) == set(expected)
    for key, r in expected.items():
        g = got[key]
        assert (g.width, g.height, g.path) == (r.width, r.height, r.path)
        np.testing.assert_array_equal(g.boxes, r.boxes)
        np.testing.assert_array_equal(g.labels, r.labels)
        np.testing.assert_array_equal(g.difficult, r.difficult)


# --------------------------------------------------------------------------- VOC
def _voc_xml(objects: list[tuple[str, tuple]], size: tuple[int, int] = (W, H)) -> str:
    objs = "".join(
        f"<object><name>{n}</name><difficult>0</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
        f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
        for n, b in objects
    )
    head = f"<size><width>{size[0]}</width><height>{size[1]}</height><depth>3</depth></size>"
    return f"<annotation>{head}{objs}</annotation>"


@pytest.fixture
def voc(tmp_path: Path) -> Path:
    """A devkit-layout VOC set: a (cat), b (dog), c (cat + dog)."""
    root = tmp_path / "voc"
    (root / "Annotations").mkdir(parents=True)
    objects = {
        "a": [("cat", (1, 2, 30, 40))],
        "b": [("dog", (5, 5, 20, 20))],
        "c": [("cat", (10, 10, 50, 40)), ("dog", (0, 0, 8, 8))],
    }
    for k, (name, objs) in enumerate(objects.items()):
        _image(root / "JPEGImages" / f"{name}.png", 40 * k)
        (root / "Annotations" / f"{name}.xml").write_text(_voc_xml(objs))
    return root


def test_voc_clean_reference(voc: Path) -> None:
    spec = read_voc(voc)
    assert [r.image_id for r in spec.records] == ["a", "b", "c"]
    assert spec.class_names == ["cat", "dog"]
    np.testing.assert_array_equal(spec.records[2].boxes, [[10, 10, 50, 40], [0, 0, 8, 8]])
    assert spec.records[2].labels.tolist() == [0, 1]
    assert not spec.problems.problems


def test_voc_missing_image(voc: Path) -> None:
    clean = read_voc(voc)
    (voc / "JPEGImages" / "b.png").unlink()
    with pytest.raises(DataError, match=r"b\.xml: no image for 'b'"):
        read_voc(voc)
    spec = read_voc(voc, on_error="skip")
    _assert_others_intact(spec, clean, {"b"})
    [p] = spec.problems.problems
    assert (p.kind, p.action, Path(p.file).name) == ("missing_image", "skipped", "b.xml")


def test_voc_corrupt_image(voc: Path) -> None:
    clean = read_voc(voc)
    (voc / "JPEGImages" / "b.png").write_bytes(b"\x89PNG but then garbage")
    with pytest.raises(DataError, match=r"b\.png: not a readable image"):
        read_voc(voc)
    spec = read_voc(voc, on_error="skip")
    _assert_others_intact(spec, clean, {"b"})
    assert [p.kind for p in spec.problems] == ["corrupt_image"]


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("<annotation><object><name>dog</name>", r"b\.xml: malformed XML"),
        (_voc_xml([("dog", (5, "abc", 20, 20))]), r"b\.xml: object #0 \(dog\) <ymin> is 'abc', not a number"),
        ("<annotation><object><name>dog</name></object></annotation>", r"b\.xml: object #0 \(dog\) has no <bndbox>"),
    ],
)
def test_voc_malformed_xml(voc: Path, text: str, problem: str) -> None:
    clean = read_voc(voc)
    (voc / "Annotations" / "b.xml").write_text(text)
    with pytest.raises(DataError, match=problem):
        read_voc(voc)
    spec = read_voc(voc, on_error="skip")
    _assert_others_intact(spec, clean, {"b"})
    assert [p.kind for p in spec.problems] == ["bad_annotation"]


def test_voc_box_outside_image_is_clipped_and_counted(voc: Path) -> None:
    (voc / "Annotations" / "b.xml").write_text(_voc_xml([("dog", (-10, 5, 90, 20)), ("dog", (5, 5, 20, 20))]))
    spec = read_voc(voc)  # a fix, not an error: no raise even in raise mode
    b = next(r for r in spec.records if r.image_id == "b")
    np.testing.assert_array_equal(b.boxes, [[0, 5, 64, 20], [5, 5, 20, 20]])
    [p] = spec.problems.problems
    assert (p.kind, p.action, Path(p.file).name) == ("box_clipped", "clipped", "b.xml")
    assert "box #0 (-10, 5, 90, 20)" in p.message and "clipped to (0, 5, 64, 20)" in p.message


def test_voc_zero_area_and_inverted_boxes_are_dropped_and_counted(voc: Path) -> None:
    objs = [("dog", (5, 5, 5, 20)), ("dog", (30, 30, 10, 40)), ("cat", (1, 1, 9, 9))]
    (voc / "Annotations" / "b.xml").write_text(_voc_xml(objs))
    spec = read_voc(voc)
    b = next(r for r in spec.records if r.image_id == "b")
    np.testing.assert_array_equal(b.boxes, [[1, 1, 9, 9]])
    assert b.labels.tolist() == [0]  # the surviving box keeps its own label (cat)
    kinds = [(p.kind, p.action) for p in spec.problems]
    assert kinds == [("box_degenerate", "dropped")] * 2
    assert "box #0 (5, 5, 5, 20) has zero area" in spec.problems.problems[0].message
    assert "box #1 (30, 30, 10, 40) is inverted" in spec.problems.problems[1].message


def test_voc_unknown_class_names_file_class_and_known(voc: Path) -> None:
    clean = read_voc(voc, class_names=["cat", "dog"])
    (voc / "Annotations" / "b.xml").write_text(_voc_xml([("horse", (5, 5, 20, 20))]))
    with pytest.raises(DataError, match=r"b\.xml: class 'horse' is not among the known classes: cat, dog"):
        read_voc(voc, class_names=["cat", "dog"])
    spec = read_voc(voc, class_names=["cat", "dog"], on_error="skip")
    _assert_others_intact(spec, clean, {"b"})
    assert [p.kind for p in spec.problems] == ["unknown_class"]


def test_voc_size_mismatch_uses_the_image(voc: Path) -> None:
    (voc / "Annotations" / "b.xml").write_text(_voc_xml([("dog", (5, 5, 20, 20))], size=(640, 480)))
    spec = read_voc(voc)
    b = next(r for r in spec.records if r.image_id == "b")
    assert (b.width, b.height) == (W, H)
    [p] = spec.problems.problems
    assert p.kind == "size_mismatch" and "640x480" in p.message and "64x48" in p.message


def test_voc_path_escaping_root_is_refused(voc: Path, tmp_path: Path) -> None:
    clean = read_voc(voc)
    _image(tmp_path / "outside.png", 9)
    (tmp_path / "outside.xml").write_text(_voc_xml([("cat", (1, 1, 5, 5))]))
    with pytest.raises(DataError, match=r"'\.\./outside\.xml'.*outside the dataset root"):
        read_voc(voc, ids=["a", "../outside", "c"])
    spec = read_voc(voc, ids=["a", "../outside", "c"], on_error="skip")
    _assert_others_intact(spec, clean, {"b"})
    assert [p.kind for p in spec.problems] == ["path_escape"]

    # A CSV split naming a file outside the image folder is refused the same way.
    (voc / "split.csv").write_text("filename,class\na.png,cat\n../../outside.png,cat\n")
    with pytest.raises(DataError, match="outside the dataset root"):
        read_voc(voc, split="split.csv")


def test_voc_unknown_split_lists_the_available_ones(voc: Path) -> None:
    (voc / "ImageSets" / "Main").mkdir(parents=True)
    (voc / "ImageSets" / "Main" / "train.txt").write_text("a\nc\n")
    assert [r.image_id for r in read_voc(voc, split="train").records] == ["a", "c"]
    with pytest.raises(DataError, match=r"split 'trian' not found.*available splits: train"):
        read_voc(voc, split="trian")


# --------------------------------------------------------------------------- COCO
@pytest.fixture
def coco(tmp_path: Path) -> tuple[Path, Path, dict]:
    images = tmp_path / "coco" / "images"
    for k, name in enumerate(("a.png", "b.png", "c.png")):
        _image(images / name, 50 * k)
    data = {
        "images": [
            {"id": i + 1, "file_name": n, "width": W, "height": H} for i, n in enumerate(("a.png", "b.png", "c.png"))
        ],
        "categories": [{"id": 3, "name": "car"}, {"id": 7, "name": "bus"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 3, "bbox": [1, 2, 10, 20], "area": 150.0, "iscrowd": 0},
            {"id": 2, "image_id": 2, "category_id": 7, "bbox": [5, 5, 15, 15], "area": 200.0, "iscrowd": 1},
            {"id": 3, "image_id": 3, "category_id": 3, "bbox": [0, 0, 4, 4], "area": 16.0, "iscrowd": 0},
        ],
    }
    return tmp_path / "coco" / "ann.json", images, data


def _write(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data))


def test_coco_clean_reference(coco: tuple[Path, Path, dict]) -> None:
    ann, images, data = coco
    _write(ann, data)
    spec = read_coco(ann, images)
    assert spec.class_names == ["car", "bus"] and spec.category_ids == [3, 7]
    b = spec.records[1]
    np.testing.assert_array_equal(b.boxes, [[5, 5, 20, 20]])  # xywh -> xyxy
    assert b.labels.tolist() == [1] and b.difficult.tolist() == [True] and b.areas.tolist() == [200.0]


def test_coco_malformed_json_raises_even_when_skipping(coco: tuple[Path, Path, dict]) -> None:
    ann, images, _ = coco
    ann.write_text('{"images": [')
    with pytest.raises(DataError, match=r"ann\.json: malformed JSON"):
        read_coco(ann, images, on_error="skip")


def test_coco_malformed_annotation(coco: tuple[Path, Path, dict]) -> None:
    ann, images, data = coco
    _write(ann, data)
    clean = read_coco(ann, images)
    data["annotations"][1]["bbox"] = [5, 5, 15]
    _write(ann, data)
    with pytest.raises(DataError, match=r"ann\.json \(image 'b\.png'\): annotation id 2: 'bbox' must be 4"):
        read_coco(ann, images)
    spec = read_coco(ann, images, on_error="skip")
    _assert_others_intact(spec, clean, {2})
    assert [p.kind for p in spec.problems] == ["bad_annotation"]


def test_coco_missing_and_corrupt_images(coco: tuple[Path, Path, dict]) -> None:
    ann, images, data = coco
    _write(ann, data)
    clean = read_coco(ann, images)
    (images / "a.png").unlink()
    (images / "b.png").write_bytes(b"junk")
    with pytest.raises(DataError, match=r"a\.png: image file not found"):
        read_coco(ann, images)
    spec = read_coco(ann, images, on_error="skip")
    _assert_others_intact(spec, clean, {1, 2})
    found = [(Path(p.file).name, p.kind) for p in spec.problems]
    assert found == [("a.png", "missing_image"), ("b.png", "corrupt_image")]
    assert "not a readable image" in spec.problems.problems[1].message


def test_coco_unknown_category(coco: tuple[Path, Path, dict]) -> None:
    ann, images, data = coco
    _write(ann, data)
    clean = read_coco(ann, images)  # car = 0 here as with class_names=["car"] below
    # Only "car" is wanted: image b's bus is an unknown class.
    with pytest.raises(DataError, match=r"image 'b\.png'\): category_id 7 \(bus\) is not among the known classes: car"):
        read_coco(ann, images, class_names=["car"])
    spec = read_coco(ann, images, class_names=["car"], on_error="skip")
    assert spec.category_ids == [3]
    _assert_others_intact(spec, clean, {2})
    assert [p.kind for p in spec.problems] == ["unknown_class"]
    with pytest.raises(DataError, match=r"ann\.json: class 'truck' is not among the file's categories: car, bus"):
        read_coco(ann, images, class_names=["car", "truck"])


def test_coco_path_escape(coco: tuple[Path, Path, dict], tmp_path: Path) -> None:
    ann, images, data = coco
    _write(ann, data)
    clean = read_coco(ann, images)
    _image(tmp_path / "secret.png", 1)
    data["images"][0]["file_name"] = "../../secret.png"
    _write(ann, data)
    with pytest.raises(DataError, match=r"ann\.json \(image '\.\./\.\./secret\.png'\).*outside the dataset root"):
        read_coco(ann, images)
    spec = read_coco(ann, images, on_error="skip")
    _assert_others_intact(spec, clean, {1})
    assert [p.kind for p in spec.problems] == ["path_escape"]


def test_coco_boxes_clipped_and_degenerate_dropped_with_their_areas(coco: tuple[Path, Path, dict]) -> None:
    ann, images, data = coco
    data["annotations"] += [
        {"id": 4, "image_id": 1, "category_id": 7, "bbox": [50, 40, 30, 30], "area": 99.0, "iscrowd": 0},
        {"id": 5, "image_id": 1, "category_id": 7, "bbox": [5, 5, 0, 10], "area": 0.0, "iscrowd": 0},
    ]
    _write(ann, data)
    a = read_coco(ann, images).records[0]
    np.testing.assert_array_equal(a.boxes, [[1, 2, 11, 22], [50, 40, 64, 48]])
    assert a.labels.tolist() == [0, 1] and a.areas.tolist() == [150.0, 99.0]
    problems = read_coco(ann, images).problems
    assert [(p.kind, p.action) for p in problems] == [("box_degenerate", "dropped"), ("box_clipped", "clipped")]


# --------------------------------------------------------------------------- YOLO
@pytest.fixture
def yolo(tmp_path: Path) -> Path:
    root = tmp_path / "yolo"
    for k, name in enumerate(("a", "b", "c")):
        _image(root / "images" / "train" / f"{name}.jpg", 60 * k)
    (root / "labels" / "train").mkdir(parents=True)
    (root / "labels" / "train" / "a.txt").write_text("0 0.5 0.5 0.25 0.5\n")
    (root / "labels" / "train" / "b.txt").write_text("1 0.25 0.25 0.5 0.5\n0 0.75 0.75 0.25 0.25\n")
    (root / "data.yaml").write_text("train: images/train\nnames: {0: cat, 1: dog}\n")
    return root


def test_yolo_clean_reference(yolo: Path) -> None:
    spec = read_yolo(yolo, "train")
    assert spec.class_names == ["cat", "dog"]
    a, b, c = spec.records
    # cx, cy, w, h = 0.5, 0.5, 0.25, 0.5 of 64 x 48 -> x 24..40, y 12..36.
    np.testing.assert_allclose(a.boxes, [[24, 12, 40, 36]])
    np.testing.assert_allclose(b.boxes, [[0, 0, 32, 24], [40, 30, 56, 42]])
    assert b.labels.tolist() == [1, 0]
    assert len(c.boxes) == 0  # no label file: a background image, kept
    assert not spec.problems.problems


@pytest.mark.parametrize(
    ("line", "kind", "problem"),
    [
        ("0 0.5 0.5 0.2", "bad_annotation", r"b\.txt: line 2: expected 'class cx cy w h' \(5 values\)"),
        ("0 0.5 zero 0.2 0.2", "bad_annotation", r"b\.txt: line 2: '0 0\.5 zero 0\.2 0\.2' is not all numbers"),
        ("0 32 24 16 24", "bad_annotation", r"b\.txt: line 2: coordinates must be normalized"),
        ("5 0.5 0.5 0.2 0.2", "unknown_class",
         r"b\.txt: line 2: class 5 is not among the known classes: 0\.\.1 \(cat, dog\)"),
    ],
)
def test_yolo_bad_label_line(yolo: Path, line: str, kind: str, problem: str) -> None:
    clean = read_yolo(yolo, "train")
    (yolo / "labels" / "train" / "b.txt").write_text(f"1 0.25 0.25 0.5 0.5\n{line}\n")
    with pytest.raises(DataError, match=problem):
        read_yolo(yolo, "train")
    spec = read_yolo(yolo, "train", on_error="skip")
    _assert_others_intact(spec, clean, {"b"})
    assert [p.kind for p in spec.problems] == [kind]


def test_yolo_corrupt_image_and_orphan_label(yolo: Path) -> None:
    clean = read_yolo(yolo, "train")
    (yolo / "images" / "train" / "a.jpg").write_bytes(b"not a jpeg")
    (yolo / "labels" / "train" / "ghost.txt").write_text("0 0.5 0.5 0.1 0.1\n\n1 0.2 0.2 0.1 0.1\n")
    with pytest.raises(DataError, match=r"a\.jpg: not a readable image"):
        read_yolo(yolo, "train")
    spec = read_yolo(yolo, "train", on_error="skip")
    _assert_others_intact(spec, clean, {"a"})
    kinds = {(Path(p.file).name, p.kind, p.action) for p in spec.problems}
    assert kinds == {("a.jpg", "corrupt_image", "skipped"), ("ghost.txt", "orphan_label", "dropped")}
    assert "its 2 boxes are not used" in spec.problems.of_kind("orphan_label")[0].message


def test_yolo_box_outside_clipped_and_negative_size_dropped(yolo: Path) -> None:
    (yolo / "labels" / "train" / "b.txt").write_text("0 0.9 0.5 0.5 0.5\n1 0.5 0.5 -0.1 0.2\n")
    spec = read_yolo(yolo, "train")
    b = spec.records[1]
    # cx 0.9, w 0.5 of 64: x from (0.9 - 0.25) * 64 = 41.6 to (0.9 + 0.25) * 64 = 73.6, clipped to 64.
    np.testing.assert_allclose(b.boxes, [[41.6, 12, 64, 36]], atol=1e-4)
    assert b.labels.tolist() == [0]
    assert [(p.kind, p.action) for p in spec.problems] == [("box_degenerate", "dropped"), ("box_clipped", "clipped")]


def test_yolo_unknown_split_names_what_exists(yolo: Path) -> None:
    with pytest.raises(DataError, match=r"data\.yaml: split 'val' not found.*data\.yaml splits: train.*images/: train"):
        read_yolo(yolo, "val")


def test_yolo_split_path_escaping_root_is_refused(yolo: Path) -> None:
    (yolo / "data.yaml").write_text("train: ../../elsewhere\nnames: [cat, dog]\n")
    with pytest.raises(DataError, match=r"'\.\./\.\./elsewhere'.*outside the dataset root"):
        read_yolo(yolo, "train")


# --------------------------------------------------------------------------- the log itself
def test_problem_log_policies() -> None:
    strict = ProblemLog("raise")
    with pytest.raises(DataError, match=r"^x/y\.xml: broken thing \(bad_annotation\)$"):
        strict.error("x/y.xml", "bad_annotation", "broken thing")
    assert strict.problems[0].action == "raised"

    lenient = ProblemLog("skip")
    p = lenient.error(Path("x/y.xml"), "bad_annotation", "broken thing")
    assert p == Problem("x/y.xml", "bad_annotation", "broken thing", "skipped") and p.is_error
    lenient.fix("z.xml", "box_clipped", "box #0 clipped", "clipped")
    lenient.fix("w.xml", "box_clipped", "box #3 clipped", "clipped")
    assert lenient.counts() == {"bad_annotation": 1, "box_clipped": 2}
    assert [q.file for q in lenient.errors] == ["x/y.xml"]
    summary = lenient.summary()
    assert "problems: 3 (1 error, 2 fixed or noted)" in summary
    assert "box_clipped: 2" in summary and "bad_annotation: 1" in summary
    assert "x/y.xml: broken thing" in summary and "w.xml: box #3 clipped" in summary

    with pytest.raises(ValueError, match="use error"):
        lenient.fix("a", "bad_annotation", "m", "skipped")
    with pytest.raises(ValueError, match="problem kind 'oops'"):
        Problem("a", "oops", "m", "kept")
    with pytest.raises(ValueError, match="on_error"):
        ProblemLog("ignore")  # type: ignore[arg-type]


def test_sanitize_boxes_hand_computed() -> None:
    boxes = np.array(
        [
            [-5, 2, 30, 20],  # reaches left of the image: clipped to (0, 2, 30, 20)
            [10, 10, 10, 20],  # zero width: dropped
            [20, 20, 10, 30],  # inverted: dropped
            [70, 0, 80, 10],  # entirely right of the 64-wide image: dropped
            [np.nan, 0, 5, 5],  # non-finite: dropped
            [1, 1, 64.3, 47.9],  # overshoot by rounding (< 0.5 px): clipped silently
            [2, 3, 4, 5],  # fine
        ],
        dtype=np.float64,
    )
    labels = np.arange(7)
    difficult = np.array([0, 0, 0, 0, 0, 1, 0], dtype=bool)
    log = ProblemLog("raise")
    out, lab, diff = sanitize_boxes(boxes, labels, difficult, W, H, "f.xml", log)
    np.testing.assert_allclose(out, [[0, 2, 30, 20], [1, 1, 64, 47.9], [2, 3, 4, 5]], rtol=0, atol=1e-5)
    assert out.dtype == np.float32
    assert lab.tolist() == [0, 5, 6] and diff.tolist() == [False, True, False]
    assert log.counts() == {"box_clipped": 1, "box_degenerate": 4}
    messages = [p.message for p in log.of_kind("box_degenerate")]
    assert "zero area" in messages[0] and "inverted" in messages[1]
    assert "entirely outside the 64x48 image" in messages[2] and "non-finite" in messages[3]


coordinate = st.floats(-100, 200, allow_nan=False, allow_infinity=False, width=32)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(coordinate, coordinate, coordinate, coordinate), max_size=12),
       st.integers(1, 120), st.integers(1, 120))
def test_sanitize_boxes_property(rows: list[tuple], width: int, height: int) -> None:
    boxes = np.array(rows, dtype=np.float64).reshape(-1, 4)
    log = ProblemLog("skip")
    out, lab, diff = sanitize_boxes(boxes, np.arange(len(boxes)), np.zeros(len(boxes), bool), width, height, "f", log)
    # Every kept box lies inside the image with a positive area; every dropped box is logged.
    assert len(out) == len(lab) == len(diff)
    assert (out[:, 0] >= 0).all() and (out[:, 1] >= 0).all()
    assert (out[:, 2] <= width).all() and (out[:, 3] <= height).all()
    assert (out[:, 2] > out[:, 0]).all() and (out[:, 3] > out[:, 1]).all()
    assert len(log.of_kind("box_degenerate")) == len(boxes) - len(out)
    # Labels identify the survivors: each one is a box that overlapped the image.
    for k, i in enumerate(lab.tolist()):
        x1, y1, x2, y2 = boxes[i]
        assert x2 > x1 and y2 > y1 and x1 < width and y1 < height and x2 > 0 and y2 > 0
        assert math.isclose(out[k, 0], min(max(x1, 0), width), abs_tol=1e-4)
