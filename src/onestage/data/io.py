"""Reading images the way a user sees them, and joining untrusted paths safely.

Contract: ``load_image`` returns (H, W, 3) uint8 RGB in the frame an image viewer shows,
i.e. after the EXIF orientation tag is applied; annotation boxes (``ImageRecord.boxes``)
live in that same frame, and ``image_size`` returns its (width, height) without decoding
the pixels.

Real data holds every PIL mode (grayscale, palette, RGBA, 16-bit, CMYK), files whose
extension lies about their format, truncated downloads and paths written by other tools;
each of these is handled here, and whatever cannot be read raises ``DataError`` naming the
file and the problem.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from onestage.data.record import ImageRecord
from onestage.data.problems import DataError, ProblemLog

# EXIF tag 0x0112 (Orientation): values 5-8 rotate by 90 or 270 degrees, swapping W and H
# (EXIF 2.32, section 4.6.5; what PIL.ImageOps.exif_transpose applies).
_EXIF_ORIENTATION = 0x0112
_SWAPS_WH = frozenset({5, 6, 7, 8})

# PIL raises these for unreadable image data: OSError for truncated/corrupt streams,
# SyntaxError from some plugins' header parsers, ValueError for impossible headers,
# DecompressionBombError (a subclass of Exception only) for absurd sizes.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)


def _open(path: Path) -> Image.Image:
    """Open lazily (header only); the format comes from the content, not the extension."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: image file not found" if not path.exists() else f"{path}: not a file")
    try:
        return Image.open(path)
    except UnidentifiedImageError as exc:
        raise DataError(f"{path}: not a readable image (corrupt file or unknown format)") from exc
    except _DECODE_ERRORS as exc:
        raise DataError(f"{path}: corrupt image header: {exc}") from exc


def _orientation(img: Image.Image) -> int | None:
    """The raw EXIF orientation value (None: no tag or an unreadable EXIF block, which
    PIL's exif_transpose also treats as "no rotation"). Values outside 1..8 are returned as
    they are; exif_transpose ignores them, and so does ``image_info``."""
    try:
        value = img.getexif().get(_EXIF_ORIENTATION)
    except _DECODE_ERRORS:
        return None
    return int(value) if isinstance(value, int) else None


@dataclass(frozen=True)
class ImageInfo:
    """What an image's header says (no pixel decode)."""

    width: int  # as a viewer shows it: EXIF orientation applied
    height: int
    stored_width: int  # as stored in the file, before the EXIF orientation
    stored_height: int
    format: str | None  # from the content ("JPEG", "PNG", ...), whatever the extension says
    mode: str  # PIL mode: "RGB", "RGBA", "P", "L", "I;16", "CMYK"...
    orientation: int | None  # raw EXIF orientation tag, None when absent

    @property
    def rotated(self) -> bool:
        """The EXIF orientation swaps width and height (values 5-8)."""
        return self.orientation in _SWAPS_WH


