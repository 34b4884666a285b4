"""MOTChallenge-style video datasets (``data.*.format: mot``): one record per frame.

``root`` is one sequence or a folder of sequences. A sequence is a folder holding
``gt/gt.txt`` and its frames: either one video file (``.mp4``, ``.mkv``, ``.avi``, ``.mov``,
``.webm``, ``.m4v``; decoded with PyAV) or MOT17's ``img1/`` folder of numbered images
(``000001.jpg`` is frame 1). ``onestage data make-video`` writes this layout.

``gt.txt`` lines: ``frame, id, x, y, w, h[, conf[, class[, visibility]]]``, MOTChallenge
conventions: frames and classes count from 1, ``(x, y)`` is the top-left corner in 1-based
pixels, ``conf`` 0 marks an entry to ignore (read as ``difficult``: neither counted nor
penalized), a missing class is 1. Class names: ``data.class_names`` (or the train split's),
else ``classes.txt`` in the root (line k names class id k); when both exist, ids are mapped
through ``classes.txt`` by name.

Records (``data/base.py``): ``boxes`` (N, 4) float32 xyxy 0-based pixels of the frame,
``labels`` (N,), ``difficult``, ``track_ids`` (N,), ``frame_index`` (0-based), ``video`` (the
sequence name), ``path`` the video file (or the frame's image), ``image_id`` ``"name/000001"``.

Bad input raises ``DataError`` naming the file (and the line of ``gt.txt``): an unreadable,
corrupt or truncated video (fewer frames stored than its header announces), a frame number
outside the video, a negative width or height, an unknown class id, a malformed line. With
``on_error: skip`` a bad line is left out and a bad sequence is skipped.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from onestage.data.record import ImageRecord
from onestage.data.io import image_size
from onestage.data.problems import DataError, DatasetSpec, OnError, ProblemLog, fix_boxes
from onestage.video import VIDEO_SUFFIXES, count_frames, probe_video, read_video_frames

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


def find_sequences(root: Path) -> list[Path]:
    """The sequence folders under ``root`` (``root`` itself when it is one), sorted by name."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: MOT dataset folder not found")
    if (root / "gt" / "gt.txt").is_file():
        return [root]
    seqs = sorted(p for p in root.iterdir() if (p / "gt" / "gt.txt").is_file())
    if not seqs:
        raise DataError(f"{root}: no sequence found (a folder holding gt/gt.txt and a video file or img1/)")
    return seqs


def _class_names(root: Path, given: Sequence[str] | None) -> tuple[list[str], dict[int, int]]:
    """(class names, MOT class id -> label index)."""
    listed = None
    for folder in (root, root.parent):
        f = folder / "classes.txt"
        if f.is_file():
            listed = [line.strip() for line in f.read_text().splitlines() if line.strip()]
            break
    if given is None and listed is None:
        raise DataError(f"{root}: no class names; set data.class_names or write a classes.txt (line k names class k)")
    names = list(given) if given is not None else list(listed)
    if listed is None:
        return names, {k + 1: k for k in range(len(names))}
    return names, {k + 1: names.index(n) for k, n in enumerate(listed) if n in names}


