"""Pascal VOC XML reader (one XML per image, as written by the VOC devkit and LabelImg).

Layouts found in real data, all read by ``read_voc``:
- the VOC devkit: ``Annotations/``, ``JPEGImages/``, ``ImageSets/Main/{split}.txt``
  (also one level down, e.g. a root holding ``BCCD/`` or ``VOC2007/``);
- LabelImg exports: ``annotations/`` beside ``images/``, splits as CSV files whose
  ``filename`` column lists images (raccoon's ``data/train_labels.csv``).

Contract: each record's ``boxes`` are (N, 4) float32 xyxy absolute pixels as written in
the XML (VOC's 1-based integer corners are kept as continuous coordinates: DESIGN.md
section 3, "no +1 pixel"), clipped to the image; ``difficult`` kept from ``<difficult>``;
``width``/``height`` from the image itself (EXIF orientation applied).
"""

from __future__ import annotations

import csv
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from onestage.data.record import ImageRecord
from onestage.data.io import image_size, safe_join
from onestage.data.problems import DataError, DatasetSpec, OnError, ProblemLog, fix_boxes

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
_LAYOUTS = (("Annotations", "JPEGImages"), ("annotations", "images"))


@dataclass
class _Parsed:
    """One XML, parsed but not yet mapped to class indices."""

    image_id: str
    xml: Path
    image: Path
    width: int
    height: int
    names: list[str]
    boxes: np.ndarray  # (N, 4) float64 xyxy pixels as written
    difficult: np.ndarray  # (N,) bool


def _find_layout(root: Path, annotations_dir: str | None, images_dir: str | None) -> tuple[Path, Path, Path]:
    """(dataset root, annotation folder, image folder), looking one level down if needed."""
    candidates = [root] + sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    for base in candidates:
        for ann, img in _LAYOUTS:
            a = base / (annotations_dir or ann)
            i = base / (images_dir or img)
            if a.is_dir() and i.is_dir():
                return base, a, i
    if not root.is_dir():
        raise DataError(f"{root}: VOC dataset folder not found")
    wanted = f"{annotations_dir or 'Annotations|annotations'}/ and {images_dir or 'JPEGImages|images'}/"
    raise DataError(f"{root}: no VOC layout found: expected {wanted} in it or in one of its subfolders")


def _split_ids(base: Path, root: Path, split: str) -> list[str]:
    """Image ids (file stems or file names) listed by a split: an ImageSets name, a .txt or a CSV."""
    as_path = Path(split)
    if as_path.suffix.lower() in (".txt", ".csv"):
        for candidate in (as_path, root / as_path, base / as_path):
            if candidate.is_file():
                return _read_split_file(candidate)
    sets = base / "ImageSets" / "Main"
    txt = sets / f"{split}.txt"
    if txt.is_file():
        return _read_split_file(txt)
    known = sorted(p.stem for p in sets.glob("*.txt")) if sets.is_dir() else []
    raise DataError(
        f"{root}: split {split!r} not found: not a file, and no {txt}"
        + (f"; available splits: {', '.join(known)}" if known else "")
    )


def _read_split_file(path: Path) -> list[str]:
    if path.suffix.lower() == ".csv":
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or "filename" not in reader.fieldnames:
                raise DataError(f"{path}: CSV split has no 'filename' column (columns: {reader.fieldnames})")
            # The CSV has one row per box; the images are its distinct file names, in order.
            return list(dict.fromkeys(row["filename"].strip() for row in reader if row["filename"]))
    # ImageSets lines are "id" or, in per-class files, "id  1": the id is the first token.
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def _without_image_extension(image_id: str) -> str:
    """"raccoon-1.jpg" -> "raccoon-1" (CSV splits list file names); other ids unchanged.

    Only the extension goes: a directory part stays, so that "../x.jpg" is still refused.
    """
    suffix = Path(image_id).suffix
    return image_id[: -len(suffix)] if suffix and suffix.lower() in IMAGE_EXTENSIONS else image_id


def _find_image(images: Path, image_id: str, xml_filename: str | None) -> Path | None:
    """The image of an id: ``{id}{ext}`` in the image folder, else the XML's <filename>."""
    if Path(image_id).suffix.lower() in IMAGE_EXTENSIONS:
        candidate = safe_join(images, image_id)
        if candidate.is_file():
            return candidate
    stem = _without_image_extension(image_id)
    for ext in IMAGE_EXTENSIONS + tuple(e.upper() for e in IMAGE_EXTENSIONS):
        candidate = safe_join(images, stem + ext)
        if candidate.is_file():
            return candidate
    if xml_filename:
        candidate = safe_join(images, xml_filename)
        if candidate.is_file():
            return candidate
    return None


def _number(node: ET.Element, tag: str, xml: Path, what: str) -> float:
    text = node.findtext(tag)
    if text is None or not text.strip():
        raise DataError(f"{xml}: {what} has no <{tag}>")
    try:
        return float(text)
    except ValueError:
        raise DataError(f"{xml}: {what} <{tag}> is {text.strip()!r}, not a number") from None


