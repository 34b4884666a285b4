"""Mosaic augmentation: hand-computed tile placement, boxes that follow their pixels, and
the dataset/config wiring (onestage.data.mosaic)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onestage.config import ConfigError, load_config
from onestage.data.base import DetectionDataset
from onestage.data.record import ImageRecord
from onestage.data.mosaic import Mosaic, mosaic, mosaic_closed, tile_regions
from onestage.data.transforms import EvalTransform

COLOURS = [(200, 0, 0), (0, 200, 0), (0, 0, 200), (200, 200, 0)]
FILL = (7, 7, 7)


def solid(width: int, height: int, colour: tuple[int, int, int]) -> np.ndarray:
    image = np.empty((height, width, 3), dtype=np.uint8)
    image[:] = colour
    return image


def test_tile_regions_by_hand() -> None:
    # a 100 x 50 image, canvas 200, centre (120, 80): every tile fits except on the right
    assert tile_regions(100, 50, 120, 80, 200, 0) == ((20, 30, 120, 80), (0, 0, 100, 50))
    assert tile_regions(100, 50, 120, 80, 200, 1) == ((120, 30, 200, 80), (0, 0, 80, 50))
    assert tile_regions(100, 50, 120, 80, 200, 2) == ((20, 80, 120, 130), (0, 0, 100, 50))
    assert tile_regions(100, 50, 120, 80, 200, 3) == ((120, 80, 200, 130), (0, 0, 80, 50))
    # centre near the top-left corner: tile 0 keeps the bottom-right 30 x 40 of its image
    assert tile_regions(100, 50, 30, 40, 200, 0) == ((0, 0, 30, 40), (70, 10, 100, 50))


def test_mosaic_places_pixels_and_boxes_by_hand() -> None:
    # four 100 x 100 images around the centre of a 200 x 200 canvas: no tile is cut
    box = np.array([[10, 20, 90, 80]], dtype=np.float32)
    tiles = [(solid(100, 100, c), box, np.array([k])) for k, c in enumerate(COLOURS)]
    canvas, boxes, labels = mosaic(tiles, 100, (100, 100), FILL, 0.3)
    assert canvas.shape == (200, 200, 3)
    for k, (x, y) in enumerate([(50, 50), (150, 50), (50, 150), (150, 150)]):
        assert tuple(canvas[y, x]) == COLOURS[k]
    expected = np.array(
        [[10, 20, 90, 80], [110, 20, 190, 80], [10, 120, 90, 180], [110, 120, 190, 180]], dtype=np.float32
    )
    np.testing.assert_allclose(boxes, expected)
    assert labels.tolist() == [0, 1, 2, 3]


def test_mosaic_resizes_the_longer_side_and_clips_boxes_cut_by_the_canvas() -> None:
    # a 400 x 200 image is halved to 200 x 100 for tile size 200; centre (100, 150) cuts
    # tile 0 to its right 100 columns, so a box over the whole image becomes [0, 50, 100, 150]
    whole = np.array([[0, 0, 400, 200]], dtype=np.float32)
    left_quarter = np.array([[0, 0, 100, 200]], dtype=np.float32)  # lies in the cut-off part
    tiles = [(solid(400, 200, COLOURS[0]), np.concatenate([whole, left_quarter]), np.array([0, 1]))]
    tiles += [(solid(400, 200, c), np.zeros((0, 4), np.float32), np.zeros(0, np.int64)) for c in COLOURS[1:]]
    canvas, boxes, labels = mosaic(tiles, 200, (100, 150), FILL, 0.3)
    np.testing.assert_allclose(boxes, [[0, 50, 100, 150]])
    assert labels.tolist() == [0]
    assert tuple(canvas[10, 10]) == FILL  # above tile 0: nothing was pasted there
    assert tuple(canvas[100, 50]) == COLOURS[0]


@settings(max_examples=60, deadline=None)
@given(
    sizes=st.lists(st.tuples(st.integers(8, 90), st.integers(8, 90)), min_size=4, max_size=4),
    cx=st.floats(16, 48),
    cy=st.floats(16, 48),
    rel=st.lists(
        st.tuples(st.floats(0, 0.8), st.floats(0, 0.8), st.floats(0.1, 0.2), st.floats(0.1, 0.2)),
        min_size=4, max_size=4,
    ),
)
def test_every_mosaic_box_sits_on_its_own_tile(sizes, cx, cy, rel) -> None:
    """Property: a kept box lies on the canvas and its centre pixel has its tile's colour."""
    tiles = []
    for k, ((w, h), (x, y, bw, bh)) in enumerate(zip(sizes, rel)):
        b = np.array([[x * w, y * h, (x + bw) * w, (y + bh) * h]], dtype=np.float32)
        tiles.append((solid(w, h, COLOURS[k]), b, np.array([k])))
    canvas, boxes, labels = mosaic(tiles, 32, (cx, cy), FILL, 0.5)
    assert len(boxes) == len(labels) <= 4
    assert (boxes >= 0).all() and (boxes <= 64).all()
    assert (boxes[:, 2:] - boxes[:, :2] >= 1).all()
    for (x1, y1, x2, y2), k in zip(boxes, labels):
        x, y = int((x1 + x2) / 2), int((y1 + y2) / 2)
        assert tuple(canvas[min(y, 63), min(x, 63)]) == COLOURS[k]


def _dataset(p: float) -> DetectionDataset:
    rng = np.random.default_rng(0)
    records = [
        ImageRecord(i, 60, 40, np.array([[5, 5, 30, 30]], np.float32), np.array([i % 2]),
                    image=rng.integers(0, 255, (40, 60, 3), dtype=np.uint8))
        for i in range(6)
    ]
    return DetectionDataset(
        records, ["a", "b"], EvalTransform(32), image_loader=lambda r: r.image, seed=3,
        mosaic=Mosaic(p, 32, FILL),
    )


def test_dataset_mosaic_is_seeded_and_off_means_untouched() -> None:
    on = _dataset(1.0)
    a, b = on[2], on[2]
    assert len(a["labels"]) > 1  # four images' boxes, some cut away at most
    assert np.array_equal(a["image"].numpy(), b["image"].numpy())
    assert np.array_equal(a["boxes"].numpy(), b["boxes"].numpy())
    off, plain = _dataset(0.0), _dataset(0.0)
    plain.mosaic = None
    assert np.array_equal(off[2]["image"].numpy(), plain[2]["image"].numpy())
    assert len(off[2]["labels"]) == 1


def test_config_turns_mosaic_on_for_training_only() -> None:
    from onestage.build import build_mosaic

    cfg = load_config(None, ["data.augment.mosaic=0.5"])
    m = build_mosaic(cfg)
    assert m is not None and m.p == 0.5 and m.size == cfg.model.input_size
    assert build_mosaic(load_config(None)) is None
    assert build_mosaic(load_config(None, ["data.augment.mosaic=0.5", "data.augment.preset=none"])) is None
    with pytest.raises(ConfigError, match="mosaic"):
        load_config(None, ["data.augment.mosaic=1.5"])


def test_mosaic_closes_for_the_last_fraction_of_steps() -> None:
    assert not mosaic_closed(999, 1000, 0.0)  # 0: mosaic to the end
    assert not mosaic_closed(799, 1000, 0.2)
    assert mosaic_closed(800, 1000, 0.2)  # the last 20% of 1000 steps: steps 800..999
    assert mosaic_closed(0, 1000, 1.0)
    with pytest.raises(ConfigError, match="close_mosaic"):
        load_config(None, ["data.augment.close_mosaic=-0.1"])
