"""YOLOv1: backbones, head, targets, the five loss terms, decoding and post-processing.

The loss is checked against a case computed by hand (S = 2, B = 2, C = 2); every expected
number below is written out from the paper's formulas (section 2.2), not from the code.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from onestage.assign.yolov1 import NO_OBJECT, build_yolov1_targets
from onestage.coders import yolov1_cell_encode
from onestage.losses.yolov1 import YOLOv1Loss, responsible_predictors
from onestage.models.backbones.base import Backbone, BackboneWeightsError
from onestage.models.backbones.tiny import TinyBackbone
from onestage.models.backbones.yolov1_net import YOLOv1PaperBackbone
from onestage.models.heads.yolov1 import YOLOv1, YOLOv1ConvHead, YOLOv1Head
from onestage.postprocess import batched_nms
from onestage.coders import yolov1_cell_decode
from onestage.postprocess.yolov1 import YOLOv1PostProcessor, decode_yolov1


def logit(p: float) -> float:
    return math.log(p / (1.0 - p))


def cell(preds: list[tuple[float, float, float, float, float]], class_probs: list[float]) -> list[float]:
    """Raw values of one cell from the activated values we want: per predictor
    (x, y, sqrt w, sqrt h, conf) through the sigmoid's inverse, classes as log-probabilities
    (softmax of log p is p)."""
    raw = [logit(v) for pred in preds for v in pred]
    return raw + [math.log(p) for p in class_probs]


# ----------------------------------------------------------------------------- the hand case
# S = 2, B = 2, C = 2, one image, two objects.
# A: class 0, xyxy (0.12, 0.12, 0.28, 0.48): centre (0.2, 0.3) -> cell (row 0, col 0),
#    offsets (0.4, 0.6), w = 0.16, h = 0.36 (sqrt: 0.4, 0.6).
# B: class 1, xyxy (0.625, 0.625, 0.875, 0.875): centre (0.75, 0.75) -> cell (1, 1),
#    offsets (0.5, 0.5), w = h = 0.25 (sqrt: 0.5, 0.5).
GT_BOXES = torch.tensor([[[0.12, 0.12, 0.28, 0.48], [0.625, 0.625, 0.875, 0.875], [0.0, 0.0, 0.0, 0.0]]])
GT_LABELS = torch.tensor([[0, 1, -1]])  # third row is padding

# Cell (0, 0), object A:
#   predictor 0: x 0.9, y 0.9, sqrt w = sqrt h = 0.5 -> centre (0.45, 0.45), 0.25 x 0.25:
#     xyxy (0.325, 0.325, 0.575, 0.575), no overlap with A (A ends at x = 0.28): IoU 0.
#   predictor 1: x 0.5, y 0.3, 0.25 x 0.25 -> centre (0.25, 0.15): xyxy (0.125, 0.025, 0.375, 0.275).
#     Overlap with A: x [0.125, 0.28] = 0.155, y [0.12, 0.275] = 0.155.
#     IoU = 0.155^2 / (0.16 * 0.36 + 0.0625 - 0.155^2) = 0.024025 / 0.096075.
#   -> the SECOND predictor is responsible; the first one is a "noobj" predictor.
IOU_A = 0.024025 / 0.096075
CELL_00 = cell([(0.9, 0.9, 0.5, 0.5, 0.3), (0.5, 0.3, 0.5, 0.5, 0.6)], [0.7, 0.3])
# Cells (0, 1) and (1, 0): empty; only their confidences (0.1, 0.2) and (0.3, 0.4) count.
CELL_01 = cell([(0.2, 0.7, 0.9, 0.1, 0.1), (0.6, 0.6, 0.3, 0.8, 0.2)], [0.9, 0.1])
CELL_10 = cell([(0.3, 0.3, 0.3, 0.3, 0.3), (0.8, 0.2, 0.7, 0.6, 0.4)], [0.5, 0.5])
# Cell (1, 1), object B:
#   predictor 0: x 0.6, y 0.5, 0.25 x 0.25 -> centre (0.8, 0.75): xyxy (0.675, 0.625, 0.925, 0.875).
#     Overlap with B: 0.2 x 0.25 = 0.05; union 0.0625 * 2 - 0.05 = 0.075; IoU 2/3.
#   predictor 1: x 0.1, y 0.1, sqrt w = sqrt h = 0.1 -> centre (0.55, 0.55), 0.01 x 0.01: IoU 0.
IOU_B = 2.0 / 3.0
CELL_11 = cell([(0.6, 0.5, 0.5, 0.5, 0.8), (0.1, 0.1, 0.1, 0.1, 0.2)], [0.4, 0.6])
OUTPUTS = torch.tensor([[[CELL_00, CELL_01], [CELL_10, CELL_11]]])  # (1, 2, 2, 12)

EXPECTED = {
    # 5 * [A: (0.5 - 0.4)^2 + (0.3 - 0.6)^2  +  B: (0.6 - 0.5)^2 + (0.5 - 0.5)^2]
    "coord_xy": 5.0 * (0.01 + 0.09 + 0.01 + 0.0),
    # 5 * [A: (0.5 - sqrt 0.16)^2 + (0.5 - sqrt 0.36)^2  +  B: (0.5 - 0.5)^2 + (0.5 - 0.5)^2]
    "coord_wh": 5.0 * (0.01 + 0.01 + 0.0 + 0.0),
    # responsible confidences 0.6 (A) and 0.8 (B) against their IoUs
    "obj": (0.6 - IOU_A) ** 2 + (0.8 - IOU_B) ** 2,
    # 0.5 * [cell (0,0) pred 0: 0.3^2, cell (1,1) pred 1: 0.2^2, empty cells: 0.1^2 + 0.2^2 + 0.3^2 + 0.4^2]
    "noobj": 0.5 * (0.09 + 0.04 + 0.01 + 0.04 + 0.09 + 0.16),
    # A (class 0): (0.7 - 1)^2 + (0.3 - 0)^2; B (class 1): (0.4 - 0)^2 + (0.6 - 1)^2
    "cls": (0.09 + 0.09) + (0.16 + 0.16),
}


def hand_loss(conf_target: str = "iou") -> YOLOv1Loss:
    return YOLOv1Loss(S=2, B=2, num_classes=2, conf_target=conf_target)


@pytest.mark.parametrize("term", ["coord_xy", "coord_wh", "obj", "noobj", "cls"])
def test_loss_terms_match_hand_computation(term: str) -> None:
    losses = hand_loss()(OUTPUTS, GT_BOXES, GT_LABELS)
    assert losses[term].item() == pytest.approx(EXPECTED[term], abs=1e-5)


def test_loss_total_keys_and_conf_target_one() -> None:
    losses = hand_loss()(OUTPUTS, GT_BOXES, GT_LABELS)
    assert set(losses) == {"coord_xy", "coord_wh", "obj", "noobj", "cls", "total"}
    assert losses["total"].item() == pytest.approx(sum(EXPECTED.values()), abs=1e-5)
    one = hand_loss("one")(OUTPUTS, GT_BOXES, GT_LABELS)
    assert one["obj"].item() == pytest.approx((0.6 - 1.0) ** 2 + (0.8 - 1.0) ** 2, abs=1e-5)
    assert one["noobj"].item() == pytest.approx(EXPECTED["noobj"], abs=1e-5)


def test_loss_is_divided_by_the_batch_size() -> None:
    # The same image twice: every sum doubles and so does N, so each term is unchanged.
    outputs = OUTPUTS.repeat(2, 1, 1, 1)
    losses = hand_loss()(outputs, GT_BOXES.repeat(2, 1, 1), GT_LABELS.repeat(2, 1))
    for term, value in EXPECTED.items():
        assert losses[term].item() == pytest.approx(value, abs=1e-5)


def test_responsible_predictor_is_highest_iou_ties_to_lowest_index() -> None:
    iou = torch.tensor([[[[0.2, 0.7], [0.5, 0.5]], [[0.0, 0.0], [0.9, 0.1]]]])  # (1, 2, 2, 2)
    obj = torch.tensor([[[True, True], [True, False]]])
    resp = responsible_predictors(iou, obj)
    expected = torch.tensor([[[[False, True], [True, False]], [[True, False], [False, False]]]])
    assert torch.equal(resp, expected)


def test_second_predictor_responsible_in_the_loss() -> None:
    # In the hand case predictor 1 of cell (0, 0) is responsible (IoU 0.25 against 0). Had
    # predictor 0 (x 0.9, y 0.9) been chosen, coord_xy would be
    # 5 * [(0.9 - 0.4)^2 + (0.9 - 0.6)^2 + 0.01] = 1.75 instead of 0.55.
    losses = hand_loss()(OUTPUTS, GT_BOXES, GT_LABELS)
    assert losses["coord_xy"].item() == pytest.approx(0.55, abs=1e-5)
    # Swapping the two predictors of that cell moves responsibility with them: the loss is
    # invariant to predictor order within a cell.
    swapped = OUTPUTS.clone()
    swapped[0, 0, 0, 0:5], swapped[0, 0, 0, 5:10] = OUTPUTS[0, 0, 0, 5:10], OUTPUTS[0, 0, 0, 0:5]
    b = hand_loss()(swapped, GT_BOXES, GT_LABELS)
    for term, value in EXPECTED.items():
        assert b[term].item() == pytest.approx(value, abs=1e-5)


def test_sqrt_width_is_safe_for_negative_and_zero_raw_widths() -> None:
    outputs = torch.zeros(1, 2, 2, 12)
    outputs[..., 2:4] = -1e4  # predictor 0 everywhere: sqrt w = sigmoid(-1e4) = 0, so w = 0
    outputs[0, 1, 1, 2:4] = 1e4  # cell (1, 1), predictor 0: sqrt w = 1, saturated the other way
    outputs.requires_grad_(True)
    # Object 1 has width 0 (sqrt of the target = 0); object 2 is 0.3 x 0.3.
    boxes = torch.tensor([[[0.1, 0.1, 0.1, 0.4], [0.6, 0.6, 0.9, 0.9]]])
    labels = torch.tensor([[0, 1]])
    losses = hand_loss()(outputs, boxes, labels)
    losses["total"].backward()
    assert all(torch.isfinite(v) for v in losses.values())
    assert torch.isfinite(outputs.grad).all()
    # Object 1, cell (0, 0): both IoUs are 0 (a zero-width truth), tie -> predictor 0 with
    # sqrt w = sqrt h = 0: (0 - 0)^2 + (0 - sqrt 0.3)^2.
    # Object 2, cell (1, 1): predictor 0 is 1 x 1 around (0.75, 0.75), IoU 0.09; predictor 1
    # (raw 0) is 0.25 x 0.25 inside the truth, IoU 0.0625 / 0.09: it is responsible,
    # 2 * (0.5 - sqrt 0.3)^2.
    expected = 5.0 * (0.3 + 2 * (0.5 - math.sqrt(0.3)) ** 2)
    assert losses["coord_wh"].item() == pytest.approx(expected, abs=1e-5)


# ----------------------------------------------------------------------------- targets
def test_targets_cells_offsets_and_padding() -> None:
    t = build_yolov1_targets(GT_BOXES, GT_LABELS, S=2, num_classes=2)
    assert torch.equal(t.gt_index, torch.tensor([[[0, NO_OBJECT], [NO_OBJECT, 1]]]))
    assert torch.equal(t.labels, torch.tensor([[[0, NO_OBJECT], [NO_OBJECT, 1]]]))
    assert torch.equal(t.obj, torch.tensor([[[True, False], [False, True]]]))
    torch.testing.assert_close(t.cell_boxes[0, 0, 0], torch.tensor([0.4, 0.6, 0.16, 0.36]))
    torch.testing.assert_close(t.cell_boxes[0, 1, 1], torch.tensor([0.5, 0.5, 0.25, 0.25]))
    torch.testing.assert_close(t.class_one_hot[0, 0, 0], torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(t.class_one_hot[0, 1, 1], torch.tensor([0.0, 1.0]))
    assert t.class_one_hot[0, 0, 1].sum() == 0 and t.cell_boxes[0, 1, 0].abs().sum() == 0


def test_two_objects_in_one_cell_largest_wins_then_first() -> None:
    # S = 2: both centres in cell (0, 0). The second object is larger: it wins.
    boxes = torch.tensor([[[0.1, 0.1, 0.2, 0.2], [0.0, 0.0, 0.4, 0.4]], [[0.1, 0.1, 0.3, 0.3], [0.2, 0.2, 0.4, 0.4]]])
    labels = torch.tensor([[0, 2], [1, 2]])  # image 1: equal areas -> the first (class 1)
    t = build_yolov1_targets(boxes, labels, S=2, num_classes=3)
    assert t.gt_index[0, 0, 0].item() == 1 and t.labels[0, 0, 0].item() == 2
    assert t.gt_index[1, 0, 0].item() == 0 and t.labels[1, 0, 0].item() == 1
    assert int(t.obj.sum()) == 2  # one object per image survives


def test_centre_on_the_edge_goes_to_the_last_cell() -> None:
    boxes = torch.tensor([[0.9, 0.9, 1.1, 1.1], [0.4, 0.3, 0.6, 0.7]])  # centres (1, 1), (0.5, 0.5)
    row, col, enc = yolov1_cell_encode(boxes, S=2)
    assert row.tolist() == [1, 1] and col.tolist() == [1, 1]
    torch.testing.assert_close(enc, torch.tensor([[1.0, 1.0, 0.2, 0.2], [0.0, 0.0, 0.2, 0.4]]))


def test_cell_encode_decode_round_trip() -> None:
    g = torch.Generator().manual_seed(0)
    xy1 = torch.rand(2, 5, 2, generator=g) * 0.6
    boxes = torch.cat((xy1, xy1 + 0.05 + torch.rand(2, 5, 2, generator=g) * 0.35), dim=-1)  # (2, 5, 4)
    labels = torch.zeros(2, 5, dtype=torch.int64)
    t = build_yolov1_targets(boxes, labels, S=7, num_classes=1)
    decoded = yolov1_cell_decode(t.cell_boxes[..., None, :])[..., 0, :]  # (2, 7, 7, 4)
    torch.testing.assert_close(decoded[t.obj], t.boxes_xyxy[t.obj], atol=1e-6, rtol=0)
    kept = t.gt_index[t.obj]  # which objects hold a cell
    assert torch.equal(t.boxes_xyxy[t.obj], boxes[t.obj.nonzero()[:, 0], kept])


# ----------------------------------------------------------------------------- decoding
def decode_case() -> torch.Tensor:
    """S = 2, B = 2, C = 3: every confidence ~0 except cell (row 1, col 0), predictor 1:
    x 0.25, y 0.75, sqrt w 0.5, sqrt h 0.4, conf 0.9; class probs (0.1, 0.7, 0.2)."""
    outputs = torch.zeros(1, 2, 2, 13)
    outputs[..., 4] = outputs[..., 9] = -20.0  # conf ~ 2e-9
    outputs[0, 1, 0] = torch.tensor(cell([(0.5, 0.5, 0.5, 0.5, 1e-9), (0.25, 0.75, 0.5, 0.4, 0.9)], [0.1, 0.7, 0.2]))
    return outputs


def test_decode_hand_set_output() -> None:
    boxes, conf, probs = decode_yolov1(decode_case(), B=2, num_classes=3)
    assert boxes.shape == (1, 8, 4) and conf.shape == (1, 8) and probs.shape == (1, 4, 3)
    # candidate (i * S + j) * B + b = (1 * 2 + 0) * 2 + 1 = 5; centre ((0 + 0.25) / 2, (1 + 0.75) / 2)
    # = (0.125, 0.875), size (0.25, 0.16): xyxy (0.0, 0.795, 0.25, 0.955).
    torch.testing.assert_close(boxes[0, 5], torch.tensor([0.0, 0.795, 0.25, 0.955]))
    assert conf[0, 5].item() == pytest.approx(0.9, abs=1e-6)
    torch.testing.assert_close(probs[0, 2], torch.tensor([0.1, 0.7, 0.2]))
    # cell (0, 0), predictor 0 (raw 0): centre (0.25, 0.25), 0.25 x 0.25.
    torch.testing.assert_close(boxes[0, 0], torch.tensor([0.125, 0.125, 0.375, 0.375]))


def test_postprocessor_scores_are_conf_times_class_prob() -> None:
    post = YOLOv1PostProcessor(S=2, B=2, num_classes=3, score_threshold=0.001)
    (det,) = post(decode_case())
    # The same box for the three classes (different classes never suppress each other):
    # scores 0.9 * (0.7, 0.2, 0.1); every other candidate scores < 1e-8 < 0.001.
    assert det.labels.tolist() == [1, 2, 0]
    torch.testing.assert_close(det.scores, torch.tensor([0.63, 0.18, 0.09]))
    torch.testing.assert_close(det.boxes, torch.tensor([[0.0, 0.795, 0.25, 0.955]] * 3))


def test_postprocessor_nms_and_agreement_with_batched_nms() -> None:
    # Cell (0, 0)'s two predictors: the same box, confidences 0.9 and 0.8, one class:
    # NMS keeps only the first.
    outputs = torch.full((1, 2, 2, 11), -20.0)
    outputs[0, 0, 0] = torch.tensor(cell([(0.5, 0.5, 0.5, 0.5, 0.9), (0.5, 0.5, 0.5, 0.5, 0.8)], [0.999999]))
    (det,) = YOLOv1PostProcessor(S=2, B=2, num_classes=1)(outputs)
    assert len(det) == 1 and det.scores.item() == pytest.approx(0.9 * 0.999999, abs=1e-6)

    # Random outputs: the batched path equals per-image batched_nms on the same candidates.
    g = torch.Generator().manual_seed(1)
    outputs = torch.randn(3, 7, 7, 13, generator=g) * 2
    post = YOLOv1PostProcessor(S=7, B=2, num_classes=3, score_threshold=0.05, nms_iou=0.45, max_detections=100)
    dets = post(outputs)
    boxes, conf, probs = decode_yolov1(outputs, B=2, num_classes=3)
    scores = conf[..., None] * probs.repeat_interleave(2, dim=1)  # (3, 98, 3)
    for i, det in enumerate(dets):
        flat = scores[i].reshape(-1)
        cand = (flat >= 0.05).nonzero()[:, 0]
        b = boxes[i].clamp(0, 1)[cand // 3]
        keep = batched_nms(b, flat[cand], cand % 3, 0.45)[:100]
        torch.testing.assert_close(det.scores, flat[cand][keep])
        assert torch.equal(det.labels, (cand % 3)[keep])
        torch.testing.assert_close(det.boxes, b[keep])


# ----------------------------------------------------------------------------- models
def test_paper_backbone_and_head_shape_at_448() -> None:
    backbone = YOLOv1PaperBackbone()
    assert isinstance(backbone, Backbone)
    assert sum(isinstance(m, nn.Conv2d) for m in backbone.modules()) == 24
    assert backbone.out_channels == [1024] and backbone.strides == [64]
    # hidden=64 instead of the paper's 4096 only to keep the test light (fc1 would hold 205 M weights).
    model = YOLOv1(backbone, YOLOv1Head(1024, S=7, B=2, num_classes=20, hidden=64)).eval()
    with torch.no_grad():
        out = model(torch.zeros(1, 3, 448, 448))
    assert out.shape == (1, 7, 7, 30)
    boxes, conf, probs = decode_yolov1(out, B=2, num_classes=20)
    assert boxes.shape == (1, 98, 4) and conf.shape == (1, 98) and probs.shape == (1, 49, 20)
    with pytest.raises(BackboneWeightsError):
        backbone.load_torchvision_weights({})


def test_tiny_backbone_contract() -> None:
    backbone = TinyBackbone()
    maps = backbone(torch.zeros(2, 3, 112, 112))
    assert backbone.out_channels == [64, 128, 256] and backbone.strides == [8, 16, 32]
    assert [tuple(m.shape) for m in maps] == [(2, 64, 14, 14), (2, 128, 7, 7), (2, 256, 4, 4)]


def test_head_pools_to_the_grid_and_returns_one_raw_tensor_in_both_modes() -> None:
    torch.manual_seed(0)
    backbone = TinyBackbone(channels=(8, 16, 32), num_outputs=1)  # 8x8 map at 64: pooled to 3x3
    model = YOLOv1(backbone, YOLOv1Head(32, S=3, B=2, num_classes=2, hidden=16, dropout=0.0))
    x = torch.randn(2, 3, 64, 64)
    train_out = model.train()(x)
    eval_out = model.eval()(x)
    assert train_out.shape == eval_out.shape == (2, 3, 3, 12)
    assert (model.S, model.B, model.num_classes) == (3, 2, 2)
    with pytest.raises(ValueError, match="5B \\+ C"):
        YOLOv1Loss(S=3, B=2, num_classes=3)(eval_out, GT_BOXES.repeat(2, 1, 1), GT_LABELS.repeat(2, 1))


def test_sgd_steps_on_a_fixed_batch_reduce_the_loss() -> None:
    torch.manual_seed(0)
    backbone = TinyBackbone(channels=(8, 16, 32, 64, 128))  # last map: 128 x 4 x 4 at 112
    model = YOLOv1(backbone, YOLOv1Head(128, S=7, B=2, num_classes=3, hidden=64, dropout=0.0))
    criterion = YOLOv1Loss(S=7, B=2, num_classes=3)
    images = torch.randn(2, 3, 112, 112)
    boxes = torch.tensor([[[0.1, 0.2, 0.5, 0.6], [0.6, 0.5, 0.9, 0.95]], [[0.3, 0.3, 0.7, 0.8], [0.0, 0.0, 0.0, 0.0]]])
    labels = torch.tensor([[0, 2], [1, -1]])
    # lr 1e-3: the loss sums over all 98 predictors of an image, so its gradients are large
    # (the paper also starts at 1e-3); 1e-2 without warmup saturates the sigmoids here.
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    history = []
    for _ in range(30):
        losses = criterion(model(images), boxes, labels)
        optimizer.zero_grad()
        losses["total"].backward()
        optimizer.step()
        history.append({k: v.item() for k, v in losses.items()})
    assert history[-1]["total"] < 0.2 * history[0]["total"]
    # Not only the easy "noobj" term: the boxes move towards their targets too.
    coord = [h["coord_xy"] + h["coord_wh"] for h in history]
    assert coord[-1] < 0.5 * coord[0]


def test_conv_head_same_layout_and_shares_weights_across_cells() -> None:
    torch.manual_seed(0)
    backbone = TinyBackbone(channels=(8, 16, 32), num_outputs=1)  # 8x8 map at 64: pooled to 3x3
    head = YOLOv1ConvHead(32, S=3, B=2, num_classes=2, hidden=16)
    model = YOLOv1(backbone, head).eval()
    out = model(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 3, 3, 12)  # the same (N, S, S, 5B + C) as the paper's head
    # One predictor for every cell: a constant feature map gives the same values in every
    # interior cell (the 3x3 conv's zero padding only changes the border cells).
    feats = torch.ones(1, 32, 5, 5)
    const = YOLOv1ConvHead(32, S=5, B=2, num_classes=2, hidden=16).eval()([feats])
    interior = const[0, 1:4, 1:4].reshape(-1, 12)
    assert torch.allclose(interior, interior[:1].expand_as(interior))
    # Its raw outputs start near 0, as the paper head's: boxes at w = h = 0.25, conf 0.5.
    assert out.abs().max() < 0.5


def test_config_chooses_the_yolov1_head() -> None:
    from onestage.build import build_detector
    from onestage.config import load_config

    base = ["model.arch=yolov1", "model.backbone=tiny", "model.input_size=128", "model.yolov1.hidden=16"]
    conv = build_detector(load_config(None, [*base, "model.yolov1.head=conv"]), ["a", "b"])
    fc = build_detector(load_config(None, base), ["a", "b"])
    assert isinstance(conv.model.head, YOLOv1ConvHead) and isinstance(fc.model.head, YOLOv1Head)
    x = torch.randn(1, 3, 128, 128)
    assert conv.model.eval()(x).shape == fc.model.eval()(x).shape == (1, 7, 7, 12)


# ----------------------------------------------------------------------------- preset: darknet
def _box_iou_cxcywh(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    """Darknet's box_iou on (x, y, w, h) centre boxes (box.c: overlap, box_intersection, box_union)."""
    def overlap(x1: float, w1: float, x2: float, w2: float) -> float:
        return min(x1 + w1 / 2, x2 + w2 / 2) - max(x1 - w1 / 2, x2 - w2 / 2)

    w, h = overlap(a[0], a[2], b[0], b[2]), overlap(a[1], a[3], b[1], b[3])
    inter = 0.0 if w < 0 or h < 0 else w * h
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def darknet_detection_deltas(raw: torch.Tensor, truths: list[dict], S: int, B: int, C: int) -> tuple[np.ndarray, np.ndarray]:
    """A transcription of Darknet's forward_detection_layer (detection_layer.c) with yolov1.cfg's
    softmax=0 sqrt=1 rescore=1 forced=0, coord_scale 5, noobject_scale .5, object_scale 1,
    class_scale 1, in onestage's layout. ``truths[b]`` maps (row, col) -> (x, y, w, h, class)
    with x, y the offsets in the cell (Darknet's truth after fill_truth_region).
    Returns l.delta (N, S, S, 5B + C) and the matching per-entry scale."""
    out = raw.double().numpy()
    delta = np.zeros_like(out)
    scale = np.ones_like(out)
    for b in range(out.shape[0]):
        for row in range(S):
            for col in range(S):
                o = out[b, row, col]
                for j in range(B):
                    delta[b, row, col, 5 * j + 4] = 0.5 * (0 - o[5 * j + 4])
                    scale[b, row, col, 5 * j + 4] = 0.5
                if (row, col) not in truths[b]:
                    continue
                tx, ty, tw, th, cls = truths[b][(row, col)]
                for c in range(C):
                    delta[b, row, col, 5 * B + c] = (1.0 if c == cls else 0.0) - o[5 * B + c]
                truth = (tx / S, ty / S, tw, th)
                best_index, best_iou, best_rmse = -1, 0.0, 20.0
                for j in range(B):
                    x, y, sw, sh = o[5 * j : 5 * j + 4]
                    box = (x / S, y / S, sw * sw, sh * sh)
                    iou = _box_iou_cxcywh(box, truth)
                    rmse = math.sqrt(sum((p - q) ** 2 for p, q in zip(box, truth)))
                    if best_iou > 0 or iou > 0:
                        if iou > best_iou:
                            best_iou, best_index = iou, j
                    elif rmse < best_rmse:
                        best_rmse, best_index = rmse, j
                j = best_index
                x, y, sw, sh, conf = o[5 * j : 5 * j + 5]
                iou = _box_iou_cxcywh((x / S, y / S, sw * sw, sh * sh), truth)
                delta[b, row, col, 5 * j + 4] = 1.0 * (iou - conf)  # rescore
                scale[b, row, col, 5 * j + 4] = 1.0
                for k, target in enumerate((tx, ty, math.sqrt(tw), math.sqrt(th))):
                    delta[b, row, col, 5 * j + k] = 5.0 * (target - o[5 * j + k])
                    scale[b, row, col, 5 * j + k] = 5.0
    return delta, scale


