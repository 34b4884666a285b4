"""Box math, default boxes, the SSD coder, the matcher, the multibox loss and NMS."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from onestage.assign.ssd import BACKGROUND, IGNORE, match_ssd
from onestage.boxes import box_iou, cxcywh_to_xyxy, paired_giou, xyxy_to_cxcywh
from onestage.coders import ssd_decode, ssd_encode
from onestage.config import LossConfig, MatcherConfig
from onestage.losses.functional import smooth_l1
from onestage.losses.multibox import MultiboxLoss, hard_negative_mask
from onestage.postprocess import batched_nms, nms_keep_mask
from onestage.postprocess.ssd import SSDPostProcessor
from onestage.priors import generate_priors, linear_scales, make_layout

SSD300_MAPS = [(38, 38), (19, 19), (10, 10), (5, 5), (3, 3), (1, 1)]
SSD300_RATIOS = [[2], [2, 3], [2, 3], [2, 3], [2], [2]]


def ssd300_layout(**kw):
    return make_layout(
        SSD300_MAPS, 300, SSD300_RATIOS,
        min_sizes=[30, 60, 111, 162, 213, 264], max_sizes=[60, 111, 162, 213, 264, 315],
        steps=[8, 16, 32, 64, 100, 300], **kw,
    )


# ----------------------------------------------------------------------------- boxes
def test_iou_hand_computed():
    a = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    b = torch.tensor([[1.0, 1.0, 3.0, 3.0], [2.0, 2.0, 3.0, 3.0], [0.0, 0.0, 2.0, 2.0], [5, 5, 5, 5.0]])
    # overlap 1, union 4 + 4 - 1 = 7; touching corners: 0; identical: 1; empty box: 0 (not NaN)
    torch.testing.assert_close(box_iou(a, b), torch.tensor([[1 / 7, 0.0, 1.0, 0.0]]))
    assert box_iou(a.half(), b.half()).dtype == torch.float32


@given(st.lists(st.tuples(*[st.floats(0, 1)] * 4), min_size=1, max_size=8))
@settings(max_examples=50, deadline=None)
def test_format_round_trip(raw):
    xyxy = torch.tensor(raw)
    xyxy = torch.cat([torch.minimum(xyxy[:, :2], xyxy[:, 2:]), torch.maximum(xyxy[:, :2], xyxy[:, 2:])], 1)
    torch.testing.assert_close(cxcywh_to_xyxy(xyxy_to_cxcywh(xyxy)), xyxy, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- priors
def test_ssd300_prior_counts():
    layout = ssd300_layout()
    assert layout.counts() == [5776, 2166, 600, 150, 36, 4]
    priors = generate_priors(layout)
    assert priors.shape == (8732, 4)


def test_ssd300_prior_coordinates_by_hand():
    priors = generate_priors(ssd300_layout(clip=False))
    # First cell of the 38x38 map: centre (0.5 * 8 / 300), s_k = 30/300, s'_k = sqrt(30*60)/300.
    c = 4 / 300
    s, s2 = 0.1, math.sqrt(30 * 60) / 300
    r2 = math.sqrt(2)
    expected = torch.tensor([[c, c, s, s], [c, c, s2, s2], [c, c, s * r2, s / r2], [c, c, s / r2, s * r2]])
    torch.testing.assert_close(priors[:4], expected)
    # Second cell is one step to the right (row-major order).
    torch.testing.assert_close(priors[4], torch.tensor([12 / 300, c, s, s]))
    # First cell of the second row.
    torch.testing.assert_close(priors[38 * 4], torch.tensor([c, 12 / 300, s, s]))
    # The single 1x1 cell: centre 150/300, sizes 264 and sqrt(264*315) px.
    last = priors[-4:]
    torch.testing.assert_close(last[0], torch.tensor([0.5, 0.5, 0.88, 0.88]))
    assert last[1, 2].item() == pytest.approx(math.sqrt(264 * 315) / 300, rel=1e-6)
    # 19x19 map, 6 boxes: ratios 3 and 1/3 come last.
    first19 = priors[5776:5782]
    assert first19[4, 2].item() == pytest.approx(0.2 * math.sqrt(3), rel=1e-6)
    assert first19[5, 3].item() == pytest.approx(0.2 * math.sqrt(3), rel=1e-6)


def test_linear_scales_paper():
    assert linear_scales(6) == pytest.approx([0.2, 0.34, 0.48, 0.62, 0.76, 0.9, 1.04])


def test_clip_keeps_priors_in_unit_square():
    priors = generate_priors(ssd300_layout(clip=True))
    assert priors.min() >= 0 and priors.max() <= 1


# ----------------------------------------------------------------------------- coder
@given(
    st.floats(0.05, 0.95), st.floats(0.05, 0.95), st.floats(0.01, 1.0), st.floats(0.01, 1.0),
    st.floats(0.05, 0.95), st.floats(0.05, 0.95), st.floats(0.02, 1.0), st.floats(0.02, 1.0),
)
@settings(max_examples=100, deadline=None)
def test_ssd_encode_decode_round_trip(gx, gy, gw, gh, px, py, pw, ph):
    box = cxcywh_to_xyxy(torch.tensor([[gx, gy, gw, gh]], dtype=torch.float64)).float()
    prior = torch.tensor([[px, py, pw, ph]])
    decoded = ssd_decode(ssd_encode(box, prior), prior)
    torch.testing.assert_close(decoded, box, atol=1e-5, rtol=1e-5)


def test_ssd_encode_by_hand():
    prior = torch.tensor([[0.5, 0.5, 0.2, 0.4]])
    gt = cxcywh_to_xyxy(torch.tensor([[0.52, 0.46, 0.4, 0.2]]))
    t = ssd_encode(gt, prior)
    expected = torch.tensor([[0.02 / 0.02, -0.04 / 0.04, math.log(2) / 0.2, math.log(0.5) / 0.2]])
    torch.testing.assert_close(t, expected)


# ----------------------------------------------------------------------------- matcher
def _priors_from_xyxy(boxes):
    return xyxy_to_cxcywh(torch.tensor(boxes, dtype=torch.float32))


PRIORS = _priors_from_xyxy([
    [0.0, 0.0, 0.5, 0.5],   # 0
    [0.5, 0.0, 1.0, 0.5],   # 1
    [0.0, 0.5, 0.5, 1.0],   # 2
    [0.5, 0.5, 1.0, 1.0],   # 3
    [0.0, 0.0, 0.45, 0.5],  # 4: IoU 0.9 with prior 0's box
    [0.25, 0.25, 0.75, 0.75],  # 5: centre
])


def test_matcher_thresholds_and_forcing():
    # GT == prior 0's box: IoU with p0 = 1, p4 = 0.9, p5 = 1/7, others 0.
    gt = torch.tensor([[[0.0, 0.0, 0.5, 0.5]]])
    m = match_ssd(gt, torch.tensor([[2]]), PRIORS, 0.5, 0.4)
    assert m.tolist() == [[0, BACKGROUND, BACKGROUND, BACKGROUND, 0, BACKGROUND]]


def test_matcher_ignore_band():
    # GT [0, 0, 0.5, 0.25]: IoU with p0 = 0.125 / 0.25 = 0.5 (positive, and its best prior);
    # with p4: inter 0.45 * 0.25 = 0.1125, union 0.125 + 0.225 - 0.1125 = 0.2375 -> 0.474 (ignored);
    # p5 touches it along an edge only (IoU 0), the rest do not overlap.
    m = match_ssd(torch.tensor([[[0.0, 0.0, 0.5, 0.25]]]), torch.tensor([[0]]), PRIORS, 0.5, 0.4)
    assert m.tolist() == [[0, BACKGROUND, BACKGROUND, BACKGROUND, IGNORE, BACKGROUND]]
    # With the band closed (0.5, 0.5) the same prior becomes background.
    m = match_ssd(torch.tensor([[[0.0, 0.0, 0.5, 0.25]]]), torch.tensor([[0]]), PRIORS, 0.5, 0.5)
    assert m[0, 4] == BACKGROUND


def test_matcher_forces_best_prior_below_threshold():
    # GT [0.5, 0, 0.9, 0.28] against p1: 0.112 / 0.25 = 0.448 < 0.5, yet it is the object's best prior.
    m = match_ssd(torch.tensor([[[0.5, 0.0, 0.9, 0.28]]]), torch.tensor([[0]]), PRIORS, 0.5, 0.4)
    assert m[0, 1] == 0
    # A second object identical to p1 (IoU 1) wins p1; the first takes its best free prior, p5
    # (inter [0.5, 0.25]-[0.75, 0.28] = 0.0075 > 0), even though p5 is far below threshold.
    gts = torch.tensor([[[0.5, 0.0, 1.0, 0.5], [0.5, 0.0, 0.9, 0.28]]])
    m2 = match_ssd(gts, torch.tensor([[0, 1]]), PRIORS, 0.5, 0.4)
    assert m2[0, 1] == 0
    assert (m2[0] == 1).sum() == 1 and m2[0, 5] == 1


def test_matcher_conflict_both_keep_a_positive():
    # Two objects whose best prior is p0: the higher IoU keeps it; the other takes its next best free.
    gts = torch.tensor([[[0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.4, 0.4]]])
    m = match_ssd(gts, torch.tensor([[0, 1]]), PRIORS, 0.5, 0.4)
    assert m[0, 0] == 0
    assert (m[0] == 1).any(), "the losing object must still have a positive"


def test_matcher_no_objects_all_background():
    m = match_ssd(torch.zeros(2, 3, 4), torch.full((2, 3), -1), PRIORS)
    assert (m == BACKGROUND).all()
    m0 = match_ssd(torch.zeros(2, 0, 4), torch.zeros(2, 0, dtype=torch.long), PRIORS)
    assert m0.shape == (2, 6) and (m0 == BACKGROUND).all()


def test_matcher_equal_thresholds_is_classic_ssd():
    gts = torch.tensor([[[0.0, 0.0, 0.5, 0.22]]])  # IoU 0.44 with p0, 0.49 with p4
    m = match_ssd(gts, torch.tensor([[0]]), PRIORS, 0.5, 0.5)
    assert IGNORE not in m.tolist()[0]


def test_matcher_ties_go_to_lowest_prior():
    priors = _priors_from_xyxy([[0.0, 0.0, 0.2, 0.2], [0.0, 0.0, 0.2, 0.2], [0.5, 0.5, 0.7, 0.7]])
    gts = torch.tensor([[[0.0, 0.0, 0.1, 0.1]]])  # IoU 0.25 with p0 and p1 (tie)
    m = match_ssd(gts, torch.tensor([[0]]), priors)
    assert m.tolist() == [[0, BACKGROUND, BACKGROUND]]


@given(st.integers(0, 10_000))
@settings(max_examples=25, deadline=None)
def test_matcher_padded_batch_equals_one_image_at_a_time(seed):
    g = torch.Generator().manual_seed(seed)
    priors = generate_priors(make_layout([(5, 5), (3, 3)], 100, [[2], [2]]))
    batch, most = 4, 6
    counts = torch.randint(0, most + 1, (batch,), generator=g)
    xy = torch.rand(batch, most, 2, generator=g) * 0.8
    wh = torch.rand(batch, most, 2, generator=g) * 0.5 + 0.02
    boxes = torch.cat([xy, (xy + wh).clamp(max=1)], -1)
    labels = torch.randint(0, 3, (batch, most), generator=g)
    pad = torch.arange(most)[None] >= counts[:, None]
    labels[pad] = -1
    boxes[pad] = 0
    batched = match_ssd(boxes, labels, priors)
    for i in range(batch):
        n = int(counts[i])
        single = match_ssd(boxes[i : i + 1, :n], labels[i : i + 1, :n], priors)
        assert torch.equal(batched[i], single[0])
        # every object keeps at least one positive
        for j in range(n):
            assert (single[0] == j).any()


# ----------------------------------------------------------------------------- loss
def test_smooth_l1_reductions_by_hand():
    pred = torch.tensor([[0.0, 0.0, 0.0, 0.0], [2.0, 0.5, -3.0, 0.0]])
    target = torch.zeros(2, 4)
    # beta 1: |d| = 2 -> 1.5; 0.5 -> 0.125; 3 -> 2.5; 0 -> 0. Row sums: 0 and 4.125.
    assert smooth_l1(pred, target, 1.0, "none").tolist() == [0.0, 4.125]
    assert smooth_l1(pred, target, 1.0, "sum").item() == 4.125
    assert smooth_l1(pred, target, 1.0, "mean").item() == pytest.approx(2.0625)
    # beta 0.5: 2 -> 1.75; 0.5 -> 0.25 (not < beta); 3 -> 2.75.
    assert smooth_l1(pred, target, 0.5, "sum").item() == pytest.approx(4.75)
    with pytest.raises(ValueError):
        smooth_l1(pred, target, 1.0, "max")  # type: ignore[arg-type]


def test_hard_negative_mask_ratio_and_ignored_never_mined():
    loss = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0, 9.0]])
    candidates = torch.tensor([[True, True, True, True, True, False]])  # prior 5 is ignored
    mask = hard_negative_mask(loss, candidates, torch.tensor([1]), ratio=3.0)
    assert mask.tolist() == [[True, True, True, False, False, False]]
    mask = hard_negative_mask(loss, candidates, torch.tensor([4]), ratio=3.0)  # capped at 5 candidates
    assert mask.sum() == 5 and not mask[0, 5]


@given(st.integers(0, 10_000), st.floats(0.5, 5.0))
@settings(max_examples=25, deadline=None)
def test_mined_negatives_bounded_property(seed, ratio):
    g = torch.Generator().manual_seed(seed)
    loss = torch.rand(3, 50, generator=g)
    matched = torch.randint(-2, 3, (3, 50), generator=g)
    num_pos = (matched >= 0).sum(1)
    mask = hard_negative_mask(loss, matched == BACKGROUND, num_pos, ratio)
    assert not (mask & (matched != BACKGROUND)).any()
    assert (mask.sum(1) <= (num_pos.float() * ratio).long()).all()


def test_multibox_loss_by_hand_one_prior_positive():
    priors = _priors_from_xyxy([[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0], [0.5, 0.0, 1.0, 0.5], [0, 0.5, 0.5, 1]])
    crit = MultiboxLoss(priors, MatcherConfig(), LossConfig(neg_pos_ratio=1.0))
    gt = torch.tensor([[[0.0, 0.0, 0.5, 0.5]]])
    cls = torch.zeros(1, 4, 3)
    cls[0, 1, 2] = 2.0  # a confident wrong foreground on prior 1: the hardest negative
    loc = torch.zeros(1, 4, 4)
    loc[0, 0, 0] = 0.5  # offset error 0.5 on the positive prior -> 0.125
    out = crit({"cls": cls, "loc": loc}, gt, torch.tensor([[1]]))
    # positive prior 0, class 2 (label 1 + 1): CE = log(3); hard negative prior 1: CE = log(2 + e^2) - 0
    expected_cls = math.log(3) + math.log(2 + math.exp(2.0))
    assert out["cls"].item() == pytest.approx(expected_cls, rel=1e-5)
    assert out["loc"].item() == pytest.approx(0.125, rel=1e-5)
    assert out["num_pos"].item() == 1


def test_paired_giou_by_hand():
    a = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    b = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0], [2.0, 0.0, 3.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    # identical: 1; contained: IoU 1/4, hull = union; disjoint: 0 - (3 - 2) / 3; two empty boxes: 0
    torch.testing.assert_close(paired_giou(a, b), torch.tensor([1.0, 0.25, -1.0 / 3.0, 0.0]))


@given(st.integers(0, 100_000))
@settings(max_examples=30, deadline=None)
def test_paired_giou_bounded_by_iou(seed):
    """Property: -1 <= GIoU <= IoU, symmetric, and equal to IoU when the hull is the union."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(2, 16, 2, generator=g)
    boxes = torch.cat((xy, xy + 0.01 + torch.rand(2, 16, 2, generator=g)), dim=-1)
    giou = paired_giou(boxes[0], boxes[1])
    iou = box_iou(boxes[0], boxes[1]).diagonal()
    assert (giou <= iou + 1e-6).all() and (giou >= -1 - 1e-6).all()
    torch.testing.assert_close(giou, paired_giou(boxes[1], boxes[0]))
    torch.testing.assert_close(paired_giou(boxes[0], boxes[0]), torch.ones(16))


