"""Users' own VOC datasets, as they come (issue 21, items 5-8): layouts named by
``data.*.annotations`` / ``data.*.images`` or XML beside the images, keys a format does not
read refused, relative paths against the dataset root, every handled quirk reported by
``data check``, the classes found and likely typos.

Datasets are built in tmp_path from the shared raccoon and BCCD photographs, rearranged
into the layouts of two public VOC datasets that cannot be downloaded here: experiencor's
kangaroo dataset (``images/`` + ``annots/``) and a Roboflow "Pascal VOC" export
(``train/`` and ``valid/`` folders, each with the XML files beside their JPEGs).
"""

from __future__ import annotations

import io
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from onestage.build import read_dataset
from onestage.cli import main as cli_main
from onestage.config import ConfigError, load_config
from onestage.data.check import _sample, _tags, check_dataset
from onestage.data.classes import edit_distance, likely_typos
from onestage.data.io import load_image
from onestage.data.problems import DataError
from onestage.data.voc import read_voc

DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
RACCOON = DATASETS / "raccoon"
BCCD = DATASETS / "bccd" / "BCCD"
pytestmark = pytest.mark.datasets


def _xml(filename: str, size: tuple[int, int], objects: list[tuple[str, tuple[int, int, int, int]]]) -> str:
    objs = "".join(
        f"<object><name>{n}</name><difficult>0</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
        f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
        for n, b in objects
    )
    return (f"<annotation><filename>{filename}</filename><size><width>{size[0]}</width>"
            f"<height>{size[1]}</height><depth>3</depth></size>{objs}</annotation>")


def _raccoons(n: int) -> list[str]:
    return [f"raccoon-{k}" for k in range(1, n + 1)]


def _kangaroo_layout(root: Path, n: int = 6) -> Path:
    """experiencor/kangaroo: images/00001.jpg with annots/00001.xml."""
    (root / "images").mkdir(parents=True)
    (root / "annots").mkdir()
    for stem in _raccoons(n):
        shutil.copy(RACCOON / "images" / f"{stem}.jpg", root / "images" / f"{stem}.jpg")
        shutil.copy(RACCOON / "annotations" / f"{stem}.xml", root / "annots" / f"{stem}.xml")
    return root


def _roboflow_layout(root: Path) -> Path:
    """A Roboflow Pascal VOC export: train/ and valid/, each with x.jpg beside x.xml."""
    ids = (BCCD.parent / "BCCD" / "ImageSets" / "Main" / "train.txt").read_text().split()
    for folder, chosen in (("train", ids[:6]), ("valid", ids[6:9])):
        (root / folder).mkdir(parents=True)
        for stem in chosen:
            shutil.copy(BCCD / "JPEGImages" / f"{stem}.jpg", root / folder / f"{stem}.jpg")
            shutil.copy(BCCD / "Annotations" / f"{stem}.xml", root / folder / f"{stem}.xml")
    return root


def _config(tmp_path: Path, train: str, val: str | None = None, extra: str = "") -> Path:
    path = tmp_path / "exp" / "exp.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "model: {arch: ssdlite, width_mult: 0.25, input_size: 128, extra_channels: [32, 32, 32]}\n"
        f"data:\n  train: {train}\n  val: {val or train}\n  augment: {{preset: none}}\n{extra}"
        "train: {batch_size: 2, epochs: 1}\nschedule: {warmup_steps: 0}\nema: {enabled: false}\n"
    )
    return path


