"""Video files in and out (PyAV, FFmpeg underneath), and a detector run over a video.

- ``probe_video`` / ``read_video_frames``: frames as (H, W, 3) uint8 RGB, in order, with the
  rate and size; anything unreadable raises ``DataError`` naming the file (and the frame).
- ``write_video``: RGB frames to an H.264 ``.mp4`` (4:2:0 for even sizes, 4:4:4 for odd ones,
  which 4:2:0 cannot hold), at the given rate.
- ``predict_video``: any ``predict_fn(list of RGB frames) -> list of predictions`` (each with
  ``boxes`` (K, 4) xyxy pixels of the frame, ``scores`` (K,), ``labels`` (K,): what
  ``onestage.api.LoadedDetector.predict`` returns) over a video, in batches, writing the
  annotated video (same frame count, rate and size) and a per-frame detections JSON.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from fractions import Fraction
from itertools import chain
from pathlib import Path
from typing import Callable, Iterable, Iterator, Protocol, Sequence

import numpy as np

from onestage.data.problems import DataError

VIDEO_SUFFIXES: frozenset[str] = frozenset({".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm"})


def is_video_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


@dataclass(frozen=True)
class VideoInfo:
    path: Path
    width: int
    height: int
    fps: float  # average frame rate; 0 when the container does not say
    num_frames: int  # from the header; 0 when the container does not say (see count_frames)


def _av():
    import av

    return av


def _open(path: Path):
    av = _av()
    if not path.is_file():
        raise DataError(f"{path}: video file not found" if not path.exists() else f"{path}: not a file")
    try:
        container = av.open(str(path))
    except av.FFmpegError as exc:
        raise DataError(f"{path}: not a readable video (corrupt or truncated file, or unknown format): {exc}") from exc
    if not container.streams.video:
        container.close()
        raise DataError(f"{path}: the file holds no video stream")
    return container


def probe_video(path: str | Path) -> VideoInfo:
    """Size, rate and header frame count, without decoding a frame."""
    path = Path(path)
    with _open(path) as container:
        return _info(path, container.streams.video[0])


def _info(path: Path, stream) -> VideoInfo:
    rate = stream.average_rate or stream.guessed_rate
    return VideoInfo(path, int(stream.width), int(stream.height), float(rate) if rate else 0.0, int(stream.frames or 0))


def count_frames(path: str | Path) -> int:
    """Frames actually stored: the video packets, counted by demuxing (no decoding).

    A truncated file whose header still announces every frame holds fewer packets.
    """
    path = Path(path)
    av = _av()
    with _open(path) as container:
        try:
            return sum(1 for p in container.demux(video=0) if p.size > 0)
        except av.FFmpegError as exc:
            raise DataError(f"{path}: corrupt video data: {exc}") from exc


def read_video_frames(path: str | Path) -> tuple[Iterator[np.ndarray], VideoInfo]:
    """(iterator over the frames as (H, W, 3) uint8 RGB, info). The file stays open until the
    iterator is exhausted or closed. A decoding failure raises ``DataError`` with the frame."""
    path = Path(path)
    container = _open(path)
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"  # frame + slice threads: decoding keeps up with the model
    return _frames(path, container, stream), _info(path, stream)


def _frames(path: Path, container, stream) -> Iterator[np.ndarray]:
    av = _av()
    index = 0
    try:
        decoder = container.decode(stream)
        while True:
            try:
                frame = next(decoder)
            except StopIteration:
                return
            except av.FFmpegError as exc:
                raise DataError(f"{path}: corrupt video data at frame {index}: {exc}") from exc
            yield frame.to_ndarray(format="rgb24")
            index += 1
    finally:
        container.close()


def write_video(
    path: str | Path, frames: Iterable[np.ndarray], fps: float, crf: int = 18, preset: str = "veryfast"
) -> int:
    """Write RGB frames (H, W, 3) uint8, all of one size, as H.264 ``.mp4``; returns the count.

    ``crf`` 18 is visually lossless; x264's ``veryfast`` preset encodes several times faster
    than its default (``medium``) for a somewhat larger file: encoding stays cheap next to
    the detector when ``predict_video`` writes its annotated copy."""
    av = _av()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rate = Fraction(fps).limit_denominator(1001) if fps > 0 else Fraction(25)
    frames = iter(frames)
    first = next(frames, None)
    if first is None:
        raise ValueError(f"{path}: no frames to write")
    height, width = np.shape(first)[:2]
    count = 0
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=rate)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p" if width % 2 == 0 and height % 2 == 0 else "yuv444p"  # 4:2:0 needs even sides
        stream.options = {"crf": str(crf), "preset": preset}
        for image in chain([first], frames):
            image = np.ascontiguousarray(image, dtype=np.uint8)
            if image.shape != (height, width, 3):
                raise ValueError(f"{path}: frame {count} has shape {image.shape}, the video is ({height}, {width}, 3)")
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                out.mux(packet)
            count += 1
        for packet in stream.encode():  # flush the encoder's delayed frames
            out.mux(packet)
    return count


# ----------------------------------------------------------------------------- prediction
class PredictionLike(Protocol):
    boxes: np.ndarray  # (K, 4) xyxy pixels of the frame
    scores: np.ndarray  # (K,)
    labels: np.ndarray  # (K,) in [0, C)


PredictFn = Callable[[list[np.ndarray]], Sequence[PredictionLike]]


def _batches(frames: Iterator[np.ndarray], size: int) -> Iterator[list[np.ndarray]]:
    batch: list[np.ndarray] = []
    for frame in frames:
        batch.append(frame)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def detections_json(pred: PredictionLike, class_names: Sequence[str], keep: np.ndarray) -> list[dict]:
    """One frame's kept detections in the format of ``onestage predict``'s detections.json."""
    return [
        {"box_xyxy": [round(float(v), 2) for v in b], "score": round(float(s), 4), "label": int(c),
         "class": class_names[int(c)] if 0 <= int(c) < len(class_names) else str(int(c))}
        for b, s, c in zip(np.asarray(pred.boxes)[keep], np.asarray(pred.scores)[keep], np.asarray(pred.labels)[keep])
    ]


def predict_video(
    predict_fn: PredictFn,
    class_names: Sequence[str],
    path: str | Path,
    out_dir: str | Path,
    batch_size: int = 16,
    threshold: float = 0.0,
    progress: bool = True,
) -> dict:
    """Run ``predict_fn`` over every frame of ``path`` in batches; write to ``out_dir``
    ``<stem>.annotated.mp4`` (boxes with score >= ``threshold`` drawn; same frame count, rate
    and size) and ``<stem>.detections.json``. Returns a summary (paths, frames, frames/s)."""
    import time

    from tqdm import tqdm

    from onestage.data.check import draw_boxes

    if batch_size < 1:
        raise ValueError(f"predict_video: batch_size must be >= 1, got {batch_size}")
    path, out_dir = Path(path), Path(out_dir)
    frames, info = read_video_frames(path)
    out_video = out_dir / f"{path.stem}.annotated.mp4"
    out_json = out_dir / f"{path.stem}.detections.json"
    per_frame: list[dict] = []
    bar = tqdm(total=info.num_frames or None, desc=path.name, unit="frame", disable=not progress, dynamic_ncols=True)
    start = time.perf_counter()

    def annotated() -> Iterator[np.ndarray]:
        for batch in _batches(frames, batch_size):
            preds = predict_fn(batch)
            if len(preds) != len(batch):
                raise ValueError(f"predict_video: predict_fn returned {len(preds)} predictions for {len(batch)} frames")
            for image, pred in zip(batch, preds):
                keep = np.asarray(pred.scores) >= threshold
                per_frame.append({"frame": len(per_frame), "detections": detections_json(pred, class_names, keep)})
                yield draw_boxes(image, np.asarray(pred.boxes)[keep], np.asarray(pred.labels)[keep],
                                 list(class_names), np.asarray(pred.scores)[keep])
            bar.update(len(batch))

    try:
        written = write_video(out_video, annotated(), info.fps)
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    out_json.write_text(json.dumps({
        "video": str(path), "width": info.width, "height": info.height, "fps": info.fps,
        "num_frames": written, "threshold": threshold, "frames": per_frame,
    }))
    return {"video": out_video, "json": out_json, "frames": written,
            "frames_per_second": written / seconds if seconds > 0 else float("inf")}