def test_multibox_giou_loss_by_hand():
    priors = _priors_from_xyxy([[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0], [0.5, 0.0, 1.0, 0.5], [0, 0.5, 0.5, 1]])
    crit = MultiboxLoss(priors, MatcherConfig(), LossConfig(box_loss="giou", alpha=2.0))
    gt, labels = torch.tensor([[[0.0, 0.0, 0.5, 0.5]]]), torch.tensor([[0]])
    loc = torch.zeros(1, 4, 4, requires_grad=True)
    exact = crit({"cls": torch.zeros(1, 4, 2), "loc": loc}, gt, labels)
    assert exact["loc"].item() == pytest.approx(0.0, abs=1e-6)  # decoded prior 0 is the ground truth
    wide = torch.zeros(1, 4, 4)
    wide[0, 0, 2] = math.log(2.0) / 0.2  # width doubled about the centre: [-0.25, 0, 0.75, 0.5]
    out = crit({"cls": torch.zeros(1, 4, 2), "loc": wide.requires_grad_()}, gt, labels)
    # IoU = 0.25 / 0.5; the hull is the union: GIoU 0.5, loss alpha * (1 - 0.5) = 1
    assert out["loc"].item() == pytest.approx(1.0, rel=1e-5)
    out["total"].backward()
    assert torch.isfinite(wide.grad).all() and wide.grad[0, 0, 2] > 0 and (wide.grad[0, 1:] == 0).all()


