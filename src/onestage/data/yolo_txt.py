"""YOLO txt reader (the Darknet/Ultralytics layout: one ``.txt`` of normalized boxes per image).

Layout: ``images/<split>/x.jpg`` with its labels in ``labels/<split>/x.txt`` (the last
``images`` folder of the path replaced by ``labels``; labels beside the images when the
path has no ``images`` folder). Class names come from ``data.yaml`` (``names`` as a list or
an ``{index: name}`` mapping), else from a ``classes.txt``, else from ``class_names``.

Each label line is ``class cx cy w h`` normalized to [0, 1] of the image, or a polygon
``class x1 y1 x2 y2 ...`` (Ultralytics segment labels; its bounding box is taken).

The reader walks the IMAGES, not the label files: an image without a label file is a
background image (no boxes), kept; a label file without an image is reported
(``orphan_label``) and not used.

Contract: ``boxes`` (N, 4) float32 xyxy absolute pixels of the real image size (header
read, EXIF orientation applied), clipped to the image; ``image_id`` the image path
relative to the split folder, without extension.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import yaml

from onestage.data.record import ImageRecord
from onestage.data.io import image_info, note_image_quirks, safe_join
from onestage.data.problems import DataError, DatasetSpec, OnError, ProblemLog, fix_boxes

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})
YAML_NAMES = ("data.yaml", "dataset.yaml")
# A normalized coordinate above this is not rounding: the file most likely holds pixels.
_MAX_NORMALIZED = 1.001


class _LabelError(Exception):
    """A problem in one label file: its kind and a message naming the line (the caller adds the file)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


def _names_from_yaml(path: Path, data: dict) -> list[str]:
    names = data.get("names")
    if isinstance(names, list) and all(isinstance(n, (str, int)) for n in names):
        out = [str(n) for n in names]
    elif isinstance(names, dict):
        keys = sorted(names)
        if keys != list(range(len(keys))):
            raise DataError(f"{path}: 'names' keys must be the class indices 0..{len(keys) - 1}, got {keys}")
        out = [str(names[k]) for k in keys]
    else:
        raise DataError(f"{path}: 'names' must be a list or an {{index: name}} mapping, got {names!r}")
    nc = data.get("nc")
    if nc is not None and nc != len(out):
        raise DataError(f"{path}: 'nc' is {nc} but 'names' lists {len(out)} classes")
    return out


def _load_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise DataError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a mapping with 'names' and split folders")
    return data


def _locate(data_yaml_or_root: Path) -> tuple[Path, Path | None, dict]:
    """(dataset root, data.yaml or None, its content)."""
    given = Path(data_yaml_or_root)
    if given.is_file():
        data = _load_yaml(given)
        root = given.parent
        if isinstance(data.get("path"), str):
            # Ultralytics resolves `path` against its own datasets folder; here, against the
            # YAML's folder, falling back to that folder when the result does not exist.
            candidate = Path(data["path"])
            candidate = candidate if candidate.is_absolute() else root / candidate
            root = candidate if candidate.is_dir() else root
        return root, given, data
    if given.is_dir():
        for name in YAML_NAMES:
            if (given / name).is_file():
                return _locate(given / name)
        return given, None, {}
    raise DataError(f"{given}: YOLO dataset not found (expected a data.yaml file or a dataset folder)")


def _split_images(root: Path, yaml_path: Path | None, data: dict, split: str) -> tuple[Path | None, list[Path]]:
    """(image folder, image files) of a split: a data.yaml key (train/val/test) or a folder name.

    The folder is None for a split given as a .txt list of images.
    """
    value = data.get(split)
    if isinstance(value, str):
        target = safe_join(root, value)
        if target.is_file() and target.suffix == ".txt":
            # Ultralytics split lists: one image path per line, relative to the dataset root.
            files = [safe_join(root, line.strip().removeprefix("./")) for line in target.read_text().splitlines()
                     if line.strip()]
            return None, files
        folder = target
    else:
        folder = safe_join(root, f"images/{split}")
        if not folder.is_dir() and (root / split).is_dir():
            folder = safe_join(root, split)
    if not folder.is_dir():
        keys = [k for k in ("train", "val", "test") if isinstance(data.get(k), str)]
        have = sorted(p.name for p in (root / "images").iterdir() if p.is_dir()) if (root / "images").is_dir() else []
        raise DataError(
            f"{yaml_path or root}: split {split!r} not found: no folder {folder}"
            + (f"; data.yaml splits: {', '.join(keys)}" if keys else "")
            + (f"; folders in images/: {', '.join(have)}" if have else "")
        )
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    return folder, files


def _label_folder(image_folder: Path) -> Path:
    """Replace the last ``images`` component with ``labels`` (the Ultralytics convention)."""
    parts = image_folder.parts
    for i in range(len(parts) - 1, -1, -1):
        if parts[i] == "images":
            return Path(*parts[:i], "labels", *parts[i + 1:])
    return image_folder


