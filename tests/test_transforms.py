"""Augmentation pipelines and evaluation transforms: box/pixel consistency, exact inverses."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from onestage.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EvalTransform,
    FlipOnlyTransform,
    LetterboxEvalTransform,
    SSDTrainTransform,
    YOLOTrainTransform,
    clip_and_filter,
    denormalize,
    hflip,
    hsv_jitter,
    plan_placement,
    render,
    sample_iou_crop,
    sample_zoom_out,
    to_tensor,
)

S = 64  # network input in these tests: small keeps hypothesis fast
# One pure colour per label, far from black (the test background), the SSD mean fill
# (124, 116, 104) and the YOLO pad grey (114).
COLOURS = np.array(
    [[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [255, 0, 255], [0, 255, 255]], dtype=np.uint8
)

GEOMETRIC = {
    "ssd": lambda: SSDTrainTransform(S, photometric=False),
    "ssd_zoom8": lambda: SSDTrainTransform(S, photometric=False, zoom_out=8.0, zoom_out_p=1.0),
    "yolo": lambda: YOLOTrainTransform(S, hsv=(0.0, 0.0, 0.0)),
    "flip": lambda: FlipOnlyTransform(S),
    "eval": lambda: EvalTransform(S),
    "letterbox": lambda: LetterboxEvalTransform(S),
}
WITH_COLOUR = {
    "ssd_photo": lambda: SSDTrainTransform(S),
    "yolo_hsv": lambda: YOLOTrainTransform(S),
}
BUILT = {name: make() for name, make in {**GEOMETRIC, **WITH_COLOUR}.items()}


@st.composite
def painted_samples(draw):
    """An image with up to 6 non-overlapping solid boxes on black, label i painted COLOURS[i].

    Boxes live in separate cells of a 3 x 2 grid, so that each colour marks exactly one box.
    """
    width = draw(st.integers(24, 150))
    height = draw(st.integers(24, 150))
    n = draw(st.integers(0, 6))
    cells = draw(st.permutations(range(6)))[:n]
    cw, ch = width / 3, height / 2
    boxes = []
    for cell in cells:
        gx, gy = cell % 3, cell // 3
        fx = sorted(draw(st.lists(st.floats(0, 1), min_size=2, max_size=2)))
        fy = sorted(draw(st.lists(st.floats(0, 1), min_size=2, max_size=2)))
        x1 = int(gx * cw + fx[0] * (cw - 5))
        y1 = int(gy * ch + fy[0] * (ch - 5))
        x2 = max(x1 + 4, int(gx * cw + 4 + fx[1] * (cw - 5)))
        y2 = max(y1 + 4, int(gy * ch + 4 + fy[1] * (ch - 5)))
        boxes.append((x1, y1, min(x2, int((gx + 1) * cw)), min(y2, int((gy + 1) * ch))))
    image = np.zeros((height, width, 3), dtype=np.uint8)
    for label, (x1, y1, x2, y2) in enumerate(boxes):
        image[y1:y2, x1:x2] = COLOURS[label]
    boxes_arr = np.array(boxes, dtype=np.float32).reshape(-1, 4)
    return image, boxes_arr, np.arange(n, dtype=np.int64)


def _check_output(image_t, boxes, labels, n_in):
    assert isinstance(image_t, torch.Tensor) and image_t.shape == (3, S, S) and image_t.dtype == torch.float32
    assert image_t.is_contiguous()
    assert boxes.dtype == np.float32 and boxes.shape == (len(labels), 4)
    assert labels.dtype == np.int64
    assert np.all(boxes >= 0) and np.all(boxes <= 1)
    # Positive area, at least 1 output pixel wide and tall (the dropping rule).
    assert np.all(boxes[:, 2] - boxes[:, 0] >= 1 / S - 1e-6)
    assert np.all(boxes[:, 3] - boxes[:, 1] >= 1 / S - 1e-6)
    assert len(set(labels.tolist())) == len(labels), "a box was duplicated"
    assert np.all((labels >= 0) & (labels < n_in))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sample=painted_samples(), name=st.sampled_from(sorted(GEOMETRIC)), seed=st.integers(0, 2**31 - 1))
def test_boxes_follow_their_pixels(sample, name, seed):
    """Every surviving box still frames its own colour: most of the box interior has the
    label's colour and no pixel of that colour lies outside the box (1 px for blending)."""
    image, boxes, labels = sample
    np.random.seed(seed)
    image_t, out_boxes, out_labels = BUILT[name](image, boxes.copy(), labels.copy())
    _check_output(image_t, out_boxes, out_labels, len(labels))
    if name in ("flip", "eval", "letterbox"):
        assert out_labels.tolist() == labels.tolist(), "no box may be lost without a crop"
    pixels = denormalize(image_t).astype(np.int32)
    for box, label in zip(out_boxes * S, out_labels):
        match = np.abs(pixels - COLOURS[label].astype(np.int32)).sum(axis=-1) < 90  # (S, S)
        ys, xs = np.nonzero(match)
        x1, y1, x2, y2 = box
        if len(xs):
            assert xs.min() >= x1 - 1.5 and xs.max() + 1 <= x2 + 1.5, f"{name}: colour {label} outside its box"
            assert ys.min() >= y1 - 1.5 and ys.max() + 1 <= y2 + 1.5, f"{name}: colour {label} outside its box"
        ix1, iy1, ix2, iy2 = int(np.ceil(x1 + 1)), int(np.ceil(y1 + 1)), int(np.floor(x2 - 1)), int(np.floor(y2 - 1))
        if ix2 > ix1 and iy2 > iy1:
            assert match[iy1:iy2, ix1:ix2].mean() > 0.9, f"{name}: box {label} does not frame its colour"


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sample=painted_samples(), name=st.sampled_from(sorted(WITH_COLOUR)), seed=st.integers(0, 2**31 - 1))
def test_colour_jitter_keeps_the_box_contract(sample, name, seed):
    image, boxes, labels = sample
    np.random.seed(seed)
    _check_output(*BUILT[name](image, boxes.copy(), labels.copy()), len(labels))


