"""``onestage data check``: read every image once, count what the dataset holds, show samples.

The report lists the number of images, boxes per class, background images, the box
size distribution in COCO's terms (small < 32^2 <= medium < 96^2 <= large, by box area in
pixels: COCO's "Detection Evaluation" page), image sizes, and every problem with its
file: those the reader found (``DatasetSpec.problems``) and those only reading the pixels
reveals (a truncated file, a size that differs from the record's). The exit status is 1
when any problem is an error (a file that was raised on or skipped), else 0.

``draw_boxes`` is the one drawing helper, reused to draw predictions.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from onestage.data.record import ImageRecord
from onestage.data.io import read_record_file
from onestage.data.problems import DataError, DatasetSpec, ProblemLog

# COCO's area ranges (cocodataset.org/#detection-eval): small < 32^2 <= medium < 96^2 <= large.
SMALL_AREA = 32.0**2
MEDIUM_AREA = 96.0**2
TILE = 320  # side of one sample in the PNG grid, pixels

# 20 well-separated RGB colours (Tableau 20); class k gets colour k mod 20.
_PALETTE = np.array(
    [
        (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
        (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
        (174, 199, 232), (255, 187, 120), (152, 223, 138), (255, 152, 150), (197, 176, 213),
        (196, 156, 148), (247, 182, 210), (199, 199, 199), (219, 219, 141), (158, 218, 229),
    ],
    dtype=np.uint8,
)


def class_color(label: int) -> tuple[int, int, int]:
    r, g, b = _PALETTE[int(label) % len(_PALETTE)]
    return int(r), int(g), int(b)


def draw_boxes(
    image: np.ndarray,
    boxes_xyxy_pixels: np.ndarray,
    labels: np.ndarray,
    class_names: list[str],
    scores: np.ndarray | None = None,
) -> np.ndarray:
    """Draw boxes with their class names (and scores) on a copy of the image.

    image: (H, W, 3) uint8 RGB; boxes_xyxy_pixels: (N, 4) xyxy pixels of this image;
    labels: (N,) int in [0, C); scores: (N,) in [0, 1] or None. Returns (H, W, 3) uint8 RGB.
    A label outside class_names is drawn as its number, so a bad label is visible, not fatal.
    """
    out = np.ascontiguousarray(image, dtype=np.uint8).copy()
    boxes = np.asarray(boxes_xyxy_pixels, dtype=np.float64).reshape(-1, 4)
    labels = np.asarray(labels).reshape(-1)
    height, width = out.shape[:2]
    # Line and text sizes follow the image size so that a 2000 px photo and a 300 px
    # network input both get readable labels.
    thick = max(1, round(max(height, width) / 320))
    font_scale = max(0.35, max(height, width) / 900)
    for k in range(len(boxes)):
        x1, y1, x2, y2 = (int(round(v)) for v in boxes[k])
        label = int(labels[k])
        color = class_color(label)
        cv2.rectangle(out, (x1, y1), (x2, y2), color, thick)  # crisp edges: exact class colour
        text = class_names[label] if 0 <= label < len(class_names) else f"class {label}"
        if scores is not None:
            text = f"{text} {float(scores[k]):.2f}"
        (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font_scale, max(1, thick // 2))
        # Label above the box, or inside it when the box touches the top edge.
        ty = y1 - 2 if y1 - th - base - 2 >= 0 else y1 + th + base + 2
        tx = min(max(x1, 0), max(width - tw, 0))
        cv2.rectangle(out, (tx, ty - th - base), (tx + tw, ty + base // 2), color, -1)
        luminance = 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2]
        ink = (0, 0, 0) if luminance > 150 else (255, 255, 255)
        cv2.putText(out, text, (tx, ty - base // 2), cv2.FONT_HERSHEY_SIMPLEX, font_scale, ink,
                    max(1, thick // 2), lineType=cv2.LINE_AA)
    return out


def _read(rec: ImageRecord, log: ProblemLog) -> np.ndarray | None:
    """Decode one record's image, logging (skip mode) instead of raising."""
    if rec.image is not None:
        image = rec.image
        where: str | Path = f"image {rec.image_id!r} (in memory)"
    elif rec.path is None:
        log.error(f"image {rec.image_id!r}", "missing_image", "record has neither a path nor an in-memory image")
        return None
    else:
        where = rec.path
        try:
            image = read_record_file(rec)  # an image, or a frame of a video
        except DataError as exc:
            kind = "missing_image" if not Path(rec.path).exists() else "corrupt_image"
            log.error(rec.path, kind, str(exc).removeprefix(f"{rec.path}: "))
            return None
    if image.shape[:2] != (rec.height, rec.width):
        log.error(where, "size_mismatch", f"image is {image.shape[1]}x{image.shape[0]} but the record says "
                  f"{rec.width}x{rec.height}; its boxes may be in another frame")
        return None
    return image


