"""YOLOv3 assignment against hand-computed cases (DESIGN.md section 3, Darknet yolo_layer.c).

Layout used throughout: input 416, the default anchors (pixels)
    stride 32 (13x13): (116,90) (156,198) (373,326)
    stride 16 (26x26): (30,61) (62,45) (59,119)
    stride 8  (52x52): (10,13) (16,30) (33,23)
Scales are listed coarsest first, as the raw outputs.
"""

from __future__ import annotations

import math

import pytest
import torch

from onestage.anchors import normalize_anchors
from onestage.assign.yolov3 import assign_yolov3
from onestage.config import AnchorsConfig
from onestage.coders import yolov3_decode_boxes

SIZE = 416
ANCHORS = normalize_anchors(AnchorsConfig().sizes, SIZE)
GRIDS = [(13, 13), (26, 26), (52, 52)]


def px_box(cx: float, cy: float, w: float, h: float) -> list[float]:
    """A box given by centre and size in pixels at 416 -> xyxy normalized."""
    return [(cx - w / 2) / SIZE, (cy - h / 2) / SIZE, (cx + w / 2) / SIZE, (cy + h / 2) / SIZE]


def batch_of(*images: list[tuple[list[float], int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Images given as lists of (box, label) -> padded (B, M, 4), (B, M)."""
    m = max(1, max(len(img) for img in images))
    boxes = torch.zeros(len(images), m, 4)
    labels = torch.full((len(images), m), -1, dtype=torch.int64)
    for b, img in enumerate(images):
        for j, (box, label) in enumerate(img):
            boxes[b, j] = torch.tensor(box)
            labels[b, j] = label
    return boxes, labels


def far_predictions(batch: int) -> list[torch.Tensor]:
    """Predictions that overlap nothing: a tiny box in the bottom-right corner everywhere."""
    return [torch.tensor([0.99, 0.99, 1.0, 1.0]).expand(batch, 3, h, w, 4).clone() for h, w in GRIDS]


def positives(targets) -> list[tuple[int, int, int, int, int]]:
    """All (scale, b, a, row, col) with obj_mask set."""
    found = []
    for s, t in enumerate(targets):
        for b, a, j, i in torch.nonzero(t.obj_mask).tolist():
            found.append((s, b, a, j, i))
    return found


# The object of the brief: centre (200, 150) px, size (120, 90) px.
OBJECT = px_box(200, 150, 120, 90)
# Width/height IoU of (120, 90) with each anchor, by hand (inter / union, both at the origin):
#   (116,90): 10440 / 10800 = 0.967   <- best of all nine (stride 32, anchor 0)
#   (156,198): 10800 / 30888 = 0.350   (373,326): 10800 / 121598 = 0.089
#   (30,61): 0.169  (62,45): 0.258  (59,119): 5310 / 12511 = 0.424  <- best at stride 16 (anchor 2)
#   (10,13): 0.012  (16,30): 0.044  (33,23): 759 / 10800 = 0.070   <- best at stride 8 (anchor 2)


def test_global_mode_one_object_one_positive() -> None:
    boxes, labels = batch_of([(OBJECT, 7)])
    targets = assign_yolov3(
        boxes, labels, ANCHORS, GRIDS, mode="global", ignore_by="prediction", pred_boxes=far_predictions(1)
    )
    assert positives(targets) == [(0, 0, 0, 4, 6)]  # stride 32: col 200/32 = 6.25, row 150/32 = 4.6875
    t = targets[0]
    assert t.tx[0, 0, 4, 6].item() == pytest.approx(0.25, abs=1e-5)
    assert t.ty[0, 0, 4, 6].item() == pytest.approx(0.6875, abs=1e-5)
    assert t.tw[0, 0, 4, 6].item() == pytest.approx(math.log(120 / 116), abs=1e-5)  # 0.033902
    assert t.th[0, 0, 4, 6].item() == pytest.approx(0.0, abs=1e-5)  # log(90 / 90)
    assert t.tcls[0, 0, 4, 6].item() == 7
    assert t.gt_index[0, 0, 4, 6].item() == 0
    assert torch.allclose(t.tbox[0, 0, 4, 6], torch.tensor(OBJECT), atol=1e-6)
    # Everything else is a negative (the far predictions ignore nothing); -1 / 0 elsewhere.
    for s, tt in enumerate(targets):
        assert torch.equal(tt.noobj_mask, ~tt.obj_mask)
        assert int((tt.tcls >= 0).sum()) == (1 if s == 0 else 0)
        assert float(tt.tx[~tt.obj_mask].abs().sum()) == 0.0


def test_per_scale_mode_one_positive_per_scale() -> None:
    boxes, labels = batch_of([(OBJECT, 3)])
    targets = assign_yolov3(
        boxes, labels, ANCHORS, GRIDS, mode="per_scale", ignore_by="prediction", pred_boxes=far_predictions(1)
    )
    # stride 32: (116,90) at row 4, col 6; stride 16: (59,119) at 150/16 = 9.375, 200/16 = 12.5;
    # stride 8: (33,23) at 150/8 = 18.75, 200/8 = 25.0 (on a border: the cell to the right).
    assert positives(targets) == [(0, 0, 0, 4, 6), (1, 0, 2, 9, 12), (2, 0, 2, 18, 25)]
    expected = {
        0: (0, 4, 6, 0.25, 0.6875, math.log(120 / 116), 0.0),
        1: (2, 9, 12, 0.5, 0.375, math.log(120 / 59), math.log(90 / 119)),  # 0.709896, -0.279313
        2: (2, 18, 25, 0.0, 0.75, math.log(120 / 33), math.log(90 / 23)),  # 1.290984, 1.364330
    }
    for s, (a, j, i, tx, ty, tw, th) in expected.items():
        t = targets[s]
        assert t.tx[0, a, j, i].item() == pytest.approx(tx, abs=1e-5)
        assert t.ty[0, a, j, i].item() == pytest.approx(ty, abs=1e-5)
        assert t.tw[0, a, j, i].item() == pytest.approx(tw, abs=1e-5)
        assert t.th[0, a, j, i].item() == pytest.approx(th, abs=1e-5)
        assert t.tcls[0, a, j, i].item() == 3


def test_ignore_by_anchor_global_and_per_scale() -> None:
    # At ignore_thres 0.3 the anchors overlapping (120, 90) by shape are (116,90) 0.967,
    # (156,198) 0.350 at stride 32 and (59,119) 0.424 at stride 16; each is ignored in the
    # cell holding the centre (stride 32: row 4, col 6; stride 16: row 9, col 12).
    boxes, labels = batch_of([(OBJECT, 0)])
    slots = sum(3 * h * w for h, w in GRIDS)

    glob = assign_yolov3(boxes, labels, ANCHORS, GRIDS, mode="global", ignore_by="anchor", ignore_thres=0.3)
    assert positives(glob) == [(0, 0, 0, 4, 6)]
    assert not glob[0].noobj_mask[0, 1, 4, 6] and not glob[0].obj_mask[0, 1, 4, 6]  # ignored
    assert not glob[1].noobj_mask[0, 2, 9, 12] and not glob[1].obj_mask[0, 2, 9, 12]  # ignored, not positive
    assert glob[1].noobj_mask[0, 1, 9, 12]  # (62,45): 0.258 < 0.3 stays a negative
    assert glob[0].noobj_mask[0, 1, 4, 7]  # the same anchor one cell to the right stays a negative
    assert sum(int(t.noobj_mask.sum()) for t in glob) == slots - 1 - 2

    per = assign_yolov3(boxes, labels, ANCHORS, GRIDS, mode="per_scale", ignore_by="anchor", ignore_thres=0.3)
    assert positives(per) == [(0, 0, 0, 4, 6), (1, 0, 2, 9, 12), (2, 0, 2, 18, 25)]
    assert not per[0].noobj_mask[0, 1, 4, 6] and not per[0].obj_mask[0, 1, 4, 6]
    assert sum(int(t.noobj_mask.sum()) for t in per) == slots - 3 - 1


def test_ignore_by_prediction_threshold_and_image() -> None:
    box = px_box(100, 100, 64, 64)
    boxes, labels = batch_of([(box, 1)], [])
    preds = far_predictions(2)
    b = torch.tensor(box)
    w = b[2] - b[0]
    shifted_quarter = b + torch.stack((w / 4, 0 * w, w / 4, 0 * w))  # IoU 0.75 / 1.25 = 0.6
    shifted_half = b + torch.stack((w / 2, 0 * w, w / 2, 0 * w))  # IoU 0.5 / 1.5 = 0.333
    preds[1][0, 0, 20, 20] = shifted_quarter  # overlaps the object by 0.6 > 0.5: ignored
    preds[2][0, 1, 40, 40] = shifted_half  # 0.333 <= 0.5: still a negative
    preds[1][1, 0, 20, 20] = shifted_quarter  # image 1 has no object: still a negative
    for mode in ("global", "per_scale"):
        targets = assign_yolov3(
            boxes, labels, ANCHORS, GRIDS, mode=mode, ignore_by="prediction", ignore_thres=0.5, pred_boxes=preds
        )
        assert not targets[1].noobj_mask[0, 0, 20, 20] and not targets[1].obj_mask[0, 0, 20, 20]
        assert targets[2].noobj_mask[0, 1, 40, 40]
        assert targets[1].noobj_mask[1, 0, 20, 20]
        # At 0.65 the quarter-shifted prediction (0.6) is a negative again.
        higher = assign_yolov3(
            boxes, labels, ANCHORS, GRIDS, mode=mode, ignore_by="prediction", ignore_thres=0.65, pred_boxes=preds
        )
        assert higher[1].noobj_mask[0, 0, 20, 20]
        n_pos = len(positives(targets))
        assert sum(int(t.noobj_mask.sum()) for t in targets) == 2 * sum(3 * h * w for h, w in GRIDS) - n_pos - 1


def test_prediction_ignore_needs_predictions() -> None:
    boxes, labels = batch_of([(OBJECT, 0)])
    with pytest.raises(ValueError, match="pred_boxes"):
        assign_yolov3(boxes, labels, ANCHORS, GRIDS, ignore_by="prediction")


def test_two_objects_in_one_cell_and_anchor_later_wins() -> None:
    # Both have (116, 90) as best anchor (IoU 0.896 and 0.879) and their centres in cell
    # (row 4, col 6) of the stride-32 map: 205/32 = 6.40625, 155/32 = 4.84375.
    first = (px_box(200, 150, 110, 85), 1)
    second = (px_box(205, 155, 125, 95), 2)
    for order, winner in (((first, second), 1), ((second, first), 1)):
        boxes, labels = batch_of(list(order))
        targets = assign_yolov3(boxes, labels, ANCHORS, GRIDS, mode="global", ignore_by="anchor")
        assert positives(targets) == [(0, 0, 0, 4, 6)]
        t = targets[0]
        assert t.gt_index[0, 0, 4, 6].item() == winner  # the later in the label list
        later_label, later_box = order[1][1], order[1][0]
        assert t.tcls[0, 0, 4, 6].item() == later_label
        assert torch.allclose(t.tbox[0, 0, 4, 6], torch.tensor(later_box), atol=1e-6)
    boxes, labels = batch_of([first, second])
    t = assign_yolov3(boxes, labels, ANCHORS, GRIDS, mode="global", ignore_by="anchor")[0]
    assert t.tx[0, 0, 4, 6].item() == pytest.approx(0.40625, abs=1e-5)
    assert t.ty[0, 0, 4, 6].item() == pytest.approx(0.84375, abs=1e-5)
    assert t.tw[0, 0, 4, 6].item() == pytest.approx(math.log(125 / 116), abs=1e-5)


def test_centre_on_cell_border_and_image_edge() -> None:
    # Centre (208, 208) px: 6.5 cells at stride 32, exactly 13.0 at stride 16, 26.0 at stride 8.
    boxes, labels = batch_of([(px_box(208, 208, 20, 20), 0)])
    targets = assign_yolov3(boxes, labels, ANCHORS, GRIDS, mode="per_scale", ignore_by="anchor")
    cells = [(s, j, i) for s, _, _, j, i in positives(targets)]
    assert cells == [(0, 6, 6), (1, 13, 13), (2, 26, 26)]
    assert targets[0].tx[targets[0].obj_mask].item() == pytest.approx(0.5, abs=1e-6)
    assert targets[1].tx[targets[1].obj_mask].item() == 0.0
    assert targets[2].ty[targets[2].obj_mask].item() == 0.0

    # Centres exactly on the image edges: floor would give column W (outside); clamped to W - 1.
    boxes, labels = batch_of([([0.9, 0.4, 1.1, 0.6], 0), ([-0.1, -0.1, 0.1, 0.1], 1)])
    targets = assign_yolov3(boxes, labels, ANCHORS, GRIDS, mode="per_scale", ignore_by="anchor")
    for s, (h, w) in enumerate(GRIDS):
        t = targets[s]
        obj_at_edge = t.obj_mask & (t.tcls == 0)
        _, _, j, i = torch.nonzero(obj_at_edge)[0].tolist()
        assert (j, i) == (h // 2, w - 1)
        assert t.tx[obj_at_edge].item() == 1.0  # the only place where tx reaches 1
        corner = t.obj_mask & (t.tcls == 1)
        assert torch.nonzero(corner)[0, 2:].tolist() == [0, 0]
        assert t.tx[corner].item() == 0.0


def test_images_without_objects_and_padding() -> None:
    boxes, labels = batch_of([], [])
    boxes[1, 0] = torch.tensor([0.2, 0.2, 0.2, 0.5])  # zero width, labelled: treated as padding
    labels[1, 0] = 4
    for ignore_by in ("anchor", "prediction"):
        targets = assign_yolov3(boxes, labels, ANCHORS, GRIDS, ignore_by=ignore_by, pred_boxes=far_predictions(2))
        for t in targets:
            assert not t.obj_mask.any()
            assert t.noobj_mask.all()
            assert (t.tcls == -1).all() and (t.gt_index == -1).all()
    # M = 0 (a batch padded to no objects at all).
    no_rows = torch.zeros(2, 0, dtype=torch.int64)
    targets = assign_yolov3(torch.zeros(2, 0, 4), no_rows, ANCHORS, GRIDS, ignore_by="anchor")
    assert all(t.noobj_mask.all() and not t.obj_mask.any() for t in targets)


def test_objects_go_to_their_own_image() -> None:
    boxes, labels = batch_of([(OBJECT, 5)], [], [(px_box(300, 60, 40, 30), 6), (OBJECT, 8)])
    targets = assign_yolov3(boxes, labels, ANCHORS, GRIDS, mode="global", ignore_by="anchor")
    # (40, 30): best anchor (33, 23) (759 / 1200 = 0.633) at stride 8, row 60/8 = 7.5, col 300/8 = 37.5.
    assert sorted(positives(targets)) == [(0, 0, 0, 4, 6), (0, 2, 0, 4, 6), (2, 2, 2, 7, 37)]
    assert targets[0].tcls[0, 0, 4, 6].item() == 5 and targets[0].tcls[2, 0, 4, 6].item() == 8
    assert targets[0].gt_index[2, 0, 4, 6].item() == 1
    assert targets[2].tcls[2, 2, 7, 37].item() == 6


def test_encode_then_decode_gives_back_the_boxes() -> None:
    gen = torch.Generator().manual_seed(0)
    centres = torch.rand(2, 6, 2, generator=gen) * 0.8 + 0.1
    sizes = torch.rand(2, 6, 2, generator=gen) * 0.5 + 0.02
    boxes = torch.cat((centres - sizes / 2, centres + sizes / 2), dim=-1)
    labels = torch.randint(0, 3, (2, 6), generator=gen)
    labels[1, 4:] = -1
    targets = assign_yolov3(boxes, labels, ANCHORS, GRIDS, mode="per_scale", ignore_by="anchor")
    checked = 0
    for t, anchors in zip(targets, ANCHORS):
        raw = torch.zeros(*t.obj_mask.shape, 4)
        raw[..., 0] = torch.logit(t.tx.clamp(1e-6, 1 - 1e-6))  # the inverse of sigmoid
        raw[..., 1] = torch.logit(t.ty.clamp(1e-6, 1 - 1e-6))
        raw[..., 2] = t.tw
        raw[..., 3] = t.th
        decoded = yolov3_decode_boxes(raw, anchors)  # (B, A, H, W, 4)
        pos = t.obj_mask
        assert torch.allclose(decoded[pos], t.tbox[pos], atol=1e-4)
        b_idx = torch.nonzero(pos)[:, 0]
        assert torch.allclose(decoded[pos], boxes[b_idx, t.gt_index[pos]], atol=1e-4)
        checked += int(pos.sum())
    assert checked > 0
