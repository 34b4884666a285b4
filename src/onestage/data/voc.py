"""Pascal VOC XML reader (one XML per image, as written by the VOC devkit and LabelImg).

Layouts found in real data, all read by ``read_voc``:
- the VOC devkit: ``Annotations/``, ``JPEGImages/``, ``ImageSets/Main/{split}.txt``
  (also one level down, e.g. a root holding ``BCCD/`` or ``VOC2007/``);
- LabelImg / Roboflow exports: ``annotations/`` (or ``annots/``, ``xml/``) beside
  ``images/``, splits as CSV files whose ``filename`` column lists images (raccoon's
  ``data/train_labels.csv``);
- XML files beside their images, in the root or in its image folder;
- any other: ``data.*.annotations`` (the XML folder) and ``data.*.images`` (the image
  folder) name the folders, relative to the root.
A split file (``.txt`` / ``.csv``) is relative to the dataset root (then the detected
base one level down), never to the folder the command runs in.

Contract: each record's ``boxes`` are (N, 4) float32 xyxy absolute pixels as written in
the XML (VOC's 1-based integer corners are kept as continuous coordinates: DESIGN.md
section 3, "no +1 pixel"), clipped to the image; ``difficult`` kept from ``<difficult>``;
``width``/``height`` from the image itself (EXIF orientation applied).

Frame of the boxes of an EXIF-rotated image (orientation 5-8, width and height swapped):
decided from the XML's ``<size>``. Equal to the stored (unrotated) size, the boxes were
drawn on the stored pixels (tools that ignore EXIF) and are rotated with the image into
the upright frame; equal to the upright size, or absent, they are taken as they are. The
choice is noted (``exif_orientation``) for ``onestage data check`` to list and draw.
"""

from __future__ import annotations

import csv
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from onestage.data.record import ImageRecord
from onestage.data.io import ImageInfo, exif_boxes_to_upright, image_info, note_image_quirks, safe_join
from onestage.data.problems import DataError, DatasetSpec, OnError, ProblemLog, fix_boxes

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
# Folder names tried, in order, when the config does not name them.
ANNOTATION_FOLDERS = ("Annotations", "annotations", "annots", "Annots", "xml", "XML", "labels")
IMAGE_FOLDERS = ("JPEGImages", "images", "Images", "imgs", "img", "JPEGs")


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


def _has_xml(folder: Path) -> bool:
    return folder.is_dir() and any(folder.glob("*.xml"))


def _has_images(folder: Path) -> bool:
    return folder.is_dir() and any(p.suffix.lower() in IMAGE_EXTENSIONS for p in folder.iterdir())


def _named_layout(root: Path, annotations_dir: str | Path | None, images_dir: str | Path | None) -> tuple[Path, Path, Path]:
    """The layout the config names (``data.*.annotations`` / ``data.*.images``), relative to root."""
    images = root / images_dir if images_dir is not None else None
    annotations = root / annotations_dir if annotations_dir is not None else None
    if images is None:
        # Annotations named: images in a usual folder beside them, in the root, or with the XML.
        found = [root / n for n in IMAGE_FOLDERS if _has_images(root / n)]
        images = found[0] if found else (root if _has_images(root) else annotations)
    if annotations is None:
        found = [root / n for n in ANNOTATION_FOLDERS if _has_xml(root / n)]
        annotations = found[0] if found else images  # XML beside the images
    assert images is not None and annotations is not None
    for key, folder in (("images", images), ("annotations", annotations)):
        if not folder.is_dir():
            what = "not a folder" if folder.exists() else "not found"
            raise DataError(f"{folder}: data.*.{key} of a VOC dataset must be a folder; {what}")
    if not _has_xml(annotations):
        raise DataError(f"{annotations}: no .xml annotation files in this folder (set data.*.annotations)")
    return root, annotations, images


def _find_layout(
    root: Path, annotations_dir: str | Path | None = None, images_dir: str | Path | None = None
) -> tuple[Path, Path, Path]:
    """(dataset base, annotation folder, image folder), looking one level down if needed."""
    if not root.is_dir():
        raise DataError(f"{root}: VOC dataset folder not found")
    if annotations_dir is not None or images_dir is not None:
        return _named_layout(root, annotations_dir, images_dir)
    candidates = [root] + sorted(p for p in root.iterdir() if p.is_dir())
    for base in candidates:
        for ann in ANNOTATION_FOLDERS:
            if not _has_xml(base / ann):
                continue
            for img in IMAGE_FOLDERS:
                if (base / img).is_dir():
                    return base, base / ann, base / img
            if _has_images(base / ann):  # XML beside the images, in a folder of both
                return base, base / ann, base / ann
    for base in candidates:
        for img in (*IMAGE_FOLDERS, ""):
            folder = base / img if img else base
            if _has_xml(folder) and _has_images(folder):  # XML beside the images
                return base, folder, folder
    raise DataError(
        f"{root}: no VOC layout found: expected an annotation folder ({'|'.join(ANNOTATION_FOLDERS)}) with an "
        f"image folder ({'|'.join(IMAGE_FOLDERS)}), or .xml files beside the images, in it or one of its "
        "subfolders; name other folders with data.*.annotations and data.*.images"
    )


