"""Synthetic videos of moving shapes with track ids (issue 18), drawn with ``data/shapes.py``.

Each video shows the shapes classes over a cluttered background (the shapes images' own
background, noise redrawn every frame). Objects move at constant velocity plus a small
random acceleration, rotate slowly, change scale slowly, enter through the frame's edges
during the video and leave through them; later objects pass in front of earlier ones
(partial occlusion, any amount), and the whole frame shakes slightly (camera jitter:
the world is seen through a window whose position wobbles by a few pixels).

Ground truth per frame and object, as in the shapes images: the box is tight around the
object's *visible* pixels (pixel ``i`` spans ``[i, i+1)``); ``visibility`` is the fraction
of the whole shape visible (occlusion and the frame edge both hide parts). An object is
annotated in a frame when at least ``MIN_VISIBILITY`` of it shows and its box is at least
``MIN_BOX`` pixels in both sides; otherwise that frame has no entry for it (the track
resumes when it shows again).

Determinism: video ``v`` is drawn from ``numpy.random.default_rng([seed, v])`` only.

Files (``write_moving_shapes``), one folder per video, MOTChallenge style::

    OUT/classes.txt                   one class name per line; class id k is line k (1-based)
    OUT/<name>/<name>.mp4             H.264 video
    OUT/<name>/gt/gt.txt              frame, id, x, y, w, h, conf, class, visibility
    OUT/<name>/seqinfo.ini            name, frame rate, length, size (MOT17's file)

``gt.txt`` follows MOTChallenge: frames and ids start at 1, ``x, y`` is the top-left corner
in 1-based pixel coordinates (the top-left pixel is (1, 1)), conf 1 = an object to evaluate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from onestage.data.shapes import (
    MIN_SIZE_AT_300,
    SHAPE_CLASSES,
    _SYMMETRY_DEG,
    add_noise,
    background,
    contrasting_colour,
    owned_box,
    paint_shape,
    shape_reach,
    shape_window,
)

MIN_VISIBILITY = 0.2
MIN_BOX = 4.0  # pixels
JITTER = 3  # largest camera offset in pixels
SPAWN_P = 0.04  # chance per frame that a new object enters
MAX_ALIVE = 6


@dataclass
class _Object:
    track_id: int  # 1-based
    label: int
    x: float  # world centre (background pixels)
    y: float
    vx: float
    vy: float
    extent: float
    growth: float  # log-scale change per frame
    aspect: float
    angle: float
    spin: float  # degrees per frame
    colour: np.ndarray = field(repr=False)
    entered: bool = False  # has been inside the frame once: leaving the frame ends it


@dataclass
class VideoTruth:
    """One generated video: frames and per-frame annotations."""

    frames: list[np.ndarray]  # F x (H, W, 3) uint8 RGB
    boxes: list[np.ndarray]  # F x (N_t, 4) float32 xyxy pixels (0-based, continuous)
    labels: list[np.ndarray]  # F x (N_t,) int64
    track_ids: list[np.ndarray]  # F x (N_t,) int64, 1-based
    visibility: list[np.ndarray]  # F x (N_t,) float32


class _World:
    """The objects of one video and how they move."""

    def __init__(self, rng: np.random.Generator, width: int, height: int, kinds: tuple[str, ...]):
        self.rng, self.width, self.height, self.kinds = rng, width, height, kinds
        self.side = max(width, height) + 2 * JITTER  # square background, cropped per frame
        self.min_extent = MIN_SIZE_AT_300 * 1.25 * min(width, height) / 300.0
        self.max_extent = 0.4 * min(width, height)
        self.objects: list[_Object] = []
        self.next_id = 1

    def spawn(self, bg: np.ndarray, inside: bool) -> None:
        rng = self.rng
        label = int(rng.integers(0, len(self.kinds)))
        kind = self.kinds[label]
        extent = float(np.exp(rng.uniform(np.log(self.min_extent), np.log(self.max_extent))))
        aspect = 1.0 if kind == "circle" else float(np.exp(rng.uniform(np.log(0.75), np.log(4 / 3))))
        speed = rng.uniform(0.5, 3.0)
        reach = shape_reach(kind, extent, aspect)
        if inside:  # somewhere in the frame, any direction
            x = rng.uniform(JITTER + reach, JITTER + self.width - reach) if self.width > 2 * reach else self.side / 2
            y = rng.uniform(JITTER + reach, JITTER + self.height - reach) if self.height > 2 * reach else self.side / 2
            heading = rng.uniform(0, 2 * np.pi)
        else:  # just outside one edge, heading inwards (within 60 degrees of the normal)
            edge = int(rng.integers(0, 4))
            normal = [0.0, np.pi, 0.5 * np.pi, 1.5 * np.pi][edge]  # from left, right, top, bottom
            heading = normal + rng.uniform(-np.pi / 3, np.pi / 3)
            x = [JITTER - reach, JITTER + self.width + reach][edge] if edge < 2 else rng.uniform(
                JITTER, JITTER + self.width)
            y = [JITTER - reach, JITTER + self.height + reach][edge - 2] if edge >= 2 else rng.uniform(
                JITTER, JITTER + self.height)
        ix, iy = int(np.clip(x, 0, self.side - 1)), int(np.clip(y, 0, self.side - 1))
        colour = contrasting_colour(rng, bg[iy, ix].astype(np.float32))
        self.objects.append(_Object(
            self.next_id, label, float(x), float(y), speed * np.cos(heading), speed * np.sin(heading), extent,
            float(rng.normal(0, 0.004)), aspect, float(rng.uniform(0, _SYMMETRY_DEG.get(kind, 360.0))),
            float(rng.normal(0, 1.0)), colour, entered=inside,
        ))
        self.next_id += 1

    def step(self) -> None:
        """Move every object one frame; drop those that have left the frame for good."""
        rng = self.rng
        kept = []
        for o in self.objects:
            o.vx += float(rng.normal(0, 0.08))  # small random acceleration
            o.vy += float(rng.normal(0, 0.08))
            o.x, o.y = o.x + o.vx, o.y + o.vy
            o.growth = float(np.clip(o.growth + rng.normal(0, 0.001), -0.01, 0.01))
            o.extent = float(np.clip(o.extent * np.exp(o.growth), self.min_extent, self.max_extent))
            o.angle += o.spin
            reach = shape_reach(self.kinds[o.label], o.extent, o.aspect)
            inside = (JITTER - reach < o.x < JITTER + self.width + reach) and (
                JITTER - reach < o.y < JITTER + self.height + reach)
            o.entered = o.entered or inside
            if inside or not o.entered:
                kept.append(o)
        self.objects = kept


def render_video(
    rng: np.random.Generator, width: int, height: int, num_frames: int, kinds: tuple[str, ...] = SHAPE_CLASSES
) -> VideoTruth:
    """Draw one video (see the module docstring)."""
    world = _World(rng, width, height, kinds)
    bg = background(rng, world.side, clutter=True)
    for _ in range(int(rng.integers(2, 5))):
        world.spawn(bg, inside=True)
    truth = VideoTruth([], [], [], [], [])
    cam = np.zeros(2)
    for _t in range(num_frames):
        cam = np.clip(0.6 * cam + rng.normal(0, 1.2, 2), -JITTER, JITTER)  # slight shake
        ox, oy = JITTER + int(round(cam[0])), JITTER + int(round(cam[1]))
        frame = bg[oy: oy + height, ox: ox + width].copy()
        owner = np.full((height, width), -1, dtype=np.int16)
        full = []
        for k, o in enumerate(world.objects):  # list order = depth order: later ones in front
            x0, y0, alpha = shape_window(world.kinds[o.label], o.x - ox, o.y - oy, o.extent, o.aspect, o.angle)
            full.append(int((alpha >= 128).sum()))
            paint_shape(frame, owner, k, x0, y0, alpha, o.colour)
        rows = []
        for k, o in enumerate(world.objects):
            box, pixels = owned_box(owner, k)
            vis = pixels / max(full[k], 1)
            if vis >= MIN_VISIBILITY and min(box[2] - box[0], box[3] - box[1]) >= MIN_BOX:
                rows.append((box, o.label, o.track_id, vis))
        truth.frames.append(add_noise(rng, frame))
        truth.boxes.append(np.array([r[0] for r in rows], np.float32).reshape(-1, 4))
        truth.labels.append(np.array([r[1] for r in rows], np.int64))
        truth.track_ids.append(np.array([r[2] for r in rows], np.int64))
        truth.visibility.append(np.array([r[3] for r in rows], np.float32))
        world.step()
        if len(world.objects) < MAX_ALIVE and rng.random() < SPAWN_P:
            world.spawn(bg, inside=False)
    return truth


def gt_lines(truth: VideoTruth) -> list[str]:
    """MOTChallenge gt.txt lines: frame, id, x, y, w, h, conf, class, visibility (1-based)."""
    lines = []
    for t, (boxes, labels, ids, vis) in enumerate(zip(truth.boxes, truth.labels, truth.track_ids, truth.visibility)):
        for b, c, i, v in zip(boxes, labels, ids, vis):
            lines.append(f"{t + 1},{int(i)},{b[0] + 1:g},{b[1] + 1:g},{b[2] - b[0]:g},{b[3] - b[1]:g},1,{int(c) + 1},"
                         f"{float(v):.3f}")
    return lines


def write_moving_shapes(
    out: str | Path,
    num_videos: int = 4,
    num_frames: int = 60,
    seed: int = 0,
    width: int = 320,
    height: int = 240,
    fps: float = 15.0,
    class_names: tuple[str, ...] = SHAPE_CLASSES,
    progress: bool = False,
) -> list[Path]:
    """Generate ``num_videos`` videos into ``out`` (layout in the module docstring)."""
    from tqdm import tqdm

    from onestage.video import write_video

    if num_videos < 1 or num_frames < 1:
        raise ValueError(f"make-video: need at least one video and one frame, got {num_videos} x {num_frames}")
    if width < 32 or height < 32:
        raise ValueError(f"make-video: frames must be at least 32x32 pixels, got {width}x{height}")
    unknown = [n for n in class_names if n not in SHAPE_CLASSES]
    if unknown:
        raise ValueError(f"make-video: unknown shape classes {unknown}; choose from {', '.join(SHAPE_CLASSES)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "classes.txt").write_text("\n".join(class_names) + "\n")
    folders = []
    for v in tqdm(range(num_videos), desc="make-video", unit="video", disable=not progress):
        truth = render_video(np.random.default_rng([seed, v]), width, height, num_frames, tuple(class_names))
        name = f"shapes-{seed:04d}-{v:03d}"
        folder = out / name
        (folder / "gt").mkdir(parents=True, exist_ok=True)
        write_video(folder / f"{name}.mp4", truth.frames, fps)
        (folder / "gt" / "gt.txt").write_text("\n".join(gt_lines(truth)) + "\n")
        (folder / "seqinfo.ini").write_text(
            f"[Sequence]\nname={name}\nimDir=\nframeRate={fps:g}\nseqLength={num_frames}\n"
            f"imWidth={width}\nimHeight={height}\nimExt=.mp4\n")
        folders.append(folder)
    return folders