def _parse_xml(xml: Path, image_id: str, images: Path, log: ProblemLog) -> _Parsed | None:
    """Parse one annotation file; None (after logging) when it or its image is unusable."""
    try:
        tree = ET.parse(xml)
    except FileNotFoundError:
        log.error(xml, "bad_annotation", "annotation file not found")
        return None
    except ET.ParseError as exc:
        log.error(xml, "bad_annotation", f"malformed XML: {exc}")
        return None
    root = tree.getroot()
    try:
        image = _find_image(images, image_id, (root.findtext("filename") or "").strip() or None)
    except DataError as exc:
        log.error(xml, "path_escape", str(exc))
        return None
    if image is None:
        log.error(xml, "missing_image", f"no image for {image_id!r} in {images}")
        return None
    try:
        width, height = image_size(image)
    except DataError as exc:
        log.error(image, "corrupt_image", str(exc).removeprefix(f"{image}: "))
        return None

    names: list[str] = []
    coords: list[list[float]] = []
    difficult: list[bool] = []
    try:
        for k, obj in enumerate(root.iter("object")):
            name = (obj.findtext("name") or "").strip()
            if not name:
                raise DataError(f"{xml}: object #{k} has no <name>")
            box = obj.find("bndbox")
            if box is None:
                raise DataError(f"{xml}: object #{k} ({name}) has no <bndbox>")
            what = f"object #{k} ({name})"
            coords.append([_number(box, t, xml, what) for t in ("xmin", "ymin", "xmax", "ymax")])
            flag = (obj.findtext("difficult") or "0").strip().lower()
            difficult.append(flag in ("1", "true", "yes"))
            names.append(name)
    except DataError as exc:
        log.error(xml, "bad_annotation", str(exc).removeprefix(f"{xml}: "))
        return None

    size = root.find("size")
    xml_w = xml_h = 0.0
    if size is not None:
        try:
            xml_w = float(size.findtext("width") or 0)
            xml_h = float(size.findtext("height") or 0)
        except ValueError:
            xml_w = xml_h = 0.0
    # A missing or zero <size> is common (some tools omit it) and harmless: the image
    # gives it. A different non-zero size means the boxes may be in another frame.
    if xml_w > 0 and xml_h > 0 and (xml_w, xml_h) != (width, height):
        log.fix(xml, "size_mismatch", f"<size> says {xml_w:g}x{xml_h:g} but {image.name} is "
                f"{width}x{height} (EXIF orientation applied); using the image size", "kept")
    return _Parsed(
        image_id=_without_image_extension(image_id),
        xml=xml,
        image=image,
        width=width,
        height=height,
        names=names,
        boxes=np.asarray(coords, dtype=np.float64).reshape(-1, 4),
        difficult=np.asarray(difficult, dtype=bool),
    )


def read_voc(
    root: Path,
    *,
    split: str | None = None,
    ids: list[str] | None = None,
    annotations_dir: str | None = None,
    images_dir: str | None = None,
    class_names: list[str] | None = None,
    on_error: OnError = "raise",
) -> DatasetSpec:
    """Read a Pascal VOC dataset into records (see the module docstring for the layouts).

    root: dataset folder (or its parent, one level up). split: an ImageSets/Main name
    ("train"), or a .txt/.csv split file (absolute, or relative to root). ids: explicit
    image ids, overriding split. annotations_dir/images_dir: folder names under the
    root; None detects them. class_names: fixes the class order (an object of another
    class is an ``unknown_class`` error); None takes the sorted distinct names found.
    on_error: "raise" stops at the first unusable file, "skip" leaves it out and logs it.
    """
    root = Path(root)
    log = ProblemLog(on_error)
    base, ann_dir, img_dir = _find_layout(root, annotations_dir, images_dir)
    if ids is None and split is not None:
        ids = _split_ids(base, root, split)
    if ids is None:
        ids = sorted(p.stem for p in ann_dir.glob("*.xml"))
        if not ids:
            raise DataError(f"{ann_dir}: no .xml annotation files")

    parsed: list[_Parsed] = []
    for image_id in ids:
        try:
            xml = safe_join(ann_dir, _without_image_extension(image_id) + ".xml")
        except DataError as exc:
            log.error(ann_dir, "path_escape", f"image id {image_id!r}: {exc}")
            continue
        item = _parse_xml(xml, image_id, img_dir, log)
        if item is not None:
            parsed.append(item)

    names = list(class_names) if class_names is not None else sorted({n for p in parsed for n in p.names})
    index = {n: i for i, n in enumerate(names)}
    records: list[ImageRecord] = []
    for item in parsed:
        unknown = sorted({n for n in item.names if n not in index})
        if unknown:
            log.error(item.xml, "unknown_class", f"class {', '.join(map(repr, unknown))} is not among "
                      f"the known classes: {', '.join(names)}")
            continue
        labels = np.asarray([index[n] for n in item.names], dtype=np.int64)
        boxes, keep = fix_boxes(item.boxes, item.width, item.height, item.xml, log)
        records.append(
            ImageRecord(
                image_id=item.image_id,
                width=item.width,
                height=item.height,
                boxes=boxes,
                labels=labels[keep],
                difficult=item.difficult[keep],
                path=item.image,
            )
        )
    return DatasetSpec(records=records, class_names=names, problems=log)