def test_darknet_preset_equals_darknet_detection_layer() -> None:
    S, B, C = 3, 2, 3
    truths = [
        {(1, 1): (0.5, 0.5, 0.3, 0.4, 1), (2, 0): (0.3, 0.4, 0.15, 0.1, 2)},
        {(0, 2): (0.55, 0.6, 0.2, 0.3, 0)},
    ]
    raw = 0.4 * torch.randn(2, S, S, 5 * B + C, generator=torch.Generator().manual_seed(0))
    # Cell (1, 1) of image 0: two tiny boxes in the cell's top-left corner, neither overlapping
    # the object (IoU 0 and 0); predictor 1 is nearer (RMSE 0.5456 against 0.5496): Darknet makes
    # it responsible, where "ties to the lowest index" would pick predictor 0.
    raw[0, 1, 1, 0:4] = torch.tensor([0.0, 0.0, 0.05, 0.05])
    raw[0, 1, 1, 5:9] = torch.tensor([0.02, 0.02, 0.05, 0.05])
    raw[1, 0, 2, 2] = -0.3  # a negative linear sqrt(w): w = 0.09, as Darknet squares it
    boxes = torch.zeros(2, 2, 4)
    labels = torch.full((2, 2), -1)
    for b, image in enumerate(truths):
        for k, ((row, col), (tx, ty, tw, th, cls)) in enumerate(image.items()):
            cx, cy = (col + tx) / S, (row + ty) / S
            boxes[b, k] = torch.tensor([cx - tw / 2, cy - th / 2, cx + tw / 2, cy + th / 2])
            labels[b, k] = cls
    delta, scale = darknet_detection_deltas(raw, truths, S, B, C)
    assert delta[0, 1, 1, 5] != 0 and delta[0, 1, 1, 0] == 0  # predictor 1 got the box deltas

    loss = YOLOv1Loss(S=S, B=B, num_classes=C, preset="darknet")
    outputs = raw.clone().requires_grad_(True)
    total = loss(outputs, boxes, labels)["total"]
    total.backward()
    n = raw.shape[0]
    # The loss whose gradient is Darknet's -2 delta: sum of scale * (target - output)^2.
    assert total.item() * n == pytest.approx(float((delta**2 / scale).sum()), rel=1e-5)
    np.testing.assert_allclose(outputs.grad.double().numpy() * n, -2 * delta, atol=1e-5)
    # The default keeps its bounded activations and the lowest-index tie rule.
    default = YOLOv1Loss(S=S, B=B, num_classes=C)
    assert default(raw, boxes, labels)["total"].item() != pytest.approx(total.item(), rel=1e-3)