# --------------------------------------------------------------------------- item 5: layouts
def test_named_folders_are_honoured_and_unknown_ones_fail_clearly(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    (root / "pics").mkdir(parents=True)
    (root / "xml_files").mkdir()
    for stem in _raccoons(4):
        shutil.copy(RACCOON / "images" / f"{stem}.jpg", root / "pics")
        shutil.copy(RACCOON / "annotations" / f"{stem}.xml", root / "xml_files")
    with pytest.raises(DataError, match="no VOC layout found.*data.\\*.annotations"):
        read_voc(root)
    cfg = load_config(_config(tmp_path, "{format: voc, root: ../ds, annotations: xml_files, images: pics}"))
    assert cfg.data.train.annotations == root.resolve() / "xml_files"  # relative to root, not the config
    spec = read_dataset(cfg.data.train, cfg)
    assert [r.image_id for r in spec.records] == sorted(_raccoons(4))
    assert {r.path.parent for r in spec.records} == {(root / "pics").resolve()}


def test_kangaroo_layout_images_and_annots(tmp_path: Path) -> None:
    root = _kangaroo_layout(tmp_path / "kangaroo")
    spec = read_voc(root)  # annots/ is a known XML folder name now
    assert len(spec.records) == 6 and sum(len(r.boxes) for r in spec.records) == 6
    rec = next(r for r in spec.records if r.image_id == "raccoon-1")
    np.testing.assert_array_equal(rec.boxes, [[81, 88, 522, 408]])


def test_xml_beside_the_images(tmp_path: Path) -> None:
    root = _roboflow_layout(tmp_path / "roboflow")
    train = read_voc(root / "train")
    assert len(train.records) == 6
    assert all(r.path.parent == (root / "train").resolve() for r in train.records)
    # Or the dataset folder with images named as a key: XML found beside them.
    cfg = load_config(_config(tmp_path, "{format: voc, root: ../roboflow, images: valid}"))
    assert len(read_dataset(cfg.data.train, cfg).records) == 3


@pytest.mark.parametrize(
    ("dataset", "message"),
    [
        ("{format: yolo, root: ds, images: pics}", r"data\.train: .*images: not used by format 'yolo'"),
        ("{format: voc, root: ds, num_images: 5}", r"num_images: not used by format 'voc'"),
        ("{format: shapes, root: ds}", r"root: not used by format 'shapes'"),
        ("{format: coco, annotations: a.json, split: train}", r"split: not used by format 'coco'"),
    ],
)
def test_a_key_the_format_does_not_read_is_refused(tmp_path: Path, dataset: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(_config(tmp_path, dataset, "{format: shapes}"))


# --------------------------------------------------------------------------- item 6: relative paths
def test_split_file_resolves_against_the_dataset_root_not_the_current_folder(tmp_path: Path, monkeypatch) -> None:
    root = _kangaroo_layout(tmp_path / "kangaroo")
    shutil.move(str(root / "annots"), str(root / "annotations"))  # the LabelImg layout, read all along
    (root / "train.txt").write_text("\n".join(_raccoons(5)) + "\n")
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    (elsewhere / "train.txt").write_text("raccoon-1\nraccoon-2\n")  # must not win
    monkeypatch.chdir(elsewhere)
    cfg = load_config(_config(tmp_path, "{format: voc, root: ../kangaroo, split: train.txt}"))
    assert len(read_dataset(cfg.data.train, cfg).records) == 5
    assert len(read_voc(root, split="train.txt").records) == 5


# --------------------------------------------------------------------------- item 7: quirks
def _save(image: Image.Image, path: Path, fmt: str, **kw) -> None:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    path.write_bytes(buf.getvalue())


def _quirky_dataset(root: Path) -> Path:
    """images/ + annotations/ with one image per quirk (module docstring of data/problems.py)."""
    root = _kangaroo_layout(root, n=3)
    shutil.move(str(root / "annots"), str(root / "annotations"))
    images, ann = root / "images", root / "annotations"
    rgb = load_image(RACCOON / "images" / "raccoon-4.jpg")  # 275x183
    h, w = rgb.shape[:2]
    box = (20, 30, 120, 150)

    def add(stem: str, ext: str, size: tuple[int, int], objects=None) -> None:
        (ann / f"{stem}.xml").write_text(_xml(f"{stem}{ext}", size, objects or [("raccoon", box)]))

    _save(Image.fromarray(rgb), images / "png_named_jpg.jpg", "PNG")
    add("png_named_jpg", ".jpg", (w, h))
    _save(Image.fromarray(rgb).convert("RGBA"), images / "rgba.png", "PNG")
    add("rgba", ".png", (w, h))
    _save(Image.fromarray(rgb).convert("P"), images / "palette.png", "PNG")
    add("palette", ".png", (w, h))
    deep = (np.asarray(Image.fromarray(rgb).convert("L")).astype(np.uint16) * 257)
    Image.fromarray(deep).save(images / "deep16.png")  # mode I;16
    add("deep16", ".png", (w, h))
    exif = Image.Exif()
    exif[0x0112] = 9  # not an orientation
    _save(Image.fromarray(rgb), images / "bad_orientation.jpg", "JPEG", exif=exif.tobytes(), quality=95)
    add("bad_orientation", ".jpg", (w, h))
    _save(Image.fromarray(rgb), images / "zero_size.jpg", "JPEG", quality=95)
    add("zero_size", ".jpg", (0, 0))
    # Stored 275x183 with EXIF 6 (shown 183x275); the XML was made on the stored pixels: a white
    # block at the box, so that the rotated box must land on the rotated block.
    stored = rgb.copy()
    stored[box[1]:box[3], box[0]:box[2]] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    _save(Image.fromarray(stored), images / "rotated.jpg", "JPEG", exif=exif.tobytes(), quality=95)
    add("rotated", ".jpg", (w, h))
    return root


def test_data_check_reports_every_quirk_with_its_file(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("onestage.data.io.LARGE_IMAGE_PIXELS", 200_000, raising=False)  # raccoon-1..3 are larger
    root = _quirky_dataset(tmp_path / "quirks")
    spec = read_voc(root, on_error="skip")
    assert not spec.problems.errors and len(spec.records) == 10
    counts = spec.problems.counts()
    assert counts["format_mismatch"] == 1 and counts["size_zero"] == 1
    assert counts["image_converted"] == 3  # RGBA, palette, 16-bit
    assert counts["exif_orientation"] == 2  # the invalid value and the rotated image
    assert counts["large_image"] >= 1

    def files(kind: str) -> set[str]:
        return {Path(p.file).name for p in spec.problems.of_kind(kind)}

    assert files("format_mismatch") == {"png_named_jpg.jpg"}
    assert files("image_converted") == {"rgba.png", "palette.png", "deep16.png"}
    assert files("size_zero") == {"zero_size.xml"}
    assert files("exif_orientation") == {"bad_orientation.jpg", "rotated.jpg"}

    # The rotated image: boxes moved into the shown frame, onto the white block.
    rec = next(r for r in spec.records if r.image_id == "rotated")
    assert (rec.width, rec.height) == (183, 275)
    x1, y1, x2, y2 = rec.boxes[0].round().astype(int).tolist()
    assert (x1, y1, x2, y2) == (183 - 150, 20, 183 - 30, 120)
    shown = load_image(rec.path)
    assert shown[y1 + 5 : y2 - 5, x1 + 5 : x2 - 5].min() > 230  # the block is where the box is
    [note] = [p for p in spec.problems.of_kind("exif_orientation") if p.action == "rotated"]
    assert "stored frame" in note.message

    report, status = check_dataset(spec, tmp_path / "check" / "samples.png", num_samples=4)
    assert status == 0 and "status: OK" in report
    for kind in ("format_mismatch", "image_converted", "size_zero", "exif_orientation", "large_image"):
        assert re.search(rf"^\s+{kind}: \d+$", report, re.M), kind
    for name in ("png_named_jpg.jpg", "rgba.png", "palette.png", "deep16.png", "zero_size.xml", "rotated.jpg"):
        assert name in report, name
    # The rotated image is among the drawn samples, its caption saying which frame was used.
    tags = _tags(spec)
    assert tags[str(rec.path)] == "EXIF: boxes rotated from stored frame"
    assert spec.records.index(rec) in _sample(spec, 4, tags)
    assert (tmp_path / "check" / "samples.png").is_file()


# --------------------------------------------------------------------------- item 8: classes
def test_edit_distance_and_likely_typos() -> None:
    assert edit_distance("raccoon", "racoon") == 1 and edit_distance("kitten", "sitting") == 3
    names = ["Platelets", "RBC", "WBC", "platelet", "raccoon", "racoon", "cat", "car", "Cat"]
    counts = np.array([300, 900, 4, 2, 200, 3, 50, 60, 1])
    assert likely_typos(names, counts) == [("platelet", "Platelets", 1), ("racoon", "raccoon", 1), ("Cat", "cat", 0)]
    # RBC / WBC are one edit apart, but three letters: two classes, however rare WBC is; cat and
    # car are both frequent.


def test_classes_found_and_a_typo_are_reported(tmp_path: Path, capsys) -> None:
    root = _kangaroo_layout(tmp_path / "kangaroo", n=8)
    xml = root / "annots" / "raccoon-3.xml"
    xml.write_text(xml.read_text().replace("<name>raccoon</name>", "<name>racoon</name>"))
    config = _config(tmp_path, "{format: voc, root: ../kangaroo}")
    cfg = load_config(config)
    spec = read_dataset(cfg.data.train, cfg)
    assert spec.class_names == ["raccoon", "racoon"]
    [found] = spec.problems.of_kind("classes_found")
    assert "0: raccoon (" in found.message and "1: racoon (1 boxes)" in found.message
    [typo] = spec.problems.of_kind("likely_typo")
    assert "'racoon' (1 boxes) is 1 edit(s) from 'raccoon'" in typo.message and "raccoon-3.jpg" in typo.message
    # Named classes: nothing to report (and the misspelled object is an unknown class).
    named = load_config(config, ["data.class_names=[raccoon]", "data.on_error=skip"])
    assert not read_dataset(named.data.train, named).problems.of_kind("likely_typo")
    # `data check` prints both.
    assert cli_main(["data", "check", str(config), "--out", str(tmp_path / "check")]) == 0
    out = capsys.readouterr().out
    assert "classes_found: 1" in out and "likely_typo: 1" in out and "status: OK" in out


# --------------------------------------------------------------------------- both layouts, end to end
@pytest.mark.parametrize("layout", ["kangaroo", "roboflow"])
def test_emulated_public_layouts_check_and_train_as_they_come(tmp_path: Path, layout: str, capsys) -> None:
    if layout == "kangaroo":
        _kangaroo_layout(tmp_path / "kangaroo")
        config = _config(tmp_path, "{format: voc, root: ../kangaroo}")
    else:
        _roboflow_layout(tmp_path / "roboflow")
        config = _config(tmp_path, "{format: voc, root: ../roboflow/train}", "{format: voc, root: ../roboflow/valid}",
                         extra="  class_names: [Platelets, RBC, WBC]\n")
    assert cli_main(["data", "check", str(config), "--out", str(tmp_path / "check")]) == 0
    assert "status: OK" in capsys.readouterr().out
    args = [str(config), f"train.out_dir={tmp_path / 'runs'}", "train.name=run", "--no-progress", "--max-steps", "1"]
    assert cli_main(["train", *args]) == 0
    assert (tmp_path / "runs" / "run" / "last.pt").is_file()
