"""`onestage data check`: counts, size classes, problems, exit status, the sample grid, drawing."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from onestage.data.record import ImageRecord
from onestage.data.check import TILE, check_dataset, class_color, draw_boxes
from onestage.data.problems import DatasetSpec, ProblemLog
from onestage.data.voc import read_voc

DATASETS = Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets"


def _rec(image_id: str, boxes: list, labels: list, path: Path | None = None, size: tuple[int, int] = (200, 150),
         image: np.ndarray | None = None) -> ImageRecord:
    w, h = size
    if path is None and image is None:
        image = np.full((h, w, 3), 90, dtype=np.uint8)
    return ImageRecord(image_id=image_id, width=w, height=h, boxes=np.array(boxes, dtype=np.float32).reshape(-1, 4),
                       labels=np.array(labels), path=path, image=image)


def _spec(tmp_path: Path) -> DatasetSpec:
    Image.fromarray(np.full((150, 200, 3), 30, dtype=np.uint8)).save(tmp_path / "on_disk.png")
    records = [
        # areas: 10x10 = 100 (small), 40x40 = 1600 (medium), 100x100 = 10000 (large)
        _rec("a", [[0, 0, 10, 10], [50, 50, 90, 90]], [0, 1]),
        _rec("b", [[0, 0, 100, 100]], [1], path=tmp_path / "on_disk.png"),
        _rec("c", [], []),  # background
    ]
    log = ProblemLog("skip")
    log.fix("ann/a.xml", "box_clipped", "box #0 clipped", "clipped")
    return DatasetSpec(records=records, class_names=["cat", "dog", "emu"], problems=log)


def test_report_counts_and_png(tmp_path: Path) -> None:
    out = tmp_path / "grid" / "samples.png"
    report, status = check_dataset(_spec(tmp_path), out, num_samples=16)
    assert status == 0  # a clipped box is a fix, not an error
    assert "images: 3" in report
    assert "boxes: 3 (0 difficult/crowd)" in report
    assert "background images (no boxes): 1" in report
    assert re.search(r"^\s+cat\s+1\s+1\s+0$", report, re.M)
    assert re.search(r"^\s+dog\s+2\s+2\s+0$", report, re.M)
    assert re.search(r"^\s+emu\s+0\s+0\s+0$", report, re.M)
    assert "boxes per class (3 classes, 2 used)" in report
    assert "small (< 32^2) 1 (33.3%), medium (< 96^2) 1 (33.3%), large 1 (33.3%)" in report
    assert "ann/a.xml: box #0 clipped [box_clipped, clipped]" in report
    assert report.endswith("status: OK")
    # 3 tiles -> a 2 x 2 grid of (TILE + caption) x TILE cells.
    grid = np.asarray(Image.open(out))
    assert grid.shape == (2 * (TILE + 18), 2 * TILE, 3)


def test_corrupt_and_resized_images_fail_the_check(tmp_path: Path) -> None:
    spec = _spec(tmp_path)
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (150, 200, 3), dtype=np.uint8)).save(buf, "JPEG")
    (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[:400])  # header intact, pixels cut
    Image.fromarray(np.zeros((10, 20, 3), dtype=np.uint8)).save(tmp_path / "small.png")
    spec.records += [_rec("cut", [[1, 1, 5, 5]], [0], path=tmp_path / "cut.jpg"),
                     _rec("small", [[1, 1, 5, 5]], [0], path=tmp_path / "small.png"),
                     _rec("gone", [], [], path=tmp_path / "gone.png")]
    report, status = check_dataset(spec, None)
    assert status == 1
    assert re.search(r"cut\.jpg: corrupt image .*\[corrupt_image, skipped\]", report)
    assert re.search(r"small\.png: image is 20x10 but the record says 200x150.*\[size_mismatch, skipped\]", report)
    assert re.search(r"gone\.png: image file not found \[missing_image, skipped\]", report)
    assert "problems: 4 (3 errors, 1 fixed or noted)" in report
    assert report.endswith("status: FAILED (errors above)")

    # Without decoding every image, only the sampled ones are read: the first record only.
    quick, quick_status = check_dataset(spec, tmp_path / "one.png", num_samples=1, read_images=False)
    assert quick_status == 0 and "samples: 1 images drawn" in quick


def test_bad_records_from_elsewhere_are_errors(tmp_path: Path) -> None:
    spec = DatasetSpec(records=[_rec("x", [[5, 5, 300, 20]], [7])], class_names=["cat"], problems=ProblemLog())
    report, status = check_dataset(spec, None)
    assert status == 1
    assert "labels [7] are outside [0, 1) (known classes: cat)" in report
    assert "1 boxes are empty or outside the 200x150 image" in report


def test_draw_boxes_draws_edges_in_class_colour() -> None:
    image = np.zeros((100, 120, 3), dtype=np.uint8)
    out = draw_boxes(image, np.array([[10, 30, 60, 80]]), np.array([1]), ["cat", "dog"])
    assert out.shape == image.shape and out.dtype == np.uint8
    assert not image.any()  # the input is not modified
    assert out[55, 10].tolist() == list(class_color(1))  # left edge, away from the label
    assert out[55, 60].tolist() == list(class_color(1))  # right edge
    assert out[55, 35].tolist() == [0, 0, 0]  # inside the box: untouched
    assert out[95, 115].tolist() == [0, 0, 0]  # far corner: untouched
    assert out[20:30, 10:40].any()  # the label "dog" above the box
    with_score = draw_boxes(image, np.array([[10, 30, 60, 80]]), np.array([1]), ["cat", "dog"], scores=np.array([0.9]))
    assert (with_score[15:30, 10:80] != out[15:30, 10:80]).any()  # "dog 0.90" is longer than "dog"
    # A label outside the names is drawn as its number, not an IndexError.
    assert draw_boxes(image, np.array([[0, 0, 5, 5]]), np.array([9]), ["cat"]).any()


@pytest.mark.datasets
def test_real_raccoon_test_split(tmp_path: Path) -> None:
    spec = read_voc(DATASETS / "raccoon", split="data/test_labels.csv")
    report, status = check_dataset(spec, tmp_path / "raccoon.png", num_samples=4)
    assert status == 0
    assert "images: 40" in report and re.search(r"^\s+raccoon\s+44\s+40\s+0$", report, re.M)
    assert "problems: none" in report
    assert Image.open(tmp_path / "raccoon.png").size == (2 * TILE, 2 * (TILE + 18))