def test_responsible_predictor_rmse_breaks_zero_iou_ties_only() -> None:
    iou = torch.tensor([[[[0.0, 0.0], [0.3, 0.3]]]])  # (1, 1, 2, 2): a zero tie, a positive tie
    rmse = torch.tensor([[[[0.5, 0.2], [0.5, 0.2]]]])
    obj = torch.ones(1, 1, 2, dtype=torch.bool)
    resp = responsible_predictors(iou, obj, rmse)
    # Zero IoUs: the smaller RMSE (predictor 1); equal positive IoUs: the first (Darknet's iou > best_iou).
    assert resp[0, 0, 0].tolist() == [False, True] and resp[0, 0, 1].tolist() == [True, False]
    assert responsible_predictors(iou, obj)[0, 0, 0].tolist() == [True, False]


def test_darknet_preset_decodes_linear_outputs() -> None:
    out = torch.zeros(1, 1, 1, 5 * 1 + 2)
    out[0, 0, 0] = torch.tensor([0.5, 0.5, -0.4, 0.3, 0.8, 0.9, 0.1])  # x, y, sqrt w, sqrt h, conf, classes
    post = YOLOv1PostProcessor(S=1, B=1, num_classes=2, score_threshold=0.05, linear=True)
    det = post(out)[0]
    # centre (0.5, 0.5), w = 0.16, h = 0.09; scores conf x class = 0.72 and 0.08 (no sigmoid, no softmax)
    assert torch.allclose(det.scores, torch.tensor([0.72, 0.08]))
    assert torch.allclose(det.boxes[0], torch.tensor([0.42, 0.455, 0.58, 0.545]), atol=1e-6)