def test_numpy_seed_fixes_every_augmentation_including_albumentations():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)
    boxes = np.array([[5, 5, 40, 30], [30, 20, 65, 45]], dtype=np.float32)
    labels = np.array([0, 1])
    for transform in (SSDTrainTransform(S), YOLOTrainTransform(S)):
        np.random.seed(3)
        a = transform(image, boxes, labels)
        np.random.seed(3)
        b = transform(image, boxes, labels)
        np.random.seed(4)
        c = transform(image, boxes, labels)
        assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1])
        assert not torch.equal(a[0], c[0])


def test_flip_maps_x1_to_one_minus_x2():
    image = np.zeros((50, 100, 3), dtype=np.uint8)
    image[5:25, 10:30] = 200
    boxes = np.array([[10, 5, 30, 25]], dtype=np.float32)
    flipped_t, fb, fl = FlipOnlyTransform(100, p=1.0)(image, boxes, np.array([3]))
    plain_t, pb, _ = EvalTransform(100)(image, boxes, np.array([3]))
    # Eval: x scale 1, y scale 2 -> [0.1, 0.1, 0.3, 0.5]; flipped: x1' = 1 - 0.3, x2' = 1 - 0.1.
    np.testing.assert_allclose(pb, [[0.1, 0.1, 0.3, 0.5]], atol=1e-6)
    np.testing.assert_allclose(fb, [[0.7, 0.1, 0.9, 0.5]], atol=1e-6)
    assert fl.tolist() == [3]
    assert torch.equal(flipped_t, plain_t.flip(-1))


def test_hflip_pure():
    img = np.arange(2 * 10 * 3, dtype=np.uint8).reshape(2, 10, 3)
    out, b = hflip(img, np.array([[0.0, 0.0, 3.0, 2.0], [7.5, 1.0, 10.0, 2.0]], dtype=np.float32))
    np.testing.assert_array_equal(b, [[7.0, 0.0, 10.0, 2.0], [0.0, 1.0, 2.5, 2.0]])
    np.testing.assert_array_equal(out[:, 0], img[:, 9])


