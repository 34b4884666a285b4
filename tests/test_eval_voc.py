"""VOC AP against hand-computed cases (DESIGN.md section 3, "VOC AP conventions")."""

from __future__ import annotations

import numpy as np
import pytest

from onestage.config import load_config

from onestage.eval.voc import (
    ELEVEN_POINTS,
    FALSE_POSITIVE,
    IGNORED,
    TRUE_POSITIVE,
    evaluate_voc,
    iou_matrix,
    match_image,
    voc_ap,
)


def gt(boxes, labels, difficult=None):
    return (np.asarray(boxes, float).reshape(-1, 4), np.asarray(labels, int), difficult)


def det(boxes, scores, labels):
    return (np.asarray(boxes, float).reshape(-1, 4), np.asarray(scores, float), np.asarray(labels, int))


NO_DET = det(np.zeros((0, 4)), [], [])

# Three objects of class 0 side by side, 10 px squares.
G0, G1, G2 = [0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10]
FAR = [100, 100, 110, 110]  # overlaps nothing


# --------------------------------------------------------------------------- voc_ap alone
def test_voc_ap_area_and_11point_by_hand():
    # 3 objects; detections in score order TP, FP, TP:
    #   cum tp 1 1 2, cum fp 0 1 1 -> precision 1, 1/2, 2/3; recall 1/3, 1/3, 2/3.
    # area: envelope 1 up to recall 1/3, 2/3 up to 2/3, 0 after: 1/3*1 + 1/3*2/3 = 5/9.
    # 11-point: t = 0, .1, .2, .3 -> best precision at recall >= t is 1 (4 points);
    #   t = .4, .5, .6 -> 2/3 (3 points); t = .7 ... 1 -> 0.  (4 + 2) / 11 = 6/11.
    rec = np.array([1 / 3, 1 / 3, 2 / 3])
    prec = np.array([1.0, 0.5, 2 / 3])
    assert voc_ap(rec, prec, "area") == pytest.approx(5 / 9, abs=1e-12)
    assert voc_ap(rec, prec, "11point") == pytest.approx(6 / 11, abs=1e-12)


def test_eleven_points_keep_the_arange_quirk():
    # numpy.arange(0, 1.1, 0.1)[3] is 0.30000000000000004, so a recall of exactly 3/10 does
    # not reach it: 10 objects, 3 perfect detections -> thresholds 0, .1, .2 only = 3/11
    # (linspace would give 4/11). The references all use arange.
    assert ELEVEN_POINTS[3] > 0.3
    rec = np.arange(1, 4) / 10.0
    assert voc_ap(rec, np.ones(3), "11point") == pytest.approx(3 / 11, abs=1e-12)
    # area: 0.3 * 1
    assert voc_ap(rec, np.ones(3), "area") == pytest.approx(0.3, abs=1e-12)


def test_voc_ap_empty_curve_is_zero_and_bad_input_is_refused():
    assert voc_ap(np.zeros(0), np.zeros(0), "area") == 0.0
    assert voc_ap(np.zeros(0), np.zeros(0), "11point") == 0.0
    with pytest.raises(ValueError, match="non-decreasing"):
        voc_ap(np.array([0.5, 0.2]), np.array([1.0, 1.0]))
    with pytest.raises(ValueError, match="metric"):
        voc_ap(np.array([0.5]), np.array([1.0]), "101point")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="match"):
        voc_ap(np.array([0.5]), np.array([1.0, 1.0]))


# --------------------------------------------------------------------------- matching
def test_single_class_tp_fp_tp():
    # Same case as above, through the matcher: G2 is never found.
    r = evaluate_voc([gt([G0, G1, G2], [0, 0, 0])], [det([G0, FAR, G1], [0.9, 0.8, 0.7], [0, 0, 0])], 1)
    np.testing.assert_allclose(r.precision[0], [1.0, 0.5, 2 / 3])
    np.testing.assert_allclose(r.recall[0], [1 / 3, 1 / 3, 2 / 3])
    assert r.ap[0] == pytest.approx(5 / 9, abs=1e-12)
    assert r.mean_ap == pytest.approx(5 / 9, abs=1e-12)
    assert r.mean_ap_as("11point") == pytest.approx(6 / 11, abs=1e-12)
    assert r.num_gt.tolist() == [3] and r.num_det.tolist() == [3]