def _split_ids(base: Path, root: Path, split: str) -> list[str]:
    """Image ids (file stems or file names) listed by a split: an ImageSets name, a .txt or a CSV.

    A relative split file is looked up under the dataset root, then under the detected base
    (one level down), never in the current folder (issue 21: a train.txt where the command
    runs must not replace the dataset's own).
    """
    as_path = Path(split)
    if as_path.suffix.lower() in (".txt", ".csv"):
        candidates = (as_path,) if as_path.is_absolute() else (root / as_path, base / as_path)
        for candidate in candidates:
            if candidate.is_file():
                return _read_split_file(candidate)
    sets = base / "ImageSets" / "Main"
    txt = sets / f"{split}.txt"
    if txt.is_file():
        return _read_split_file(txt)
    known = sorted(p.stem for p in sets.glob("*.txt")) if sets.is_dir() else []
    raise DataError(
        f"{root}: split {split!r} not found: no such file under the dataset root, and no {txt}"
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


def _xml_size(root: ET.Element) -> tuple[float, float] | None:
    """The XML's <size> (width, height); None when absent or not numbers."""
    size = root.find("size")
    if size is None:
        return None
    try:
        return float(size.findtext("width") or 0), float(size.findtext("height") or 0)
    except ValueError:
        return None


def _boxes_in_image_frame(
    boxes: np.ndarray, xml_size: tuple[float, float] | None, info: ImageInfo, xml: Path, image: Path, log: ProblemLog
) -> np.ndarray:
    """(N, 4) xyxy pixels as written -> the upright image's frame, noting every decision
    (module docstring: the frame of an EXIF-rotated image's boxes comes from <size>)."""
    upright = (info.width, info.height)
    stored = (info.stored_width, info.stored_height)
    if xml_size is not None and (xml_size[0] <= 0 or xml_size[1] <= 0):
        log.fix(xml, "size_zero", f"<size> is {xml_size[0]:g}x{xml_size[1]:g}; using the size of {image.name}, "
                f"{info.width}x{info.height}", "kept")
        xml_size = None
    orientation = info.orientation if info.orientation is not None and 2 <= info.orientation <= 8 else None
    if orientation is not None:
        if info.rotated and xml_size == stored:
            log.fix(image, "exif_orientation", f"EXIF orientation {orientation}: stored {stored[0]}x{stored[1]}, "
                    f"shown {upright[0]}x{upright[1]}; the <size> of {xml.name} is the stored frame, so its boxes were "
                    "drawn on the stored pixels: rotated with the image into the shown frame", "rotated")
            return exif_boxes_to_upright(boxes, orientation, *stored)
        if xml_size is None:
            why = "no <size> to tell the frame"
        elif not info.rotated:
            why = "<size> cannot tell the frames apart (same width and height)"
        elif xml_size == upright:
            why = "<size> is the shown frame"
        else:
            why = "<size> matches neither frame"
        log.fix(image, "exif_orientation", f"EXIF orientation {orientation} (shown {upright[0]}x{upright[1]}); "
                f"{why.replace('<size>', f'the <size> of {xml.name}')}: its boxes taken in the shown (upright) frame",
                "kept")
    if xml_size is not None and xml_size != upright:
        log.fix(xml, "size_mismatch", f"<size> says {xml_size[0]:g}x{xml_size[1]:g} but {image.name} is "
                f"{upright[0]}x{upright[1]} (EXIF orientation applied); using the image size", "kept")
    return boxes


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
        info = image_info(image)
    except DataError as exc:
        log.error(image, "corrupt_image", str(exc).removeprefix(f"{image}: "))
        return None
    note_image_quirks(info, image, log)
    width, height = info.width, info.height

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

    boxes = np.asarray(coords, dtype=np.float64).reshape(-1, 4)
    boxes = _boxes_in_image_frame(boxes, _xml_size(root), info, xml, image, log)
    return _Parsed(
        image_id=_without_image_extension(image_id),
        xml=xml,
        image=image,
        width=width,
        height=height,
        names=names,
        boxes=boxes,
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