def test_clip_and_filter_rule():
    boxes = np.array(
        [
            [-10, 0, 10, 10],  # half outside: keeps 50% of its area
            [0, 0, 0.5, 10],  # 0.5 px wide: dropped
            [90, 90, 130, 130],  # keeps 10x10 of 40x40 = 6.25%
            [20, 20, 30, 30],  # inside: untouched
        ],
        dtype=np.float32,
    )
    labels = np.array([0, 1, 2, 3])
    kept, kl = clip_and_filter(boxes, labels, 100, 100, 0.3)
    assert kl.tolist() == [0, 3]
    np.testing.assert_array_equal(kept, [[0, 0, 10, 10], [20, 20, 30, 30]])
    _, kl = clip_and_filter(boxes, labels, 100, 100, 0.6)
    assert kl.tolist() == [3]
    _, kl = clip_and_filter(boxes, labels, 100, 100, 0.0)
    assert kl.tolist() == [0, 2, 3]


def test_plan_placement_rounds_to_pixels_and_keeps_the_exact_map():
    # 100 x 50 image at half scale, shifted by (20.3, 10) in a 100 x 100 output.
    plan = plan_placement(100, 50, 0.5, 0.5, 20.3, 10.0, 100)
    assert plan.src == (0, 0, 100, 50)
    assert plan.dst == (20, 10, 70, 35)
    p = plan.placement
    assert (p.kx, p.ky, p.bx, p.by) == (0.5, 0.5, 20.0, 10.0)
    # Only part of a 3x enlarged image is visible: source x in [0, 100/3] -> ceil 34.
    plan = plan_placement(60, 60, 3.0, 3.0, 0.0, -30.0, 100)
    assert plan.src == (0, 10, 34, 44)
    assert plan.dst == (0, 0, 102, 102)
    # Nothing visible: empty plan, nominal map kept for the boxes (which then get dropped).
    plan = plan_placement(10, 10, 1.0, 1.0, 200.0, 0.0, 100)
    assert plan.src is None
    out = render(np.zeros((10, 10, 3), np.uint8), plan, 100, (1, 2, 3))
    assert np.all(out == np.array([1, 2, 3]))


def test_zoom_out_keeps_the_objects_pixels():
    rng = np.random.default_rng(1)
    # A smooth random texture (so that resizing it back and forth loses little).
    small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    image = np.asarray(
        torch.nn.functional.interpolate(
            torch.from_numpy(small).permute(2, 0, 1)[None].float(), size=(48, 64), mode="bilinear"
        )[0].permute(1, 2, 0).round().byte()
    )
    box = np.array([[0, 0, 64, 48]], dtype=np.float32)  # the whole image is the object
    transform = SSDTrainTransform(128, photometric=False, zoom_out=3.0, zoom_out_p=1.0, crop=False, flip=0.0)
    np.random.seed(0)
    out_t, out_boxes, out_labels = transform(image, box, np.array([0]))
    assert out_labels.tolist() == [0]
    x1, y1, x2, y2 = np.rint(out_boxes[0] * 128).astype(int)
    # The canvas is the image scaled by r on both axes, then resized to 128 x 128: the
    # image becomes a (128 / r)-sided square, r in [1, 3].
    assert 128 / 3 - 1 <= x2 - x1 < 127 and abs((x2 - x1) - (y2 - y1)) <= 1
    pixels = denormalize(out_t)
    fill = np.rint(np.array(IMAGENET_MEAN) * 255)
    outside = np.ones((128, 128), dtype=bool)
    outside[y1:y2, x1:x2] = False
    assert np.abs(pixels[outside].astype(int) - fill).max() <= 1, "zoom-out padding must be the mean colour"
    inner = pixels[y1:y2, x1:x2]
    back = np.asarray(
        torch.nn.functional.interpolate(
            torch.from_numpy(inner).permute(2, 0, 1)[None].float(), size=(48, 64), mode="bilinear"
        )[0].permute(1, 2, 0)
    )
    assert np.abs(back - image.astype(np.float32)).mean() < 12, "the object's pixels must survive zoom-out"


def test_sample_zoom_out_ranges():
    np.random.seed(0)
    for _ in range(50):
        cw, ch, left, top = sample_zoom_out(100, 50, 4.0)
        assert 100 <= cw <= 400 and abs(cw / ch - 2) < 1e-9
        assert 0 <= left <= cw - 100 and 0 <= top <= ch - 50