def test_multibox_no_objects_is_finite():
    priors = generate_priors(make_layout([(4, 4)], 64, [[2]]))
    crit = MultiboxLoss(priors)
    cls = torch.randn(2, len(priors), 4, requires_grad=True)
    loc = torch.randn(2, len(priors), 4, requires_grad=True)
    out = crit({"cls": cls, "loc": loc}, torch.zeros(2, 1, 4), torch.full((2, 1), -1))
    assert torch.isfinite(out["total"]) and out["total"].item() == 0.0
    out["total"].backward()
    assert torch.isfinite(cls.grad).all()


def test_multibox_normalize_per_image():
    priors = _priors_from_xyxy([[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]])
    gt = torch.tensor([[[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]], [[0.0, 0.0, 0.5, 0.5], [0, 0, 0, 0]]])
    labels = torch.tensor([[0, 0], [0, -1]])
    cls = torch.zeros(2, 2, 2)
    loc = torch.zeros(2, 2, 4)
    batch = MultiboxLoss(priors, loss=LossConfig(normalize="batch"))({"cls": cls, "loc": loc}, gt, labels)
    image = MultiboxLoss(priors, loss=LossConfig(normalize="image"))({"cls": cls, "loc": loc}, gt, labels)
    # Image 0: 2 positives (2 log 2) + 0 negatives left; image 1: 1 positive + 1 hard negative (2 log 2).
    assert batch["cls"].item() == pytest.approx(4 * math.log(2) / 3)
    assert image["cls"].item() == pytest.approx((2 * math.log(2) / 2 + 2 * math.log(2) / 1) / 2)