def test_detections_are_sorted_by_score_across_images():
    # Same detections as above, given in another order and split over two images.
    gts = [gt([G0, G1], [0, 0]), gt([G2], [0])]
    dets = [det([G1, G0], [0.7, 0.9], [0, 0]), det([FAR], [0.8], [0])]
    assert evaluate_voc(gts, dets, 1).ap[0] == pytest.approx(5 / 9, abs=1e-12)


def test_duplicate_detection_is_a_false_positive():
    # 2 objects; G0 detected twice (0.9, 0.8), G1 once (0.6): TP, FP, TP.
    # precision 1, 1/2, 2/3; recall 1/2, 1/2, 1.
    # area: 1/2*1 + 1/2*2/3 = 5/6.
    # 11-point: t = 0 ... .5 (6 points) -> 1; t = .6 ... 1 (5 points) -> 2/3: (6 + 10/3)/11 = 28/33.
    r = evaluate_voc([gt([G0, G1], [0, 0])], [det([G0, G0, G1], [0.9, 0.8, 0.6], [0, 0, 0])], 1)
    np.testing.assert_allclose(r.precision[0], [1.0, 0.5, 2 / 3])
    assert r.ap[0] == pytest.approx(5 / 6, abs=1e-12)
    assert r.ap_as("11point")[0] == pytest.approx(28 / 33, abs=1e-12)


def test_each_detection_is_judged_on_the_object_it_overlaps_most():
    # Two overlapping objects A = [0,0,10,10], B = [2,0,12,10]. Detection 1 = A exactly (TP).
    # Detection 2 = [0.5,0,10.5,10]: IoU with A = 95/105 = 0.905, with B = 85/115 = 0.739.
    # Its best object A is taken, so it is a duplicate, although B was free (COCO would
    # match it to B; VOC does not). TP, FP with 2 objects: recall 1/2, 1/2 -> AP = 1/2.
    a, b = [0, 0, 10, 10], [2, 0, 12, 10]
    r = evaluate_voc([gt([a, b], [0, 0])], [det([a, [0.5, 0, 10.5, 10]], [0.9, 0.8], [0, 0])], 1)
    np.testing.assert_allclose(r.recall[0], [0.5, 0.5])
    assert r.ap[0] == pytest.approx(0.5, abs=1e-12)


def test_difficult_objects_are_neither_counted_nor_penalized():
    # G0 normal, G1 difficult. Detections: 0.9 on G1 (ignored), 0.8 far away (FP), 0.7 on G0 (TP).
    # Ignored dropped: FP, TP with 1 object -> precision 0, 1/2; recall 0, 1.
    # area: envelope 1/2 from recall 0 to 1 -> AP = 1/2.
    # (Counting the G1 detection as FP: 1/3. Counting G1 as a normal object: 5/6.)
    gts = [gt([G0, G1], [0, 0], np.array([False, True]))]
    dets = [det([G1, FAR, G0], [0.9, 0.8, 0.7], [0, 0, 0])]
    r = evaluate_voc(gts, dets, 1)
    assert r.num_gt.tolist() == [1]
    assert r.num_det.tolist() == [3]
    np.testing.assert_allclose(r.precision[0], [0.0, 0.5])
    assert r.ap[0] == pytest.approx(0.5, abs=1e-12)
    # A difficult object nobody detects costs nothing: 1 detection on G0 -> AP 1.
    assert evaluate_voc(gts, [det([G0], [0.5], [0])], 1).ap[0] == pytest.approx(1.0)


