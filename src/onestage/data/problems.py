"""Bad input, reported instead of lost: the error type, the problem log and box sanitizing.

Every format reader (VOC, COCO JSON, YOLO txt) reads into a ``DatasetSpec`` whose
``problems`` log lists what was wrong with the data and what was done about it. Two kinds
of entries:

- **errors** (a file cannot be used as it is: missing or corrupt image, malformed
  annotation, unknown class, a path escaping the dataset root). With ``on_error="raise"``
  the first one raises ``DataError``; with ``on_error="skip"`` it is recorded with action
  ``"skipped"`` and the reader leaves that image out, so every other image still arrives.
- **fixes** (the data is usable after a well-defined repair: a box clipped to the image,
  a zero-area box dropped, a size taken from the image instead of the XML) and **notes**
  (quirks handled as they should be, which a person may still want to know about: a PNG
  named .jpg, an RGBA or 16-bit image converted, an EXIF-rotated image and the frame its
  boxes were taken in, a very large image, a class that looks like a typo). They never
  raise; they are recorded so that ``onestage data check`` can show them.

Contract of ``sanitize_boxes``: boxes (N, 4) float xyxy absolute pixels in, the same
format out, every kept box inside [0, W] x [0, H] with positive width and height.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal, get_args

import numpy as np

from onestage.data.record import ImageRecord

ProblemKind = Literal[
    "missing_image",
    "corrupt_image",
    "bad_annotation",
    "box_clipped",
    "box_degenerate",
    "unknown_class",
    "path_escape",
    "orphan_label",
    "size_mismatch",
    # Quirks handled correctly, reported so that a person knows (issue 21): never errors.
    "size_zero",  # an annotation records a 0 image size; the image's own size is used
    "format_mismatch",  # the extension lies about the format (a PNG named .jpg)
    "image_converted",  # RGBA, palette, 16-bit, grayscale, CMYK... converted to 8-bit RGB
    "exif_orientation",  # an EXIF-rotated image (which frame its boxes are in), or an invalid tag
    "large_image",  # decoding it costs much per epoch
    "classes_found",  # no data.class_names: the classes the data holds, in label order
    "likely_typo",  # a rare class named almost like a frequent one
]
Action = Literal["raised", "skipped", "clipped", "dropped", "kept", "converted", "rotated"]
OnError = Literal["raise", "skip"]

PROBLEM_KINDS: tuple[str, ...] = get_args(ProblemKind)
ACTIONS: tuple[str, ...] = get_args(Action)
# Actions that mean "this file could not be used": they make `onestage data check` fail.
ERROR_ACTIONS: frozenset[str] = frozenset({"raised", "skipped"})

# A box may overshoot the image by rounding alone: YOLO labels keep 6 decimals of a
# normalized coordinate (up to 3e-4 px at 640 px; coco128 has 42 such boxes) and COCO
# JSON boxes are floats. Such boxes are clipped silently; only a larger overshoot is an
# annotation problem worth reporting.
CLIP_TOLERANCE_PX = 0.5


class DataError(ValueError):
    """Data that cannot be used. The message always names the file and the problem."""


@dataclass
class Problem:
    """One thing wrong with the data: which file, what kind, what was done about it."""

    file: str
    kind: str  # one of PROBLEM_KINDS
    message: str
    action: str  # one of ACTIONS

    def __post_init__(self) -> None:
        if self.kind not in PROBLEM_KINDS:
            raise ValueError(f"problem kind {self.kind!r} is not one of {', '.join(PROBLEM_KINDS)}")
        if self.action not in ACTIONS:
            raise ValueError(f"problem action {self.action!r} is not one of {', '.join(ACTIONS)}")

    @property
    def is_error(self) -> bool:
        return self.action in ERROR_ACTIONS

    def __str__(self) -> str:
        return f"{self.file}: {self.message} [{self.kind}, {self.action}]"


class ProblemLog:
    """Collects problems under one policy: raise on the first error, or record and skip."""

    def __init__(self, on_error: OnError = "raise") -> None:
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', not {on_error!r}")
        self.on_error: OnError = on_error
        self.problems: list[Problem] = []

    def error(self, file: str | Path, kind: str, message: str) -> Problem:
        """A file that cannot be used: raises ``DataError`` in raise mode, else records it.

        The caller leaves the image out when this returns (skip mode).
        """
        action = "raised" if self.on_error == "raise" else "skipped"
        problem = Problem(str(file), kind, message, action)
        self.problems.append(problem)
        if self.on_error == "raise":
            raise DataError(f"{problem.file}: {message} ({kind})")
        return problem

    def fix(self, file: str | Path, kind: str, message: str, action: str) -> Problem:
        """A repaired or merely noteworthy problem; always recorded, never raised."""
        if action in ERROR_ACTIONS:
            raise ValueError(f"fix() records repairs; use error() for action {action!r}")
        problem = Problem(str(file), kind, message, action)
        self.problems.append(problem)
        return problem

    def extend(self, problems: list[Problem]) -> None:
        self.problems.extend(problems)

    @property
    def errors(self) -> list[Problem]:
        return [p for p in self.problems if p.is_error]

    def of_kind(self, kind: str) -> list[Problem]:
        return [p for p in self.problems if p.kind == kind]

    def counts(self) -> dict[str, int]:
        """Number of problems per kind, in the order of PROBLEM_KINDS."""
        c = Counter(p.kind for p in self.problems)
        return {k: c[k] for k in PROBLEM_KINDS if c[k]}

    def summary(self, per_kind: int | None = 10) -> str:
        """Counts per kind, then the problems with their files: at most ``per_kind`` of each
        kind (a training log must stay readable), every one with None (``onestage data check``)."""
        if not self.problems:
            return "problems: none"
        n_err = len(self.errors)
        lines = [f"problems: {len(self.problems)} ({n_err} error{'s' if n_err != 1 else ''}, "
                 f"{len(self.problems) - n_err} fixed or noted)"]
        for kind, n in self.counts().items():
            lines.append(f"  {kind}: {n}")
        shown: Counter[str] = Counter()
        for p in self.problems:
            shown[p.kind] += 1
            if per_kind is None or shown[p.kind] <= per_kind:
                lines.append(f"  - {p}")
        hidden = sum(max(0, n - per_kind) for n in shown.values()) if per_kind is not None else 0
        if hidden:
            lines.append(f"  ... and {hidden} more (`onestage data check` lists every one)")
        return "\n".join(lines)

    def __len__(self) -> int:
        return len(self.problems)

    def __iter__(self) -> Iterator[Problem]:
        return iter(self.problems)


@dataclass
class DatasetSpec:
    """What a format reader returns: the images, the class names, what was wrong."""

    records: list[ImageRecord]
    class_names: list[str]
    problems: ProblemLog = field(default_factory=ProblemLog)


def fix_boxes(
    boxes: np.ndarray, width: float, height: float, file: str | Path, log: ProblemLog
) -> tuple[np.ndarray, np.ndarray]:
    """Clip boxes to the image and drop the unusable ones, recording each fix.

    boxes: (N, 4) xyxy absolute pixels. Returns (kept boxes (K, 4) float32 xyxy, clipped;
    keep mask (N,) bool) so that callers can filter any other per-box array alongside.
    Dropped (``box_degenerate``): non-finite coordinates, zero-area or inverted boxes
    (x2 <= x1 or y2 <= y1, as annotated), and boxes entirely outside the image (zero area
    after clipping). Clipped (``box_clipped``): boxes reaching more than
    CLIP_TOLERANCE_PX outside [0, W] x [0, H].
    """
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)  # (N, 4) float64: exact clip tests
    finite = np.isfinite(b).all(axis=1)
    safe = np.where(finite[:, None], b, 0.0)
    flat = (safe[:, 2] <= safe[:, 0]) | (safe[:, 3] <= safe[:, 1])
    limits = np.array([width, height, width, height], dtype=np.float64)
    clipped = np.clip(safe, 0.0, limits)  # (N, 4)
    outside = ~flat & ((clipped[:, 2] <= clipped[:, 0]) | (clipped[:, 3] <= clipped[:, 1]))
    keep = finite & ~flat & ~outside
    moved = keep & (np.abs(clipped - safe).max(axis=1) > CLIP_TOLERANCE_PX)

    # Messages are built only for the few offending boxes; the tests above are vectorized.
    for i in np.flatnonzero(~keep):
        coords = ", ".join(f"{v:g}" for v in b[i])
        if not finite[i]:
            why = "has a non-finite coordinate"
        elif flat[i]:
            why = "has zero area" if (b[i, 2] == b[i, 0] or b[i, 3] == b[i, 1]) else "is inverted (x2 < x1 or y2 < y1)"
        else:
            why = f"lies entirely outside the {width:g}x{height:g} image"
        log.fix(file, "box_degenerate", f"box #{i} ({coords}) {why}; dropped", "dropped")
    for i in np.flatnonzero(moved):
        before = ", ".join(f"{v:g}" for v in b[i])
        after = ", ".join(f"{v:g}" for v in clipped[i])
        log.fix(file, "box_clipped", f"box #{i} ({before}) reaches outside the {width:g}x{height:g} "
                f"image; clipped to ({after})", "clipped")
    return clipped[keep].astype(np.float32), keep


def sanitize_boxes(
    boxes: np.ndarray,
    labels: np.ndarray,
    difficult: np.ndarray,
    width: float,
    height: float,
    file: str | Path,
    log: ProblemLog,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``fix_boxes`` applied to boxes (N, 4) xyxy pixels, labels (N,) and difficult (N,).

    Returns (boxes (K, 4) float32 xyxy inside the image, labels (K,) int64, difficult (K,) bool).
    """
    kept, keep = fix_boxes(boxes, width, height, file, log)
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)[keep]
    difficult = np.asarray(difficult, dtype=bool).reshape(-1)[keep]
    return kept, labels, difficult