# ----------------------------------------------------------------------------- NMS
def _greedy_nms_reference(boxes, scores, labels, thr):
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    keep = []
    for i in order:
        if all(labels[i] != labels[j] or box_iou(boxes[i : i + 1], boxes[j : j + 1]).item() <= thr for j in keep):
            keep.append(i)
    return keep


@given(st.integers(0, 100_000), st.integers(1, 40), st.floats(0.1, 0.9))
@settings(max_examples=60, deadline=None)
def test_batched_nms_matches_brute_force(seed, n, thr):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g)
    boxes = torch.cat([xy, xy + torch.rand(n, 2, generator=g) * 0.4 + 0.01], 1)
    scores = torch.rand(n, generator=g)
    labels = torch.randint(0, 3, (n,), generator=g)
    keep = batched_nms(boxes, scores, labels, thr)
    assert keep.tolist() == _greedy_nms_reference(boxes, scores.tolist(), labels.tolist(), thr)


@given(st.integers(0, 100_000), st.integers(1, 30), st.floats(0.1, 0.9))
@settings(max_examples=40, deadline=None)
def test_nms_keep_mask_with_invalid_entries_matches_brute_force_per_row(seed, n, thr):
    """A batch of rows sorted by score, each with its own invalid entries (a valid prefix, as
    after a score threshold, or scattered; all invalid in one row): each row's keep mask is
    the greedy NMS of its valid entries alone (the trimmed (K x K) work changes nothing)."""
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(3, n, 2, generator=g)
    boxes = torch.cat([xy, xy + torch.rand(3, n, 2, generator=g) * 0.4 + 0.01], -1)
    labels = torch.randint(0, 2, (3, n), generator=g)
    prefix = int(torch.randint(0, n + 1, (1,), generator=g))
    valid = torch.stack([torch.arange(n) < prefix, torch.rand(n, generator=g) < 0.5, torch.zeros(n, dtype=torch.bool)])
    keep = nms_keep_mask(boxes, valid, thr, labels=labels)
    for r in range(3):
        idx = valid[r].nonzero().flatten().tolist()  # already in score order: scores = -index
        kept = _greedy_nms_reference(boxes[r, idx], [-i for i in idx], labels[r, idx].tolist(), thr)
        assert keep[r].nonzero().flatten().tolist() == [idx[i] for i in kept]