@settings(max_examples=50, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(0, 5),
    width=st.floats(20, 400),
    height=st.floats(20, 400),
)
def test_iou_crop_respects_its_constraints(seed, n, width, height):
    rng = np.random.default_rng(seed)
    xy = rng.uniform(0, 1, (n, 2, 2)) * [width, height]
    boxes = np.concatenate([xy.min(1), xy.max(1) + 1], axis=1).astype(np.float32)
    np.random.seed(seed)
    crop, keep = sample_iou_crop(boxes, width, height)
    x1, y1, x2, y2 = crop
    assert 0 <= x1 < x2 <= width + 1e-9 and 0 <= y1 < y2 <= height + 1e-9
    if not np.allclose(crop, [0, 0, width, height]):
        assert x2 - x1 >= 0.3 * width - 1e-9 and y2 - y1 >= 0.3 * height - 1e-9
        assert 0.5 - 1e-9 <= (y2 - y1) / (x2 - x1) <= 2 + 1e-9
        cx = (boxes[:, 0] + boxes[:, 2]) / 2
        cy = (boxes[:, 1] + boxes[:, 3]) / 2
        np.testing.assert_array_equal(keep, (x1 < cx) & (cx < x2) & (y1 < cy) & (cy < y2))
        if n:
            assert keep.any()
    else:
        assert keep.all()


@settings(max_examples=50, deadline=None)
@given(
    width=st.integers(10, 1000),
    height=st.integers(10, 1000),
    size=st.sampled_from([32, 300, 416]),
    fx=st.lists(st.floats(0, 1), min_size=4, max_size=4),
    letterbox=st.booleans(),
)
def test_eval_invert_round_trips(width, height, size, fx, letterbox):
    x = sorted(fx[:2])
    y = sorted(fx[2:])
    boxes = np.array([[x[0] * width, y[0] * height, x[1] * width, y[1] * height]], dtype=np.float64)
    transform = LetterboxEvalTransform(size) if letterbox else EvalTransform(size)
    plan = transform.plan(width, height)
    norm = plan.placement.forward(boxes.astype(np.float64)).astype(np.float64) / size
    back = transform.invert_boxes(norm, width, height)
    assert isinstance(back, np.ndarray)
    assert np.abs(back - boxes).max() < 1e-3
    back_t = transform.invert_boxes(torch.as_tensor(norm, dtype=torch.float64), width, height)
    assert isinstance(back_t, torch.Tensor) and (back_t.numpy() - boxes).__abs__().max() < 1e-3


def test_letterbox_hand_computed():
    # 200 x 100 into 100: scale 0.5, image 100 x 50 centred -> 25 px of padding above.
    image = np.full((100, 200, 3), 255, dtype=np.uint8)
    boxes = np.array([[0, 0, 200, 100], [50, 20, 150, 60]], dtype=np.float32)
    t = LetterboxEvalTransform(100, pad_value=114)
    out, b, labels = t(image, boxes, np.array([0, 1]))
    np.testing.assert_allclose(b * 100, [[0, 25, 100, 75], [25, 35, 75, 55]], atol=1e-4)
    pixels = denormalize(out)
    assert np.all(pixels[:25] == 114) and np.all(pixels[75:] == 114) and np.all(pixels[25:75] == 255)
    back = t.invert_boxes(np.array([[0.25, 0.35, 0.75, 0.55], [0.0, 0.0, 1.0, 1.0]]), 200, 100)
    # A prediction reaching into the padding is clipped to the image.
    np.testing.assert_allclose(back, [[50, 20, 150, 60], [0, 0, 200, 100]], atol=1e-6)


def test_normalize_and_denormalize_round_trip():
    img = np.random.default_rng(0).integers(0, 256, (7, 9, 3), dtype=np.uint8)
    t = to_tensor(img, IMAGENET_MEAN, IMAGENET_STD)
    assert t.shape == (3, 7, 9)
    expected = (img[1, 2, 0] / 255 - IMAGENET_MEAN[0]) / IMAGENET_STD[0]
    assert abs(t[0, 1, 2].item() - expected) < 1e-5
    np.testing.assert_array_equal(denormalize(t), img)


def test_hsv_jitter_gains():
    img = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    # Value gain 0 -> black; unit gains -> identity up to the uint8 HSV round trip.
    assert hsv_jitter(img, (1.0, 1.0, 0.0)).max() == 0
    assert np.abs(hsv_jitter(img, (1.0, 1.0, 1.0)).astype(int) - img).max() <= 8
    # Saturation gain 0 -> grey: all three channels equal.
    grey = hsv_jitter(img, (1.0, 0.0, 1.0))
    assert np.all(grey[..., 0] == grey[..., 1]) and np.all(grey[..., 1] == grey[..., 2])