# Notes worth seeing on a drawn sample: the frame chosen for an EXIF-rotated image's boxes,
# a converted or misnamed image. Short tags for the tile captions.
_TAGGED_KINDS = {"exif_orientation", "format_mismatch", "image_converted", "size_mismatch", "size_zero"}


def _tags(spec: DatasetSpec) -> dict[str, str]:
    """Image file -> a short caption of its notes (``_TAGGED_KINDS``)."""
    tags: dict[str, list[str]] = {}
    for p in spec.problems:
        if p.kind not in _TAGGED_KINDS:
            continue
        if p.kind == "exif_orientation" and p.action == "rotated":
            tag = "EXIF: boxes rotated from stored frame"
        elif p.kind == "exif_orientation":
            tag = "EXIF tag invalid, ignored" if "not a valid value" in p.message else "EXIF: boxes as shown"
        else:
            tag = p.kind.replace("_", " ")
        tags.setdefault(p.file, []).append(tag)
    return {f: "; ".join(dict.fromkeys(t)) for f, t in tags.items()}


def _sample(spec: DatasetSpec, num_samples: int, tags: dict[str, str]) -> list[int]:
    """Record indices to draw: the tagged images first (up to half the grid; boxes rotated
    from the stored frame before any other, so a person sees the frame chosen), then evenly
    spaced ones."""
    n = len(spec.records)
    if not n or num_samples <= 0:
        return []
    tagged = [i for i, r in enumerate(spec.records) if str(r.path) in tags]
    tagged.sort(key=lambda i: "rotated" not in tags[str(spec.records[i].path)])  # stable: file order otherwise
    tagged = tagged[: max(1, num_samples // 2)]
    even = np.linspace(0, n - 1, min(num_samples, n)).round().astype(int).tolist()
    chosen = list(dict.fromkeys(tagged + even))[:num_samples]
    return sorted(chosen)


def _tile(image: np.ndarray, rec: ImageRecord, class_names: list[str], tag: str = "") -> np.ndarray:
    """One grid cell: the image fitted into TILE x TILE (aspect kept), boxes and a caption
    (and, in amber over the image's top, the tag of its notes)."""
    h, w = image.shape[:2]
    scale = TILE / max(h, w)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    small = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_AREA)
    small = draw_boxes(small, rec.boxes * scale, rec.labels, class_names)
    cell = np.full((TILE + 18, TILE, 3), 40, dtype=np.uint8)
    top, left = (TILE - nh) // 2, (TILE - nw) // 2
    cell[top:top + nh, left:left + nw] = small
    caption = f"{rec.path.name if rec.path is not None else rec.image_id}  {w}x{h}  {len(rec.boxes)} boxes"
    cv2.putText(cell, caption, (4, TILE + 13), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (230, 230, 230), 1, cv2.LINE_AA)
    if tag:
        cv2.rectangle(cell, (0, 0), (TILE - 1, 16), (255, 191, 0), -1)
        cv2.putText(cell, tag[:60], (4, 12), cv2.FONT_HERSHEY_SIMPLEX, 0.38, (0, 0, 0), 1, cv2.LINE_AA)
    return cell


def _grid(tiles: list[np.ndarray]) -> np.ndarray:
    cols = int(np.ceil(np.sqrt(len(tiles))))
    rows = int(np.ceil(len(tiles) / cols))
    th, tw = tiles[0].shape[:2]
    grid = np.full((rows * th, cols * tw, 3), 20, dtype=np.uint8)
    for k, t in enumerate(tiles):
        r, c = divmod(k, cols)
        grid[r * th:(r + 1) * th, c * tw:(c + 1) * tw] = t
    return grid


def _statistics(spec: DatasetSpec) -> list[str]:
    """The counting part of the report (no image decode)."""
    records = spec.records
    names = spec.class_names
    num_classes = len(names)
    counts = np.array([len(r.labels) for r in records], dtype=np.int64)
    labels = np.concatenate([r.labels for r in records]) if records else np.zeros(0, dtype=np.int64)
    boxes = np.concatenate([r.boxes for r in records]) if records else np.zeros((0, 4), dtype=np.float32)
    difficult = np.concatenate([r.difficult for r in records]) if records else np.zeros(0, dtype=bool)
    image_of = np.repeat(np.arange(len(records)), counts)  # (total boxes,) record index of each box

    lines = [f"images: {len(records)}", f"boxes: {len(labels)} ({int(difficult.sum())} difficult/crowd)",
             f"background images (no boxes): {int((counts == 0).sum())}"]
    if records:
        ws = np.array([r.width for r in records])
        hs = np.array([r.height for r in records])
        lines.append(f"image sizes: width {ws.min()}..{ws.max()}, height {hs.min()}..{hs.max()}")
        lines.append(f"boxes per image: mean {counts.mean():.2f}, max {counts.max()}")

    in_range = (labels >= 0) & (labels < num_classes)
    per_class = np.bincount(labels[in_range], minlength=num_classes)
    difficult_per_class = np.bincount(labels[in_range & difficult], minlength=num_classes)
    # Images holding each class: unique (image, class) pairs.
    pairs = np.unique(image_of[in_range] * max(num_classes, 1) + labels[in_range])
    images_per_class = np.bincount(pairs % max(num_classes, 1), minlength=num_classes)
    width = max([len(n) for n in names] + [5])
    lines.append(f"boxes per class ({num_classes} classes, {int((per_class > 0).sum())} used):")
    lines.append(f"  {'class':<{width}}  {'boxes':>7}  {'images':>7}  {'difficult':>9}")
    for k, name in enumerate(names):
        lines.append(f"  {name:<{width}}  {per_class[k]:>7}  {images_per_class[k]:>7}  {difficult_per_class[k]:>9}")
    if (~in_range).any():
        lines.append(f"  labels outside [0, {num_classes}): {int((~in_range).sum())}")

    area = (boxes[:, 2] - boxes[:, 0]).clip(min=0) * (boxes[:, 3] - boxes[:, 1]).clip(min=0)
    small = int((area < SMALL_AREA).sum())
    medium = int(((area >= SMALL_AREA) & (area < MEDIUM_AREA)).sum())
    large = int((area >= MEDIUM_AREA).sum())
    total = max(len(area), 1)
    lines.append(
        "box sizes (COCO, box area in pixels): "
        f"small (< 32^2) {small} ({100 * small / total:.1f}%), "
        f"medium (< 96^2) {medium} ({100 * medium / total:.1f}%), "
        f"large {large} ({100 * large / total:.1f}%)"
    )
    tiny = int((((boxes[:, 2] - boxes[:, 0]) < 2) | ((boxes[:, 3] - boxes[:, 1]) < 2)).sum())
    lines.append(f"tiny boxes (width or height < 2 px): {tiny}")
    return lines


def _check_records(spec: DatasetSpec, log: ProblemLog) -> None:
    """Invariants a reader guarantees, checked again for records from anywhere else."""
    for rec in spec.records:
        where = rec.path if rec.path is not None else f"image {rec.image_id!r}"
        bad_label = (rec.labels < 0) | (rec.labels >= len(spec.class_names))
        if bad_label.any():
            log.error(where, "unknown_class", f"labels {sorted(set(rec.labels[bad_label].tolist()))} are "
                      f"outside [0, {len(spec.class_names)}) (known classes: {', '.join(spec.class_names)})")
        b = rec.boxes
        bad_box = ((b[:, 2] <= b[:, 0]) | (b[:, 3] <= b[:, 1]) | (b[:, :2] < 0).any(axis=1)
                   | (b[:, 2] > rec.width) | (b[:, 3] > rec.height) | ~np.isfinite(b).all(axis=1))
        if bad_box.any():
            log.error(where, "box_degenerate", f"{int(bad_box.sum())} boxes are empty or outside the "
                      f"{rec.width}x{rec.height} image, e.g. {b[bad_box][0].tolist()}")


def check_dataset(
    spec: DatasetSpec,
    out_png: Path | None,
    *,
    num_samples: int = 16,
    read_images: bool = True,
) -> tuple[str, int]:
    """Report on a dataset and draw samples; returns (report text, exit status 0 or 1).

    read_images: decode every image once (finds truncated or resized files); False reads
    only the sampled images. out_png: where to write the sample grid (None: no picture).
    """
    log = ProblemLog("skip")
    _check_records(spec, log)
    n = len(spec.records)
    tags = _tags(spec)
    sample = _sample(spec, num_samples, tags) if out_png is not None else []
    sampled: dict[int, np.ndarray] = {}
    to_read = range(n) if read_images else sample
    wanted = set(sample)
    for i in to_read:
        image = _read(spec.records[i], log)
        if image is not None and i in wanted:
            sampled[i] = image

    lines = _statistics(spec)
    problems = ProblemLog("skip")
    problems.extend(list(spec.problems) + list(log))
    if not read_images:
        lines.append("images not decoded (read_images=False): only the sampled ones were read")
    lines.append(problems.summary(per_kind=None))
    if out_png is not None:
        tiles = [_tile(sampled[i], spec.records[i], spec.class_names, tags.get(str(spec.records[i].path), ""))
                 for i in sample if i in sampled]
        if tiles:
            out_png = Path(out_png)
            out_png.parent.mkdir(parents=True, exist_ok=True)
            grid = _grid(tiles)
            if not cv2.imwrite(str(out_png), cv2.cvtColor(grid, cv2.COLOR_RGB2BGR)):
                raise DataError(f"{out_png}: could not write the sample grid (unwritable folder or not a .png name)")
            lines.append(f"samples: {len(tiles)} images drawn to {out_png}")
        else:
            lines.append("samples: no readable image to draw")
    status = 1 if problems.errors else 0
    lines.append("status: " + ("FAILED (errors above)" if status else "OK"))
    return "\n".join(lines), status


def draw_augmented(
    spec: DatasetSpec,
    transform,
    count: int,
    out_png: Path,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    seed: int = 0,
) -> Path:
    """Draw ``count`` training samples as the model sees them (after augmentation)."""
    from onestage.data.base import DetectionDataset, seed_sample
    from onestage.data.transforms import denormalize

    if not spec.records:
        raise DataError("augmented samples: the dataset has no images")
    dataset = DetectionDataset(spec.records, spec.class_names, transform)
    tiles = []
    for k in range(count):
        index = k % len(dataset)
        seed_sample(seed, k // len(dataset), index)  # a different draw each time an image recurs
        sample = dataset[index]
        image = denormalize(sample["image"], mean, std)
        size = image.shape[0]
        boxes = sample["boxes"].numpy() * size
        drawn = draw_boxes(image, boxes, sample["labels"].numpy(), spec.class_names)
        scale = TILE / size
        cell = np.full((TILE + 18, TILE, 3), 40, dtype=np.uint8)
        cell[:TILE, :TILE] = cv2.resize(drawn, (TILE, TILE), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
        cv2.putText(cell, f"#{index}  {len(boxes)} boxes", (4, TILE + 13), cv2.FONT_HERSHEY_SIMPLEX, 0.4,
                    (230, 230, 230), 1, cv2.LINE_AA)
        tiles.append(cell)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(out_png), cv2.cvtColor(_grid(tiles), cv2.COLOR_RGB2BGR)):
        raise DataError(f"{out_png}: could not write the augmented samples")
    return out_png