def test_several_classes_and_a_class_without_objects():
    # Image 0: class-0 object G0.  Image 1: class-0 object G1 and class-1 object G2.
    # Class 0 detections: 0.95 on G2 (a class-1 object: FP), 0.9 far away in image 1 (FP),
    #   0.8 on G0 (TP). 2 objects: precision 0, 0, 1/3; recall 0, 0, 1/2 -> AP = 1/2 * 1/3 = 1/6.
    # Class 1: 0.7 on G2 (TP) -> AP 1; also 0.6 on G0 in image 0 where no class-1 object is:
    #   TP, FP -> precision 1, 1/2, recall 1, 1 -> AP still 1.
    # Class 2: detections but no object -> AP nan, left out of the mean.
    # mAP = (1/6 + 1) / 2 = 7/12.
    gts = [gt([G0], [0]), gt([G1, G2], [0, 1])]
    dets = [
        det([G0, G0, FAR], [0.8, 0.6, 0.5], [0, 1, 2]),
        det([G2, FAR, G2], [0.95, 0.9, 0.7], [0, 0, 1]),
    ]
    r = evaluate_voc(gts, dets, 3)
    assert r.ap[0] == pytest.approx(1 / 6, abs=1e-12)
    assert r.ap[1] == pytest.approx(1.0, abs=1e-12)
    assert np.isnan(r.ap[2])
    assert r.mean_ap == pytest.approx(7 / 12, abs=1e-12)
    assert r.num_gt.tolist() == [2, 1, 0]
    assert r.num_det.tolist() == [3, 2, 1]


def test_no_detections_scores_zero():
    r = evaluate_voc([gt([G0, G1], [0, 1])], [NO_DET], 2)
    assert r.ap.tolist() == [0.0, 0.0]
    assert r.mean_ap == 0.0
    assert r.ap_as("11point").tolist() == [0.0, 0.0]


def test_no_objects_at_all_gives_nan_mean():
    r = evaluate_voc([gt(np.zeros((0, 4)), [])], [det([G0], [0.9], [0])], 2)
    assert np.isnan(r.ap).all() and np.isnan(r.mean_ap)


def test_tied_scores_keep_input_order():
    # Two detections with the same score: image 0's (FP) comes before image 1's (TP) by the
    # stable sort -> precision 0, 1/2; recall 0, 1 -> AP 1/2 (the other order would give 1).
    gts = [gt(np.zeros((0, 4)), []), gt([G0], [0])]
    dets = [det([FAR], [0.8], [0]), det([G0], [0.8], [0])]
    assert evaluate_voc(gts, dets, 1).ap[0] == pytest.approx(0.5, abs=1e-12)