def test_bad_input_is_named():
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        EvalTransform(32)(np.zeros((10, 10), np.uint8), np.zeros((0, 4)), np.zeros(0))
    with pytest.raises(ValueError, match="2 boxes but 1 labels"):
        EvalTransform(32)(np.zeros((10, 10, 3), np.uint8), np.zeros((2, 4)), np.zeros(1))


def test_ssd_crop_and_zoom_out_geometry_by_hand(monkeypatch):
    """Fixed zoom-out and crop (unit scale, so no resampling): the output must be exactly
    the canvas window, and boxes shift by the canvas offset minus the crop origin."""
    import onestage.data.transforms as tr

    image = np.random.default_rng(0).integers(0, 256, (100, 100, 3), dtype=np.uint8)
    boxes = np.array([[60, 60, 90, 90], [0, 0, 10, 10]], dtype=np.float32)
    # Canvas 200 x 200 with the image at (50, 50); crop [25, 25, 125, 125] -> output 100 x 100.
    monkeypatch.setattr(tr, "sample_zoom_out", lambda w, h, r: (200.0, 200.0, 50.0, 50.0))
    seen = {}

    def fixed_crop(canvas_boxes, width, height):
        seen["boxes"] = canvas_boxes.copy()
        return np.array([25.0, 25.0, 125.0, 125.0]), np.array([True, True])

    monkeypatch.setattr(tr, "sample_iou_crop", fixed_crop)
    t = SSDTrainTransform(100, photometric=False, zoom_out_p=1.0, flip=0.0, min_visible=0.3)
    out, out_boxes, labels = t(image, boxes, np.array([0, 1]))
    np.testing.assert_array_equal(seen["boxes"], boxes + 50)
    pixels = denormalize(out)
    np.testing.assert_array_equal(pixels[25:, 25:], image[:75, :75])
    assert np.abs(pixels[:25].astype(int) - np.rint(np.array(IMAGENET_MEAN) * 255)).max() <= 1
    # Box 0: canvas [110, 110, 140, 140] - 25 -> [85, 85, 115, 115] clipped to [85, 85, 100, 100]:
    # keeps 15*15/900 = 25% < 30% -> dropped. Box 1: canvas [50, 50, 60, 60] -> [25, 25, 35, 35].
    assert labels.tolist() == [1]
    np.testing.assert_allclose(out_boxes * 100, [[25, 25, 35, 35]], atol=1e-4)


def test_yolo_without_randomness_is_the_letterbox():
    image = np.random.default_rng(2).integers(0, 256, (37, 90, 3), dtype=np.uint8)
    boxes = np.array([[3, 4, 50, 30], [60, 0, 90, 37]], dtype=np.float32)
    labels = np.array([1, 0])
    yolo = YOLOTrainTransform(S, hsv=(0.0, 0.0, 0.0), scale=0.0, translate=0.0, flip=0.0)
    a = yolo(image, boxes, labels)
    b = LetterboxEvalTransform(S)(image, boxes, labels)
    assert torch.equal(a[0], b[0])
    np.testing.assert_allclose(a[1], b[1], atol=1e-6)
    # Hand value: scale 64 / 90, image 64 x 26.3 centred -> top pad (64 - 37 * 64 / 90) / 2.
    k = 64 / 90
    dy = round((64 - 37 * k) / 2)
    np.testing.assert_allclose(b[1][1] * 64, [60 * k, dy, 64, 64 - dy], atol=0.5)


def test_shapes_through_dataset_and_collate():
    from onestage.data.base import DetectionDataset, collate
    from onestage.data.shapes import make_shapes

    records, names = make_shapes(4, size=96, seed=0)
    ds = DetectionDataset(records, names, SSDTrainTransform(S))
    np.random.seed(0)
    batch = collate([ds[i] for i in range(4)])
    assert batch["images"].shape == (4, 3, S, S)
    valid = batch["labels"] >= 0
    assert torch.all(batch["boxes"][valid] >= 0) and torch.all(batch["boxes"][valid] <= 1)
    assert batch["indices"].tolist() == [0, 1, 2, 3]
