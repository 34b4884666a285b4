"""YOLOv3 loss: hand-computed values, Darknet's gradient, empty images, fp32, training."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from onestage.losses.yolov3 import YOLOv3Loss
from onestage.models.heads.yolov3 import YOLOv3, YOLOv3Head

LOG2 = math.log(2.0)


@pytest.fixture(autouse=True)
def one_thread():
    # These tensors are tiny: on a shared 2-core machine, two intra-op threads spend far
    # longer synchronising than computing (0.2 s vs 10 s for the training test under load).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)

# A small two-scale layout: 2x2 grid with anchor (0.5, 0.5), 4x4 grid with anchor (0.25, 0.25), C = 2.
SMALL_ANCHORS = [torch.tensor([[0.5, 0.5]]), torch.tensor([[0.25, 0.25]])]


def zero_outputs(batch: int = 1, num_classes: int = 2) -> list[Tensor]:
    return [torch.zeros(batch, 1, s, s, 5 + num_classes, requires_grad=True) for s in (2, 4)]


# One object: centre (0.3, 0.6), size 0.5 x 0.5, class 1. Its best anchor is (0.5, 0.5) (IoU 1)
# on the 2x2 grid: column floor(0.6) = 0, row floor(1.2) = 1, tx = 0.6, ty = 0.2, tw = th = 0.
OBJ_BOX = torch.tensor([[[0.05, 0.35, 0.55, 0.85]]])
OBJ_LABEL = torch.tensor([[1]])


def test_hand_computed_terms_default_settings() -> None:
    # Raw outputs all 0: sigmoid = 0.5 everywhere, BCE(logit 0, any target) = log 2.
    loss = YOLOv3Loss(SMALL_ANCHORS, 2, ignore_by="anchor")  # (0.25,0.25) vs the object: IoU 0.25, not ignored
    terms = loss(zero_outputs(), OBJ_BOX, OBJ_LABEL)
    assert set(terms) == {"xy", "wh", "obj", "noobj", "cls", "total"}
    assert terms["xy"].item() == pytest.approx((0.5 - 0.6) ** 2 + (0.5 - 0.2) ** 2, abs=1e-5)  # 0.10
    assert terms["wh"].item() == pytest.approx(0.0, abs=1e-6)
    assert terms["obj"].item() == pytest.approx(LOG2, abs=1e-6)
    assert terms["cls"].item() == pytest.approx(2 * LOG2, abs=1e-6)  # two independent sigmoids
    assert terms["noobj"].item() == pytest.approx(19 * LOG2, abs=1e-5)  # 3 + 16 negatives
    assert terms["total"].item() == pytest.approx(0.1 + 22 * LOG2, abs=1e-5)  # 15.349


def test_hand_computed_per_scale_mode() -> None:
    # per_scale adds a positive on the 4x4 grid: column floor(1.2) = 1, row floor(2.4) = 2,
    # tx = 0.2, ty = 0.4, tw = th = log(0.5 / 0.25) = log 2.
    loss = YOLOv3Loss(SMALL_ANCHORS, 2, assign_mode="per_scale", ignore_by="anchor")
    terms = loss(zero_outputs(), OBJ_BOX, OBJ_LABEL)
    assert terms["xy"].item() == pytest.approx(0.10 + (0.5 - 0.2) ** 2 + (0.5 - 0.4) ** 2, abs=1e-5)  # 0.20
    assert terms["wh"].item() == pytest.approx(2 * LOG2**2, abs=1e-5)  # 0.9609
    assert terms["obj"].item() == pytest.approx(2 * LOG2, abs=1e-6)
    assert terms["cls"].item() == pytest.approx(4 * LOG2, abs=1e-6)
    assert terms["noobj"].item() == pytest.approx(18 * LOG2, abs=1e-5)


def test_reduction_weights_and_options() -> None:
    # A second, empty image: "sum" divides every summed term by the batch size (2).
    boxes = torch.cat((OBJ_BOX, torch.zeros(1, 1, 4)))
    labels = torch.tensor([[1], [-1]])
    summed = YOLOv3Loss(SMALL_ANCHORS, 2, ignore_by="anchor")(zero_outputs(2), boxes, labels)
    assert summed["xy"].item() == pytest.approx(0.05, abs=1e-5)
    assert summed["noobj"].item() == pytest.approx((19 + 20) * LOG2 / 2, abs=1e-5)
    # "mean": each term over its own elements (1 positive, 39 negatives, 1 x 2 class entries).
    mean = YOLOv3Loss(SMALL_ANCHORS, 2, ignore_by="anchor", reduction="mean")(zero_outputs(2), boxes, labels)
    assert mean["xy"].item() == pytest.approx(0.10, abs=1e-5)
    assert mean["noobj"].item() == pytest.approx(LOG2, abs=1e-6)
    assert mean["cls"].item() == pytest.approx(LOG2, abs=1e-6)
    # Weights are applied to the returned terms; total is their sum.
    weighted = YOLOv3Loss(
        SMALL_ANCHORS, 2, ignore_by="anchor", noobj_weight=100.0, obj_weight=3.0, cls_weight=0.5, box_weight=2.0
    )(zero_outputs(), OBJ_BOX, OBJ_LABEL)
    assert weighted["noobj"].item() == pytest.approx(100 * 19 * LOG2, rel=1e-6)
    assert weighted["obj"].item() == pytest.approx(3 * LOG2, abs=1e-6)
    assert weighted["cls"].item() == pytest.approx(LOG2, abs=1e-6)
    assert weighted["xy"].item() == pytest.approx(0.2, abs=1e-5)
    parts = sum(weighted[k].item() for k in ("xy", "wh", "obj", "noobj", "cls"))
    assert weighted["total"].item() == pytest.approx(parts, rel=1e-6)
    # (2 - w h) = 1.75 on the box terms; BCE on x, y gives log 2 per coordinate at logit 0.
    scaled = YOLOv3Loss(SMALL_ANCHORS, 2, ignore_by="anchor", box_weight_2wh=True)(zero_outputs(), OBJ_BOX, OBJ_LABEL)
    assert scaled["xy"].item() == pytest.approx(1.75 * 0.10, abs=1e-5)
    bce = YOLOv3Loss(SMALL_ANCHORS, 2, ignore_by="anchor", xy_loss="bce")(zero_outputs(), OBJ_BOX, OBJ_LABEL)
    assert bce["xy"].item() == pytest.approx(2 * LOG2, abs=1e-6)
    with pytest.raises(ValueError, match="xy_loss"):
        YOLOv3Loss(SMALL_ANCHORS, 2, xy_loss="l1")  # type: ignore[arg-type]


def test_image_without_objects_has_only_negative_terms() -> None:
    outputs = zero_outputs()
    terms = YOLOv3Loss(SMALL_ANCHORS, 2)(outputs, torch.zeros(1, 3, 4), torch.full((1, 3), -1))
    assert all(torch.isfinite(v) for v in terms.values())
    for name in ("xy", "wh", "obj", "cls"):
        assert terms[name].item() == 0.0
    assert terms["noobj"].item() == pytest.approx(20 * LOG2, abs=1e-5)  # every slot is a negative
    terms["total"].backward()
    for out in outputs:
        grad = out.grad
        assert torch.allclose(grad[..., 4], torch.full_like(grad[..., 4], 0.5))  # d BCE / d z = sigmoid(z) - 0
        assert grad[..., :4].abs().sum() == 0 and grad[..., 5:].abs().sum() == 0
    # No object rows at all (M = 0) works too.
    empty = YOLOv3Loss(SMALL_ANCHORS, 2)(zero_outputs(), torch.zeros(1, 0, 4), torch.zeros(1, 0, dtype=torch.int64))
    assert empty["total"].item() == pytest.approx(20 * LOG2, abs=1e-5)


# --------------------------------------------------------------------------- Darknet's gradient
DN_ANCHORS = [torch.tensor([[0.5, 0.4], [0.3, 0.6]]), torch.tensor([[0.1, 0.15], [0.2, 0.1]])]
DN_GRIDS = [(2, 2), (4, 4)]
DN_CLASSES = 3


def _sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def _iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """Independent reference (Darknet box_iou) on (cx, cy, w, h)."""
    ix = max(0.0, min(a[0] + a[2] / 2, b[0] + b[2] / 2) - max(a[0] - a[2] / 2, b[0] - b[2] / 2))
    iy = max(0.0, min(a[1] + a[3] / 2, b[1] + b[3] / 2) - max(a[1] - a[3] / 2, b[1] - b[3] / 2))
    inter = ix * iy
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def darknet_deltas(raw: list[Tensor], truths: list[list[tuple[float, float, float, float, int]]]) -> list[Tensor]:
    """A line-by-line transcription of Darknet's forward_yolo_layer (yolo_layer.c, iou_loss=mse,
    ignore_thresh=.7, truth_thresh=1) for the tiny layout above: returns l.delta per scale.

    As in C: truth.x is a float, ``i = (int)(truth.x * l.w)`` and ``tx = truth.x * lw - i`` in
    float32; ``delta_yolo_class`` on a slot whose class delta is already written (a second
    object on the same cell and anchor) only sets that class's delta to 1 - output."""
    all_anchors = [tuple(a.tolist()) for group in DN_ANCHORS for a in group]
    deltas = [torch.zeros_like(r) for r in raw]
    for s, (r, (lh, lw)) in enumerate(zip(raw, DN_GRIDS)):
        d = deltas[s]
        n_local = r.shape[1]
        first = sum(g.shape[0] for g in DN_ANCHORS[:s])  # this layer's mask = first .. first + n_local - 1
        for b in range(r.shape[0]):
            for j in range(lh):
                for i in range(lw):
                    for n in range(n_local):
                        x = r[b, n, j, i].tolist()
                        aw, ah = all_anchors[first + n]
                        pred = ((i + _sig(x[0])) / lw, (j + _sig(x[1])) / lh, math.exp(x[2]) * aw, math.exp(x[3]) * ah)
                        best_iou = max([_iou(pred, t[:4]) for t in truths[b]], default=0.0)
                        d[b, n, j, i, 4] = 0.0 - _sig(x[4])
                        if best_iou > 0.7:
                            d[b, n, j, i, 4] = 0.0
            for t in truths[b]:
                cx, cy, w, h, cls = t
                best_iou, best_n = 0.0, 0
                for n, (aw, ah) in enumerate(all_anchors):
                    iou = _iou((0, 0, aw, ah), (0, 0, w, h))
                    if iou > best_iou:
                        best_iou, best_n = iou, n
                if not first <= best_n < first + n_local:
                    continue
                n = best_n - first
                gx, gy = np.float32(cx) * np.float32(lw), np.float32(cy) * np.float32(lh)  # float math
                i, j = int(gx), int(gy)
                x = r[b, n, j, i].tolist()
                aw, ah = all_anchors[best_n]
                scale = 2 - w * h
                d[b, n, j, i, 0] = scale * (float(gx - np.float32(i)) - _sig(x[0]))
                d[b, n, j, i, 1] = scale * (float(gy - np.float32(j)) - _sig(x[1]))
                d[b, n, j, i, 2] = scale * (math.log(w / aw) - x[2])
                d[b, n, j, i, 3] = scale * (math.log(h / ah) - x[3])
                d[b, n, j, i, 4] = 1 - _sig(x[4])
                if d[b, n, j, i, 5 + cls] != 0:  # delta_yolo_class: the slot already has a class
                    d[b, n, j, i, 5 + cls] = 1 - _sig(x[5 + cls])
                    continue
                for c in range(DN_CLASSES):
                    d[b, n, j, i, 5 + c] = (1.0 if c == cls else 0.0) - _sig(x[5 + c])
    return deltas