def _to_rgb(img: Image.Image, path: Path) -> np.ndarray:
    """Any PIL mode -> (H, W, 3) uint8 RGB. Alpha is dropped (as cv2.imread does)."""
    mode = img.mode
    if mode == "RGB":
        out = np.asarray(img)
    elif mode.startswith("I;16") or mode == "I":
        # 16-bit grayscale (PNG/TIFF). PIL's convert("L") would clip at 255 instead of
        # scaling; map 0..65535 -> 0..255 with rounding: round(v * 255 / 65535).
        # Mode "I" (32-bit integers) carries no bit depth: values that fit in 8 bits are
        # taken as 8-bit intensities, anything larger as 16-bit.
        v = np.asarray(img).astype(np.int64)
        if mode == "I" and v.max(initial=0) <= 255:
            gray = np.clip(v, 0, 255).astype(np.uint8)
        else:
            gray = ((np.clip(v, 0, 65535) * 255 + 32767) // 65535).astype(np.uint8)
        out = np.repeat(gray[..., None], 3, axis=2)
    elif mode == "F":
        # 32-bit float grayscale: values in [0, 1] are intensities, anything larger is 0..255.
        v = np.asarray(img, dtype=np.float32)
        scale = 255.0 if np.nanmax(v, initial=0.0) <= 1.0 else 1.0
        gray = np.clip(np.nan_to_num(v) * scale + 0.5, 0, 255).astype(np.uint8)
        out = np.repeat(gray[..., None], 3, axis=2)
    elif mode == "P" and "transparency" in img.info:
        # Palette with a transparent index: PIL warns unless it goes through RGBA.
        out = np.asarray(img.convert("RGBA").convert("RGB"))
    else:
        # L, LA, 1, P, PA, RGBA, RGBX, CMYK, YCbCr, LAB, HSV: PIL's own conversions are exact.
        out = np.asarray(img.convert("RGB"))
    if out.ndim != 3 or out.shape[2] != 3:
        raise DataError(f"{path}: image mode {mode} gave an array of shape {out.shape}, expected (H, W, 3)")
    return np.ascontiguousarray(out, dtype=np.uint8)


def load_image(path: Path) -> np.ndarray:
    """Read an image file as (H, W, 3) uint8 RGB, EXIF orientation applied.

    Raises ``DataError`` naming the file for a missing, truncated or corrupt file.
    """
    path = Path(path)
    img = _open(path)
    try:
        with img:
            img.load()  # full decode here, so that a truncated file fails now, named
            upright = ImageOps.exif_transpose(img)
            return _to_rgb(upright, path)
    except DataError:
        raise
    except _DECODE_ERRORS as exc:
        raise DataError(f"{path}: corrupt image ({img.format or 'unknown'} data): {exc}") from exc


def image_info(path: Path) -> ImageInfo:
    """The header of an image file (``ImageInfo``); raises ``DataError`` naming the file."""
    path = Path(path)
    img = _open(path)
    with img:
        stored_w, stored_h = img.size
        orientation = _orientation(img)
        fmt, mode = img.format, img.mode
    if stored_w <= 0 or stored_h <= 0:
        raise DataError(f"{path}: image header gives an empty size {stored_w}x{stored_h}")
    width, height = (stored_h, stored_w) if orientation in _SWAPS_WH else (stored_w, stored_h)
    return ImageInfo(int(width), int(height), int(stored_w), int(stored_h), fmt, mode, orientation)


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) after EXIF orientation, from the header only (no pixel decode)."""
    info = image_info(path)
    return info.width, info.height


# Formats each extension promises (PIL format names).
_EXTENSION_FORMATS = {
    ".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP", ".tif": "TIFF", ".tiff": "TIFF",
    ".webp": "WEBP", ".gif": "GIF",
}
_MODE_NAMES = {
    "RGBA": "RGBA (alpha dropped)", "P": "palette (P)", "PA": "palette with alpha (PA, alpha dropped)",
    "L": "8-bit grayscale (L)", "LA": "grayscale with alpha (LA, alpha dropped)", "1": "1-bit (1)",
    "I;16": "16-bit grayscale (I;16, scaled to 8 bits)", "I;16B": "16-bit grayscale (I;16B, scaled to 8 bits)",
    "I": "32-bit integer (I)", "F": "32-bit float (F)", "CMYK": "CMYK",
}
# Above this many pixels, decoding the file each epoch costs more than most models' step
# on its image (a 16 MP JPEG takes about 0.1-0.2 s to decode on one core).
LARGE_IMAGE_PIXELS = 16_000_000


def note_image_quirks(info: ImageInfo, path: Path, log: ProblemLog) -> None:
    """Record, as notes that never fail, the quirks of an image that reading handles
    (``problems.py``): a lying extension, a mode converted to RGB, an invalid EXIF
    orientation, a very large image. EXIF rotations are noted by the readers, which know
    the frame their boxes were taken in."""
    expected = _EXTENSION_FORMATS.get(Path(path).suffix.lower())
    if expected is not None and info.format is not None and info.format != expected:
        log.fix(path, "format_mismatch", f"the extension {Path(path).suffix} promises {expected} but the file "
                f"holds {info.format} data; read as {info.format}", "kept")
    if info.mode != "RGB":
        log.fix(path, "image_converted", f"{_MODE_NAMES.get(info.mode, info.mode)} image; converted to 8-bit RGB",
                "converted")
    if info.orientation is not None and not 1 <= info.orientation <= 8:
        log.fix(path, "exif_orientation", f"EXIF orientation {info.orientation} is not a valid value (1-8); "
                "ignored: the image is used as stored", "kept")
    pixels = info.width * info.height
    if pixels > LARGE_IMAGE_PIXELS:
        log.fix(path, "large_image", f"{info.width}x{info.height} ({pixels / 1e6:.0f} MP): decoded again every "
                "epoch; data.cache_images: true decodes it once (or shrink the files)", "kept")


def exif_boxes_to_upright(boxes: np.ndarray, orientation: int, stored_w: float, stored_h: float) -> np.ndarray:
    """Boxes annotated on the stored pixels -> the same boxes in the upright (viewer) frame.

    boxes: (N, 4) xyxy pixels of the stored W x H image; returns (N, 4) xyxy pixels after
    the transform PIL's ``exif_transpose`` applies for ``orientation`` (EXIF 2.32 table 4.6.5:
    2 mirror, 3 rotate 180, 4 flip, 5 transpose, 6 rotate 90 clockwise, 7 transverse,
    8 rotate 90 counter-clockwise); 1 or an invalid value leaves them as they are.
    """
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    x1, y1, x2, y2 = b.T
    w, h = stored_w, stored_h
    # Each corner (x, y) maps to (u, v); the box is the min/max of the mapped corners.
    mapping = {
        2: lambda x, y: (w - x, y),
        3: lambda x, y: (w - x, h - y),
        4: lambda x, y: (x, h - y),
        5: lambda x, y: (y, x),
        6: lambda x, y: (h - y, x),
        7: lambda x, y: (h - y, w - x),
        8: lambda x, y: (y, w - x),
    }.get(int(orientation))
    if mapping is None:
        return b.copy()
    u1, v1 = mapping(x1, y1)
    u2, v2 = mapping(x2, y2)
    return np.stack((np.minimum(u1, u2), np.minimum(v1, v2), np.maximum(u1, u2), np.maximum(v1, v2)), axis=1)


def load_record_image(rec: ImageRecord) -> np.ndarray:
    """The record's pixels: (H, W, 3) uint8 RGB, held in memory or read from ``rec.path``.

    The image must have the size the record was annotated at; otherwise its boxes would
    be drawn or trained in the wrong frame.
    """
    if rec.image is not None:
        return rec.image
    if rec.path is None:
        raise DataError(f"image {rec.image_id!r}: record has neither an in-memory image nor a path")
    image = read_record_file(rec)
    if image.shape[:2] != (rec.height, rec.width):
        raise DataError(
            f"{rec.path}: image is {image.shape[1]}x{image.shape[0]} but its record says "
            f"{rec.width}x{rec.height}; the file changed after the annotations were read"
        )
    return image


def read_record_file(rec: ImageRecord) -> np.ndarray:
    """Decode ``rec.path``: its image, or frame ``rec.frame_index`` of a video file."""
    from onestage.video import is_video_file

    if rec.path is None:
        raise DataError(f"image {rec.image_id!r}: record has no path")
    if rec.frame_index is not None and is_video_file(rec.path):
        from onestage.data.mot import load_video_frame

        return load_video_frame(rec.path, rec.frame_index)
    return load_image(rec.path)


def safe_join(root: Path, relative: str | os.PathLike[str]) -> Path:
    """``root / relative``, refusing any path that leaves ``root``.

    Paths inside annotation files (COCO ``file_name``, a VOC ``filename``, a CSV split,
    an ImageSets id) are untrusted: ``../``, an absolute path, or a symlink pointing out
    of the dataset would otherwise read any file on the machine. Raises ``DataError``.
    """
    root = Path(root)
    rel = os.fspath(relative)
    if not rel or "\x00" in rel:
        raise DataError(f"{root}: invalid path {rel!r} (empty or containing a NUL byte)")
    # Backslashes are separators for a Windows-written annotation; treat them as such so
    # that "..\\x" cannot slip through as one odd file name.
    rel_posix = rel.replace("\\", "/")
    if Path(rel_posix).is_absolute() or (len(rel_posix) > 1 and rel_posix[1] == ":"):
        raise DataError(f"{root}: path {rel!r} is absolute; it must be relative to the dataset root")
    base = root.resolve()
    target = (base / rel_posix).resolve()
    if target != base and base not in target.parents:
        raise DataError(f"{root}: path {rel!r} resolves to {target}, outside the dataset root {base}")
    return target