def test_nms_keep_mask_chain():
    # A suppresses B, B would suppress C; greedy keeps A and C (B is gone, C survives).
    boxes = torch.tensor([[[0.0, 0, 10, 10], [4, 0, 14, 10], [8, 0, 18, 10]]])
    keep = nms_keep_mask(boxes, torch.ones(1, 3, dtype=torch.bool), 0.3)
    assert keep.tolist() == [[True, False, True]]


def test_ssd_postprocessor_end_to_end():
    priors = _priors_from_xyxy([[0.0, 0.0, 0.5, 0.5], [0.02, 0.0, 0.52, 0.5], [0.5, 0.5, 1.0, 1.0]])
    cls = torch.full((1, 3, 3), -10.0)
    cls[0, 0, 1] = 10.0  # class 0 (index 1), score ~1
    cls[0, 1, 1] = 9.0  # overlapping duplicate of class 0, lower score: suppressed
    cls[0, 2, 2] = 0.0  # class 1 elsewhere: softmax of (-10, -10, 0) ~ 0.99991
    dets = SSDPostProcessor(priors, score_threshold=0.5)({"cls": cls, "loc": torch.zeros(1, 3, 4)})[0]
    assert dets.labels.tolist() == [0, 1]
    torch.testing.assert_close(dets.boxes[0], torch.tensor([0.0, 0.0, 0.5, 0.5]))
    assert dets.scores[0] > dets.scores[1] > 0.5