def _parse_label(path: Path, num_classes: int, class_names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(classes (N,) int64, boxes (N, 4) float64 cxcywh normalized) of one label file.

    Raises _LabelError naming the line and the problem.
    """
    try:
        text = path.read_text()
    except UnicodeDecodeError as exc:
        raise _LabelError("bad_annotation", f"not a text file: {exc}") from exc
    classes: list[int] = []
    boxes: list[list[float]] = []
    for n, line in enumerate(text.splitlines(), start=1):
        tokens = line.split()
        if not tokens:
            continue
        try:
            values = [float(t) for t in tokens]
        except ValueError:
            raise _LabelError("bad_annotation", f"line {n}: {line.strip()!r} is not all numbers") from None
        if not all(math.isfinite(v) for v in values):
            raise _LabelError("bad_annotation", f"line {n}: {line.strip()!r} has a non-finite value")
        if len(values) == 5:
            cx, cy, w, h = values[1:]
        elif len(values) >= 7 and len(values) % 2 == 1:
            xs, ys = values[1::2], values[2::2]  # polygon: its bounding box
            cx, cy, w, h = (min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2, max(xs) - min(xs), max(ys) - min(ys)
        else:
            raise _LabelError("bad_annotation", f"line {n}: expected 'class cx cy w h' (5 values) or a polygon, "
                            f"got {len(values)} values: {line.strip()!r}")
        if not values[0].is_integer():
            raise _LabelError("bad_annotation", f"line {n}: class {tokens[0]!r} is not an integer")
        cls = int(values[0])
        if not 0 <= cls < num_classes:
            raise _LabelError("unknown_class", f"line {n}: class {cls} is not among the known classes: "
                            f"0..{num_classes - 1} ({', '.join(class_names)})")
        if max(abs(v) for v in values[1:]) > _MAX_NORMALIZED:
            raise _LabelError("bad_annotation", f"line {n}: coordinates must be normalized to [0, 1], got "
                            f"{line.strip()!r} (pixel coordinates?)")
        classes.append(cls)
        boxes.append([cx, cy, w, h])
    return np.asarray(classes, dtype=np.int64), np.asarray(boxes, dtype=np.float64).reshape(-1, 4)


def read_yolo(
    data_yaml_or_root: Path,
    split: str = "train",
    *,
    class_names: list[str] | None = None,
    on_error: OnError = "raise",
) -> DatasetSpec:
    """Read a YOLO txt dataset split into records (module docstring: layout and contract).

    data_yaml_or_root: the data.yaml, or the dataset folder (a data.yaml in it is used).
    split: a data.yaml key ("train", "val") or a folder under images/ ("train2017").
    class_names: the names when there is neither a data.yaml nor a classes.txt (or to
    override them; the label indices must then refer to this list).
    on_error: "raise" stops at the first unusable file, "skip" leaves it out and logs it.
    """
    root, yaml_path, data = _locate(Path(data_yaml_or_root))
    if class_names is not None:
        names = list(class_names)
    elif yaml_path is not None:
        names = _names_from_yaml(yaml_path, data)
    elif (root / "classes.txt").is_file():
        names = [n.strip() for n in (root / "classes.txt").read_text().splitlines() if n.strip()]
    else:
        raise DataError(f"{root}: no class names: expected a data.yaml with 'names', a classes.txt, "
                        f"or the class_names argument")
    log = ProblemLog(on_error)
    image_folder, images = _split_images(root, yaml_path, data, split)

    records: list[ImageRecord] = []
    used_labels: set[Path] = set()
    for image in images:
        label = _label_folder(image.parent) / (image.stem + ".txt")
        used_labels.add(label)
        try:
            info = image_info(image)
        except DataError as exc:
            log.error(image, "corrupt_image", str(exc).removeprefix(f"{image}: "))
            continue
        note_image_quirks(info, image, log)
        width, height = info.width, info.height
        if label.is_file():
            try:
                classes, cxcywh = _parse_label(label, len(names), names)
            except _LabelError as exc:
                log.error(label, exc.kind, exc.message)
                continue
        else:
            classes, cxcywh = np.zeros(0, dtype=np.int64), np.zeros((0, 4), dtype=np.float64)
        scale = np.array([width, height, width, height], dtype=np.float64)
        xyxy = np.concatenate([cxcywh[:, :2] - cxcywh[:, 2:] / 2, cxcywh[:, :2] + cxcywh[:, 2:] / 2], axis=1) * scale
        boxes, keep = fix_boxes(xyxy, width, height, label, log)  # (K, 4) xyxy pixels
        base = image_folder if image_folder is not None and image.is_relative_to(image_folder) else image.parent
        records.append(
            ImageRecord(
                image_id=image.relative_to(base).with_suffix("").as_posix(),
                width=width,
                height=height,
                boxes=boxes,
                labels=classes[keep],
                path=image,
            )
        )

    # Orphans: label files of the split's label folder that no image claimed.
    label_folder = _label_folder(image_folder) if image_folder is not None else None
    if label_folder is not None and label_folder != image_folder and label_folder.is_dir():
        for label in sorted(label_folder.rglob("*.txt")):
            if label not in used_labels:
                n = sum(1 for line in label.read_text(errors="replace").splitlines() if line.strip())
                log.fix(label, "orphan_label", f"label file has no image in {image_folder}; its {n} "
                        f"box{'es' if n != 1 else ''} are not used", "dropped")
    return DatasetSpec(records=records, class_names=names, problems=log)