def test_darknet_preset_reproduces_darknet_gradient() -> None:
    truths = [
        [(0.3, 0.6, 0.45, 0.4, 2), (0.8, 0.2, 0.12, 0.1, 0)],
        [(0.55, 0.45, 0.2, 0.15, 1)],  # best anchor (0.2, 0.1) at 4x4: row 1, column 2
    ]
    gen = torch.Generator().manual_seed(0)
    raw = [0.5 * torch.randn(2, 2, h, w, 5 + DN_CLASSES, generator=gen) for h, w in DN_GRIDS]
    # Two negatives whose prediction IS the image-1 object (IoU 1 > 0.7): ignored by Darknet.
    raw[1][1, 0, 1, 2, :4] = torch.tensor([math.log(0.2 / 0.8), math.log(0.8 / 0.2), math.log(0.2 / 0.1), 0.0])
    raw[0][1, 0, 0, 1, :4] = torch.tensor(
        [math.log(0.1 / 0.9), math.log(0.9 / 0.1), math.log(0.2 / 0.5), math.log(0.15 / 0.4)]
    )
    expected = darknet_deltas(raw, truths)
    assert expected[1][1, 0, 1, 2, 4] == 0.0 and expected[0][1, 0, 0, 1, 4] == 0.0  # the ignore really happens

    boxes = torch.zeros(2, 2, 4)
    labels = torch.full((2, 2), -1)
    for b, image in enumerate(truths):
        for m, (cx, cy, w, h, cls) in enumerate(image):
            boxes[b, m] = torch.tensor([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
            labels[b, m] = cls
    outputs = [r.clone().requires_grad_(True) for r in raw]
    loss = YOLOv3Loss(DN_ANCHORS, DN_CLASSES, preset="darknet")
    assert (loss.xy_loss, loss.ignore_thres, loss.assign_mode, loss.box_weight_2wh) == ("bce", 0.7, "global", True)
    loss(outputs, boxes, labels)["total"].backward()
    for out, delta in zip(outputs, expected):
        # Darknet adds delta (= -dL/dz per image) to the gradient; we average over the batch of 2.
        assert torch.allclose(out.grad, -delta / 2, atol=1e-5)


def _xyxy(truths: list[list[tuple[float, float, float, float, int]]]) -> tuple[Tensor, Tensor]:
    m = max(len(t) for t in truths)
    boxes = torch.zeros(len(truths), m, 4)
    labels = torch.full((len(truths), m), -1)
    for b, image in enumerate(truths):
        for k, (cx, cy, w, h, cls) in enumerate(image):
            boxes[b, k] = torch.tensor([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
            labels[b, k] = cls
    return boxes, labels


def test_darknet_preset_tx_from_the_exact_centre() -> None:
    # A small object whose grid position 1.25 + 0.49/65536 (4x4 grid) is as far as can be from
    # a multiple of 1/65536 of a cell: snapping it before tx = gx - gi moved tx by 7.5e-6,
    # times Darknet's 2 - w h = 1.9997 = 1.5e-5 on the gradient of a batch of one.
    cx = (1.25 + 0.49 / 65536) / 4
    truths = [[(cx, 0.4, 0.02, 0.015, 1)]]  # best anchor (0.1, 0.15) at 4x4
    raw = [0.5 * torch.randn(1, 2, h, w, 5 + DN_CLASSES, generator=torch.Generator().manual_seed(3)) for h, w in DN_GRIDS]
    expected = darknet_deltas(raw, truths)
    boxes, labels = _xyxy(truths)
    outputs = [r.clone().requires_grad_(True) for r in raw]
    YOLOv3Loss(DN_ANCHORS, DN_CLASSES, preset="darknet")(outputs, boxes, labels)["total"].backward()
    assert expected[1][0, 0, 1, 1, 0] != 0  # the object is where we think
    for out, delta in zip(outputs, expected):
        assert torch.allclose(out.grad, -delta, atol=1e-5, rtol=0)


def test_darknet_preset_collision_keeps_both_classes() -> None:
    # Two objects, classes 0 then 2, on the same cell (row 1, column 1 of the 4x4 grid) and the
    # same best anchor (0.1, 0.15): Darknet's box target is the later object's, its class
    # target at the slot is multi-hot [1, 0, 1].
    truths = [[(0.30, 0.30, 0.10, 0.14, 0), (0.32, 0.33, 0.11, 0.16, 2)]]
    raw = [0.5 * torch.randn(1, 2, h, w, 5 + DN_CLASSES, generator=torch.Generator().manual_seed(4)) for h, w in DN_GRIDS]
    expected = darknet_deltas(raw, truths)
    boxes, labels = _xyxy(truths)
    loss = YOLOv3Loss(DN_ANCHORS, DN_CLASSES, preset="darknet")
    assert loss.class_collisions == "union"
    outputs = [r.clone().requires_grad_(True) for r in raw]
    loss(outputs, boxes, labels)["total"].backward()
    slot = raw[1][0, 0, 1, 1]
    # By hand: dBCE/dz = sigmoid(z) - target with target [1, 0, 1].
    hand = torch.sigmoid(slot[5:]) - torch.tensor([1.0, 0.0, 1.0])
    assert torch.allclose(outputs[1].grad[0, 0, 1, 1, 5:], hand, atol=1e-6)
    for out, delta in zip(outputs, expected):
        assert torch.allclose(out.grad, -delta, atol=1e-5, rtol=0)
    # The default keeps the later object's class alone (one-hot [0, 0, 1]).
    outputs = [r.clone().requires_grad_(True) for r in raw]
    YOLOv3Loss(DN_ANCHORS, DN_CLASSES, xy_loss="bce")(outputs, boxes, labels)["total"].backward()
    one_hot = torch.sigmoid(slot[5:]) - torch.tensor([0.0, 0.0, 1.0])
    assert torch.allclose(outputs[1].grad[0, 0, 1, 1, 5:], one_hot, atol=1e-6)


# --------------------------------------------------------------------------- precision and training
class StandIn(nn.Module):
    """A small backbone following the contract: maps at strides 8, 16, 32 (finest first)."""

    def __init__(self) -> None:
        super().__init__()
        self.out_channels = [16, 24, 32]
        self.strides = [8, 16, 32]
        self.c8 = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=4, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 16, 3, stride=2, padding=1),
        )
        self.c16 = nn.Conv2d(16, 24, 3, stride=2, padding=1)
        self.c32 = nn.Conv2d(24, 32, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> list[Tensor]:
        a = torch.relu(self.c8(x))
        b = torch.relu(self.c16(a))
        return [a, b, torch.relu(self.c32(b))]


TINY_ANCHORS = [
    torch.tensor([[0.6, 0.5], [0.4, 0.7]]),
    torch.tensor([[0.25, 0.2], [0.15, 0.3]]),
    torch.tensor([[0.08, 0.1], [0.12, 0.06]]),
]


def _tiny_batch() -> tuple[Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 128, 128, generator=gen)
    boxes = torch.tensor([[[0.1, 0.1, 0.6, 0.5], [0.6, 0.6, 0.7, 0.75]], [[0.3, 0.2, 0.5, 0.9], [0, 0, 0, 0]]])
    labels = torch.tensor([[0, 2], [1, -1]])
    return images, boxes, labels


def test_loss_is_fp32_under_bf16_autocast() -> None:
    outputs = [0.3 * torch.randn(2, 2, s, s, 8, generator=torch.Generator().manual_seed(s)) for s in (4, 8, 16)]
    _, boxes, labels = _tiny_batch()
    loss = YOLOv3Loss(TINY_ANCHORS, 3)
    reference = loss(outputs, boxes, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = loss([o.bfloat16() for o in outputs], boxes, labels)
    assert all(v.dtype == torch.float32 for v in terms.values())
    assert terms["total"].item() == pytest.approx(reference["total"].item(), rel=2e-2)


def test_loss_backpropagates_and_decreases_with_sgd() -> None:
    torch.manual_seed(0)
    backbone = StandIn()
    model = YOLOv3(backbone, YOLOv3Head(backbone.out_channels, [2, 2, 2], 3, width=1 / 16))
    loss = YOLOv3Loss(TINY_ANCHORS, 3, assign_mode="per_scale")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images, boxes, labels = _tiny_batch()
    history = []
    for _ in range(15):
        terms = loss(model(images), boxes, labels)
        optimizer.zero_grad()
        terms["total"].backward()
        optimizer.step()
        history.append(terms["total"].item())
    assert all(math.isfinite(v) for v in history)
    assert history[-1] < 0.5 * history[0]