def test_threshold_is_inclusive_and_legacy_mode_differs():
    # IoU([0,0,10,10], [0,0,10,5]) = 50/100 = 0.5 exactly: a match with >= 0.5.
    box = [0, 0, 10, 10]
    assert evaluate_voc([gt([box], [0])], [det([[0, 0, 10, 5]], [0.9], [0])], 1).ap[0] == 1.0

    # Continuous: IoU([0,0,4,4], [0,0,4,1.8]) = 7.2/16 = 0.45 -> miss (AP 0).
    # Legacy +1 px: inter 5 * 2.8 = 14, union 25 + 14 - 14 = 25 -> 0.56 -> match (AP 1).
    g, d = [gt([[0, 0, 4, 4]], [0])], [det([[0, 0, 4, 1.8]], [0.9], [0])]
    assert evaluate_voc(g, d, 1).ap[0] == 0.0
    assert evaluate_voc(g, d, 1, legacy=True).ap[0] == pytest.approx(1.0)

    # Legacy is strict: IoU_legacy([0,0,9,9], [0,0,9,4]) = (10*5)/(10*10) = 0.5 exactly -> miss.
    g, d = [gt([[0, 0, 9, 9]], [0])], [det([[0, 0, 9, 4]], [0.9], [0])]
    assert iou_matrix(d[0][0], g[0][0], plus_one=True)[0, 0] == 0.5
    assert evaluate_voc(g, d, 1, legacy=True).ap[0] == 0.0
    assert evaluate_voc(g, d, 1, iou_threshold=0.49, legacy=True).ap[0] == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("convention", "expected_a", "expected_b"),
    [
        # A: [0,0,10,10] vs [0,0,10,5]: continuous IoU 50/100 = 0.5 exactly (+1 px: 66/121 = 0.545).
        # B: [0,0,9,9] vs [0,0,9,4]: +1 px IoU (10*5)/(10*10) = 0.5 exactly (continuous: 36/81 = 0.444).
        ("continuous", 1.0, 0.0),  # no +1, IoU >= 0.5: A at exactly 0.5 matches
        ("devkit", 1.0, 1.0),  # VOCevaldet.m: +1, ov >= minoverlap: B at exactly 0.5 matches
        ("voc_eval_py", 1.0, 0.0),  # voc_eval.py: +1, ovmax > ovthresh: B at exactly 0.5 misses
    ],
)
def test_voc_conventions_at_exactly_iou_half(convention, expected_a, expected_b):
    pair_a = [gt([[0, 0, 10, 10]], [0])], [det([[0, 0, 10, 5]], [0.9], [0])]
    pair_b = [gt([[0, 0, 9, 9]], [0])], [det([[0, 0, 9, 4]], [0.9], [0])]
    assert evaluate_voc(*pair_a, 1, convention=convention).ap[0] == expected_a
    assert evaluate_voc(*pair_b, 1, convention=convention).ap[0] == expected_b
    assert evaluate_voc(*pair_b, 1, convention=convention).convention == convention
    # The same through the Evaluator that `eval` and training validation use (eval.voc_convention).
    from onestage.data.record import ImageRecord
    from onestage.eval.evaluator import Evaluator

    ev = Evaluator(["a"], voc_convention=convention)
    rec = ImageRecord(image_id="x", width=20, height=20, boxes=np.array([[0, 0, 9, 9]], np.float32),
                      labels=np.array([0]), difficult=np.array([False]))
    ev.update([rec], [{"boxes": np.array([[0, 0, 9, 4]]), "scores": np.array([0.9]), "labels": np.array([0])}])
    assert ev.compute().metrics["voc_ap50"] == expected_b


def test_voc_convention_names_are_checked():
    with pytest.raises(ValueError, match="continuous, devkit, voc_eval_py"):
        evaluate_voc([gt([[0, 0, 9, 9]], [0])], [det([[0, 0, 9, 4]], [0.9], [0])], 1, convention="coco")
    assert load_config(None, ["eval.voc_convention=devkit"]).eval.voc_convention == "devkit"
    assert load_config(None, []).eval.voc_convention == "continuous"


def test_match_image_status_codes():
    # G0 normal, G1 difficult; detections: G0 (TP), G0 again lower (duplicate FP), G1 (ignored),
    # a class-1 detection on G0 (no class-1 object: FP, no object index).
    m = match_image(
        np.array([G0, G1], float),
        np.array([0, 0]),
        np.array([False, True]),
        np.array([G0, G0, G1, G0], float),
        np.array([0.9, 0.5, 0.7, 0.8]),
        np.array([0, 0, 0, 1]),
    )
    assert m.status.tolist() == [TRUE_POSITIVE, FALSE_POSITIVE, IGNORED, FALSE_POSITIVE]
    assert m.gt_index.tolist() == [0, 0, 1, -1]
    np.testing.assert_allclose(m.iou, [1.0, 1.0, 1.0, 0.0])


def test_bad_labels_are_refused():
    with pytest.raises(ValueError, match=r"image 0: detection labels must lie in \[0, 1\)"):
        evaluate_voc([gt([G0], [0])], [det([G0], [0.9], [3])], 1)
    with pytest.raises(ValueError, match="1 ground-truth images but 2"):
        evaluate_voc([gt([G0], [0])], [NO_DET, NO_DET], 1)