def _frames_source(seq: Path, log: ProblemLog) -> tuple[str, Path | list[Path], int, int, int] | None:
    """("video", file, frames, width, height) or ("images", files, ...); None when skipped."""
    videos = sorted(p for p in seq.iterdir() if p.is_file() and p.suffix.lower() in VIDEO_SUFFIXES)
    if len(videos) > 1:
        log.error(seq, "bad_annotation", f"{len(videos)} video files; a sequence holds one")
        return None
    if videos:
        video = videos[0]
        try:
            info = probe_video(video)
            stored = count_frames(video)
        except DataError as exc:
            log.error(video, "corrupt_image", str(exc).removeprefix(f"{video}: "))
            return None
        if stored == 0 or (info.num_frames and stored < info.num_frames):
            log.error(video, "corrupt_image", f"truncated video: the header announces {info.num_frames} frames, "
                      f"{stored} are stored")
            return None
        # a container whose packets outnumber its header's frame count: trust the header
        return "video", video, min(stored, info.num_frames) if info.num_frames else stored, info.width, info.height
    img_dir = seq / "img1"
    files = sorted(p for p in img_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if img_dir.is_dir() else []
    if not files:
        log.error(seq, "missing_image", "no video file and no images in img1/")
        return None
    if all(p.stem.isdigit() for p in files):
        numbers = [int(p.stem) for p in files]
        if numbers != list(range(1, len(files) + 1)):
            log.error(img_dir, "missing_image", f"frame images are not numbered 1..{len(files)} without gaps")
            return None
    width, height = image_size(files[0])
    return "images", files, len(files), width, height


_NUMBER = re.compile(r"^\s*-?\d+(\.\d*)?([eE][-+]?\d+)?\s*$")


def _parse_gt(gt: Path, num_frames: int, id_to_label: dict[int, int], log: ProblemLog) -> np.ndarray:
    """(L, 8) float64 rows frame(0-based), id, x1, y1, x2, y2 (0-based pixels), label, difficult."""
    rows = []
    for lineno, line in enumerate(gt.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{gt}:{lineno}"
        fields = [f for f in re.split(r"[,\s]+", line.strip()) if f]
        if len(fields) < 6 or not all(_NUMBER.match(f) for f in fields):
            log.error(where, "bad_annotation", f"expected 'frame, id, x, y, w, h[, conf, class, visibility]' "
                      f"numbers, got {line.strip()!r}")
            continue
        v = [float(f) for f in fields] + [1.0, 1.0, 1.0][: max(0, 9 - len(fields))]
        frame, tid, x, y, w, h, conf, cls = int(v[0]), int(v[1]), v[2], v[3], v[4], v[5], v[6], int(v[7])
        if not 1 <= frame <= num_frames:
            log.error(where, "bad_annotation", f"frame {frame} is outside the video's frames 1..{num_frames}")
            continue
        if w < 0 or h < 0:
            log.error(where, "bad_annotation", f"negative size {w:g}x{h:g}")
            continue
        if cls not in id_to_label:
            known = ", ".join(str(k) for k in sorted(id_to_label))
            log.error(where, "unknown_class", f"class id {cls} is not one of the known ids {known}")
            continue
        rows.append((frame - 1, tid, x - 1, y - 1, x - 1 + w, y - 1 + h, id_to_label[cls], conf == 0))
    return np.asarray(rows, np.float64).reshape(-1, 8)


def _sequence_records(seq: Path, id_to_label: dict[int, int], log: ProblemLog) -> list[ImageRecord]:
    source = _frames_source(seq, log)
    if source is None:
        return []
    kind, files, num_frames, width, height = source
    gt = seq / "gt" / "gt.txt"
    rows = _parse_gt(gt, num_frames, id_to_label, log)
    order = np.argsort(rows[:, 0], kind="stable")
    rows = rows[order]
    starts = np.searchsorted(rows[:, 0], np.arange(num_frames + 1))  # rows of frame t: starts[t]:starts[t+1]
    records = []
    for t in range(num_frames):
        r = rows[starts[t]: starts[t + 1]]
        boxes, keep = fix_boxes(r[:, 2:6], width, height, f"{gt} (frame {t + 1})", log)
        r = r[keep]
        records.append(ImageRecord(
            image_id=f"{seq.name}/{t + 1:06d}", width=width, height=height, boxes=boxes,
            labels=r[:, 6].astype(np.int64), difficult=r[:, 7].astype(bool),
            path=files if kind == "video" else files[t],  # type: ignore[index]
            track_ids=r[:, 1].astype(np.int64), frame_index=t, video=seq.name,
        ))
    return records


def read_mot(root: str | Path, class_names: Sequence[str] | None = None, on_error: OnError = "raise") -> DatasetSpec:
    """Read every sequence under ``root`` (module docstring); one record per frame."""
    root = Path(root)
    log = ProblemLog(on_error)
    seqs = find_sequences(root)
    names, id_to_label = _class_names(root, class_names)
    records = [rec for seq in seqs for rec in _sequence_records(seq, id_to_label, log)]
    return DatasetSpec(records, names, log)


# ----------------------------------------------------------------------------- frame access
class _SequentialReader:
    """An open video positioned at ``next_index``: reading in order decodes each frame once."""

    def __init__(self, path: Path):
        self.path = path
        self.frames: Iterator[np.ndarray] = read_video_frames(path)[0]
        self.next_index = 0
        self.last: np.ndarray | None = None

    def read(self, index: int) -> np.ndarray:
        if index == self.next_index - 1 and self.last is not None:
            return self.last
        while self.next_index <= index:
            try:
                frame = next(self.frames)
            except StopIteration:
                raise DataError(f"{self.path}: frame {index} requested, the video ends after {self.next_index} frames "
                                f"(truncated or corrupt file)") from None
            self.next_index += 1
        self.last = frame
        return frame

    def close(self) -> None:
        close = getattr(self.frames, "close", None)
        if close is not None:
            close()


_READERS: OrderedDict[Path, _SequentialReader] = OrderedDict()
_MAX_OPEN = 4


def load_video_frame(path: str | Path, index: int) -> np.ndarray:
    """Frame ``index`` (0-based) of a video as (H, W, 3) uint8 RGB.

    Evaluation reads frames in order: one open decoder per video (at most ``_MAX_OPEN``)
    moves forward, decoding each frame once. A backward request reopens the file and
    decodes from the start (correct, but slow for random access: train on images).
    """
    path = Path(path)
    reader = _READERS.get(path)
    if reader is None or index < reader.next_index - 1:
        if reader is not None:
            reader.close()
        reader = _SequentialReader(path)
        _READERS[path] = reader
        while len(_READERS) > _MAX_OPEN:
            _READERS.popitem(last=False)[1].close()
    _READERS.move_to_end(path)
    return reader.read(index)
