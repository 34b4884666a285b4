"""SSD default boxes ("priors") from a layout description (DESIGN.md section 3).

Order (the reference SSD300's and the head's): map by map, row-major over cells, the
boxes of one cell together. Within a cell: the square of size s_k, the square of size
sqrt(s_k * s_{k+1}), then for each aspect ratio r the pair (r, 1/r).
Output: (P, 4) float32 cxcywh, normalized to [0, 1] of the network input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class PriorLayout:
    """Everything needed to place default boxes on a list of feature maps.

    ``min_sizes`` / ``max_sizes`` are fractions of the input size (s_k, s_{k+1}) per map;
    ``steps`` are cell strides as fractions of the input (1 / f_k for a map of f_k cells).
    """

    feature_maps: tuple[tuple[int, int], ...]  # (h, w) per map
    min_sizes: tuple[float, ...]
    max_sizes: tuple[float, ...]
    steps: tuple[tuple[float, float], ...]  # (step_y, step_x) per map, normalized
    aspect_ratios: tuple[tuple[float, ...], ...]
    clip: bool = True

    def boxes_per_location(self) -> list[int]:
        return [2 + 2 * len(r) for r in self.aspect_ratios]

    def counts(self) -> list[int]:
        return [h * w * a for (h, w), a in zip(self.feature_maps, self.boxes_per_location())]


def linear_scales(num_maps: int, s_min: float = 0.2, s_max: float = 0.9) -> list[float]:
    """SSD paper eq. 4: s_k = s_min + (s_max - s_min)(k - 1)/(m - 1), k = 1..m, plus s_{m+1}.

    The extra scale s_{m+1} gives the last map its second square, sqrt(s_m * s_{m+1}).
    """
    if num_maps == 1:
        return [s_min, s_max]
    step = (s_max - s_min) / (num_maps - 1)
    return [s_min + step * k for k in range(num_maps + 1)]


def make_layout(
    feature_maps: list[tuple[int, int]],
    input_size: int,
    aspect_ratios: list[list[float]],
    *,
    s_min: float = 0.2,
    s_max: float = 0.9,
    min_sizes: list[float] | None = None,
    max_sizes: list[float] | None = None,
    steps: list[float] | None = None,
    clip: bool = True,
) -> PriorLayout:
    """Build a layout from either linear scales or explicit pixel sizes and steps.

    Explicit sizes are the reference SSD300's (min 30..264, max 60..315 pixels, steps 8..300);
    without them the scales are linear as in the paper and the step is input / map size.
    """
    m = len(feature_maps)
    if len(aspect_ratios) != m:
        raise ValueError(f"{len(aspect_ratios)} aspect-ratio lists for {m} feature maps")
    if min_sizes:
        if len(min_sizes) != m or len(max_sizes or []) != m:
            raise ValueError(f"min_sizes and max_sizes need one value per feature map ({m})")
        mins = [s / input_size for s in min_sizes]
        maxs = [s / input_size for s in max_sizes]  # type: ignore[union-attr]
    else:
        scales = linear_scales(m, s_min, s_max)
        mins, maxs = scales[:-1], scales[1:]
    if steps:
        if len(steps) != m:
            raise ValueError(f"steps needs one value per feature map ({m})")
        step_pairs = [(s / input_size, s / input_size) for s in steps]
    else:
        step_pairs = [(1.0 / h, 1.0 / w) for h, w in feature_maps]
    return PriorLayout(
        feature_maps=tuple((int(h), int(w)) for h, w in feature_maps),
        min_sizes=tuple(mins),
        max_sizes=tuple(maxs),
        steps=tuple(step_pairs),
        aspect_ratios=tuple(tuple(float(r) for r in rs) for rs in aspect_ratios),
        clip=clip,
    )


def cell_box_sizes(s_k: float, s_next: float, ratios: tuple[float, ...]) -> Tensor:
    """(A, 2) widths and heights of one cell's boxes, in the reference order."""
    sizes = [(s_k, s_k), (math.sqrt(s_k * s_next),) * 2]
    for r in ratios:
        sr = math.sqrt(r)
        sizes += [(s_k * sr, s_k / sr), (s_k / sr, s_k * sr)]
    return torch.tensor(sizes, dtype=torch.float32)


def generate_priors(layout: PriorLayout) -> Tensor:
    """(P, 4) float32 cxcywh normalized default boxes, P = sum of ``layout.counts()``."""
    per_map = []
    for (h, w), s_k, s_next, (step_y, step_x), ratios in zip(
        layout.feature_maps, layout.min_sizes, layout.max_sizes, layout.steps, layout.aspect_ratios
    ):
        cy = (torch.arange(h, dtype=torch.float32) + 0.5) * step_y  # (h,)
        cx = (torch.arange(w, dtype=torch.float32) + 0.5) * step_x  # (w,)
        centers = torch.stack(torch.meshgrid(cx, cy, indexing="xy"), dim=-1).reshape(-1, 1, 2)  # (h*w, 1, 2)
        wh = cell_box_sizes(s_k, s_next, ratios)[None]  # (1, A, 2)
        boxes = torch.cat(torch.broadcast_tensors(centers, wh), dim=-1)  # (h*w, A, 4)
        per_map.append(boxes.reshape(-1, 4))
    priors = torch.cat(per_map)
    if layout.clip:
        priors = priors.clamp(0.0, 1.0)
    return priors
