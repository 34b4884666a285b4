"""YOLOv3 model layout, decoding and post-processing (DESIGN.md section 3, seed 000)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from onestage.anchors import normalize_anchors
from onestage.config import AnchorsConfig
from onestage.models.backbones.darknet53 import Darknet53Backbone
from onestage.models.heads.yolov3 import YOLOv3, YOLOv3Head, objectness_prior
from onestage.postprocess.yolov3 import YOLOv3PostProcessor, decode_yolov3

ANCHORS_416 = normalize_anchors(AnchorsConfig().sizes, 416)


class StandIn(nn.Module):
    """A backbone that follows only the contract: three strided convs, maps at 8, 16, 32."""

    def __init__(self, channels: tuple[int, int, int] = (8, 16, 24)) -> None:
        super().__init__()
        self.out_channels = list(channels)
        self.strides = [8, 16, 32]
        self.stem = nn.Conv2d(3, channels[0], 8, stride=8)
        self.down1 = nn.Conv2d(channels[0], channels[1], 3, stride=2, padding=1)
        self.down2 = nn.Conv2d(channels[1], channels[2], 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> list[Tensor]:
        c8 = torch.relu(self.stem(x))
        c16 = torch.relu(self.down1(c8))
        return [c8, c16, torch.relu(self.down2(c16))]


def tiny_yolo(num_anchors: int = 3, num_classes: int = 4) -> YOLOv3:
    backbone = StandIn()
    return YOLOv3(backbone, YOLOv3Head(backbone.out_channels, [num_anchors] * 3, num_classes, width=1 / 16))


def test_darknet53_yolov3_416_layout_and_parameter_count() -> None:
    backbone = Darknet53Backbone()
    assert backbone.out_channels == [256, 512, 1024] and backbone.strides == [8, 16, 32]
    # Darknet-53 without its classifier: 40,584,928 parameters (52 conv layers + BN).
    assert sum(p.numel() for p in backbone.parameters()) == 40_584_928
    model = YOLOv3(backbone, YOLOv3Head(backbone.out_channels, [3, 3, 3], 80)).eval()
    # yolov3.cfg (416, 80 classes) has 61,949,149 parameters, as Darknet and its ports count them.
    assert sum(p.numel() for p in model.parameters()) == 61_949_149
    assert [conv.out_channels for conv in model.head._final_convs()] == [255, 255, 255]  # 3 * (5 + 80)
    assert model.strides == [32, 16, 8]
    with torch.no_grad():
        outputs = model(torch.zeros(1, 3, 416, 416))
    assert [tuple(o.shape) for o in outputs] == [(1, 3, 13, 13, 85), (1, 3, 26, 26, 85), (1, 3, 52, 52, 85)]
    boxes, obj, cls = decode_yolov3(outputs, ANCHORS_416)
    assert boxes.shape == (1, 10647, 4) and obj.shape == (1, 10647) and cls.shape == (1, 10647, 80)  # 507+2028+8112


def test_darknet53_width_and_blocks() -> None:
    backbone = Darknet53Backbone(width_mult=0.25, blocks=(1, 1, 1, 1, 1))
    assert backbone.out_channels == [64, 128, 256]
    maps = backbone(torch.zeros(1, 3, 100, 100))
    assert [tuple(m.shape[1:]) for m in maps] == [(64, 13, 13), (128, 7, 7), (256, 4, 4)]
    with pytest.raises(ValueError, match="blocks"):
        Darknet53Backbone(blocks=(1, 2, 8, 8))


def test_five_anchors_twenty_classes_is_125_channels() -> None:
    model = tiny_yolo(num_anchors=5, num_classes=20)
    assert [conv.out_channels for conv in model.head._final_convs()] == [125, 125, 125]  # seed 000: 5 * (20 + 5)
    outputs = model(torch.zeros(2, 3, 128, 128))
    assert [tuple(o.shape) for o in outputs] == [(2, 5, 4, 4, 25), (2, 5, 8, 8, 25), (2, 5, 16, 16, 25)]


def test_any_backbone_and_odd_input_sizes() -> None:
    model = tiny_yolo()
    outputs = model(torch.zeros(1, 3, 104, 104))  # 104 / 8 = 13, then 7, then 4 (not a x2 chain)
    assert [tuple(o.shape[2:4]) for o in outputs] == [(4, 4), (7, 7), (13, 13)]
    with pytest.raises(ValueError, match="out_channels"):
        YOLOv3(StandIn(), YOLOv3Head([8, 16, 32], 3, 4))


def test_predictor_channel_layout_is_anchor_major() -> None:
    # Channel a * (5 + C) + k of the 1x1 predictor must land in [:, a, :, :, k] (Darknet entry order).
    model = tiny_yolo(num_anchors=3, num_classes=4).eval()
    for conv in model.head._final_convs():
        nn.init.zeros_(conv.weight)
        with torch.no_grad():
            conv.bias.copy_(torch.arange(conv.out_channels, dtype=torch.float32))
    outputs = model(torch.randn(1, 3, 64, 64))
    for out in outputs:
        assert out[0, 2, 1, 0, 4].item() == 2 * 9 + 4
        assert out[0, 1, 0, 1, 7].item() == 1 * 9 + 7
        assert torch.equal(out[0, :, 0, 0, :], torch.arange(27, dtype=torch.float32).view(3, 9))


def test_objectness_bias_starts_at_the_prior() -> None:
    # 8 objects per 640x640 image: p = 8 / (640 / s)^2 = 0.02, 0.005, 0.00125 at s = 32, 16, 8.
    assert [objectness_prior(s) for s in (32, 16, 8)] == pytest.approx([0.02, 0.005, 0.00125])
    head = YOLOv3Head([8, 16, 24], [3, 3, 3], 4, width=1 / 16)
    for conv, p in zip(head._final_convs(), (0.02, 0.005, 0.00125)):
        bias = conv.bias.view(3, 9)
        assert torch.allclose(torch.sigmoid(bias[:, 4]), torch.full((3,), p))
        assert torch.equal(bias[:, :4], torch.zeros(3, 4)) and torch.equal(bias[:, 5:], torch.zeros(3, 4))


def test_decode_by_hand() -> None:
    # One scale, 2 x 2 grid, one anchor (0.25, 0.5), one class.
    raw = torch.zeros(1, 1, 2, 2, 6)
    raw[0, 0, 1, 0, :4] = torch.tensor([0.0, math.log(3.0), math.log(2.0), 0.0])  # row 1, column 0
    raw[0, 0, 1, 0, 4:] = torch.tensor([2.0, -1.0])
    boxes, obj, cls = decode_yolov3([raw], [torch.tensor([[0.25, 0.5]])])
    # Candidate order: anchor, row, column -> row 1 column 0 is candidate 2.
    # b_x = (sigmoid(0) + 0) / 2 = 0.25, b_y = (sigmoid(log 3) + 1) / 2 = (0.75 + 1) / 2 = 0.875,
    # b_w = 0.25 * 2 = 0.5, b_h = 0.5 -> xyxy (0, 0.625, 0.5, 1.125).
    assert torch.allclose(boxes[0, 2], torch.tensor([0.0, 0.625, 0.5, 1.125]), atol=1e-6)
    # Cell (0, 0) with zero offsets: centre (0.25, 0.25), anchor size.
    assert torch.allclose(boxes[0, 0], torch.tensor([0.125, 0.0, 0.375, 0.5]), atol=1e-6)
    assert obj[0, 2].item() == pytest.approx(1 / (1 + math.exp(-2.0)))
    assert cls[0, 2, 0].item() == pytest.approx(1 / (1 + math.exp(1.0)))


def _one_scale_outputs(cells: dict[tuple[int, int], tuple[float, list[float]]], num_classes: int) -> list[Tensor]:
    """4 x 4 grid, one anchor; cells maps (row, col) -> (objectness logit, class logits);
    every other cell has objectness logit -20 (score ~ 2e-9)."""
    raw = torch.zeros(1, 1, 4, 4, 5 + num_classes)
    raw[..., 4] = -20.0
    raw[..., 5:] = -20.0
    for (j, i), (obj_logit, cls_logits) in cells.items():
        raw[0, 0, j, i, 4] = obj_logit
        raw[0, 0, j, i, 5:] = torch.tensor(cls_logits)
    return [raw]


def test_postprocessor_scores_multilabel_and_nms() -> None:
    anchors = [torch.tensor([[0.75, 0.75]])]  # zero offsets: a 0.75 box around each cell centre
    # (0, 0) and (0, 1) overlap and are both class 0; (0, 0) also scores class 1
    # (multi-label); (3, 3) scores class 1 only.
    outputs = _one_scale_outputs(
        {(0, 0): (3.0, [2.0, 1.0]), (0, 1): (1.0, [2.0, -20.0]), (3, 3): (0.0, [-20.0, 4.0])}, num_classes=2
    )
    post = YOLOv3PostProcessor(anchors, num_classes=2, score_threshold=0.05, nms_iou=0.45)
    (det,) = post(outputs)
    sig = torch.sigmoid
    expected_scores = sorted(
        [
            float(sig(torch.tensor(3.0)) * sig(torch.tensor(2.0))),  # (0,0) class 0: 0.8387
            float(sig(torch.tensor(3.0)) * sig(torch.tensor(1.0))),  # (0,0) class 1: 0.6935
            float(sig(torch.tensor(0.0)) * sig(torch.tensor(4.0))),  # (3,3) class 1: 0.4910
        ],
        reverse=True,
    )
    # (0,1) class 0 (0.6386) is suppressed by (0,0) class 0: the clipped boxes [0, 0, 0.5, 0.5]
    # and [0, 0, 0.75, 0.5] overlap by 0.25 / 0.375 = 0.667 > 0.45.
    assert det.scores.tolist() == pytest.approx(expected_scores, abs=1e-6)
    assert det.labels.tolist() == [0, 1, 1]
    assert torch.allclose(det.boxes[0], torch.tensor([0.0, 0.0, 0.5, 0.5]))  # clipped to the image
    assert torch.allclose(det.boxes[2], torch.tensor([0.5, 0.5, 1.0, 1.0]))

    capped = YOLOv3PostProcessor(anchors, num_classes=2, score_threshold=0.05, max_detections=2)(outputs)[0]
    assert len(capped) == 2 and capped.scores.tolist() == pytest.approx(expected_scores[:2], abs=1e-6)
    strict = YOLOv3PostProcessor(anchors, num_classes=2, score_threshold=0.6)(outputs)[0]
    assert strict.labels.tolist() == [0, 1]  # 0.4910 is below 0.6
    # With an NMS threshold above their IoU (0.667) both class-0 boxes are kept.
    loose = YOLOv3PostProcessor(anchors, num_classes=2, score_threshold=0.05, nms_iou=0.7)(outputs)[0]
    assert len(loose) == 4


def test_postprocessor_batch_and_empty_images() -> None:
    outputs = [torch.cat([_one_scale_outputs({(1, 1): (5.0, [5.0])}, 1)[0], _one_scale_outputs({}, 1)[0]])]
    dets = YOLOv3PostProcessor([torch.tensor([[0.2, 0.2]])], num_classes=1)(outputs)
    assert len(dets) == 2 and len(dets[0]) == 1 and len(dets[1]) == 0
    assert dets[1].boxes.shape == (0, 4) and dets[0].labels.dtype == torch.int64
    with pytest.raises(ValueError, match="num_classes"):
        YOLOv3PostProcessor([torch.tensor([[0.2, 0.2]])], num_classes=3)(outputs)
