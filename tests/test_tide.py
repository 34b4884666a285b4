"""TIDE error analysis: equal to tidecv (the paper's code) on recorded cases, and one hand-made
case per error type that moves that error's dAP and no other."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onestage.data.base import ImageRecord
from onestage.eval.tide import MAIN_ERRORS, SPECIAL_ERRORS, format_tide, tide_ap, tide_analysis, tide_to_json

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "data" / "tide_reference.json"


def _script():
    spec = importlib.util.spec_from_file_location("tide_check", ROOT / "benchmarks" / "tide_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


REFERENCE = json.loads(FIXTURE.read_text())
# The issue asks for 1e-3 AP; the port reproduces tidecv to rounding (4e-16 measured), and a
# tolerance this tight also catches the 1e-6 slips (how the 101 recall points are made) that 1e-3 hides.
TOL = 1e-9


@pytest.mark.parametrize("case", sorted(REFERENCE["cases"]))
def test_equals_tidecv_on_recorded_case(case: str) -> None:
    data = REFERENCE["cases"][case]
    ref = data["tidecv"]  # tidecv reports AP x 100
    records, dets = _script().coco_to_inputs(data["gt"], data["results"])
    result = tide_analysis(records, dets, data["classes"])
    assert result.ap == pytest.approx(ref["ap"] / 100, abs=TOL)
    for name in MAIN_ERRORS:
        assert result.main[name] == pytest.approx(ref["main"][name] / 100, abs=TOL), name
        assert result.counts[name] == ref["counts"][name], name
    for name in SPECIAL_ERRORS:
        assert result.special[name] == pytest.approx(ref["special"][name] / 100, abs=TOL), name
    # per class: tidecv's AP of each class, as matched and with each error type fixed
    per = ref["per_class_ap"]
    for c, cat in enumerate(data["gt"]["categories"]):
        key = str(cat["id"])  # tidecv keys classes by COCO category id
        base = per["base"].get(key, 0.0) / 100
        assert result.class_ap[c] == pytest.approx(base, abs=TOL)
        for name in MAIN_ERRORS:
            fixed = per[name].get(key, 0.0) / 100
            assert result.class_main[name][c] == pytest.approx(max(fixed - base, 0.0), abs=TOL), (name, c)
        for name in SPECIAL_ERRORS:
            fixed = per[name].get(key, 0.0) / 100
            assert result.class_special[name][c] == pytest.approx(fixed - base, abs=TOL), (name, c)


def test_recorded_cases_hold_every_error_kind() -> None:
    """The reference is only worth something if each error type actually occurs and costs AP."""
    for data in REFERENCE["cases"].values():
        assert all(data["tidecv"]["counts"][n] > 0 for n in MAIN_ERRORS)
    first = REFERENCE["cases"]["distinct_scores"]["tidecv"]["main"]
    assert all(first[n] > 0 for n in MAIN_ERRORS)


# --------------------------------------------------------------------------- hand-made cases
A, B = 0, 1
BOX = [100.0, 100.0, 200.0, 200.0]


def _rec(i: int, boxes: list, labels: list, crowd: list | None = None) -> ImageRecord:
    return ImageRecord(image_id=i, width=400, height=400, boxes=np.array(boxes, np.float32).reshape(-1, 4),
                       labels=np.array(labels), difficult=None if crowd is None else np.array(crowd))


def _det(boxes: list, labels: list, scores: list) -> dict:
    return {"boxes": np.array(boxes, np.float64).reshape(-1, 4), "labels": np.array(labels, np.int64),
            "scores": np.array(scores, np.float64)}


def _shift(box: list, dx: float) -> list:
    return [box[0] + dx, box[1], box[2] + dx, box[3]]


BOX2 = [250.0, 250.0, 350.0, 350.0]
# Image 0 holds BOX of class A; image 1 holds BOX of class B and BOX2 of class A, both found
# by true positives scored 0.5. Each case adds one mistake in image 0, scored above 0.5 so
# that AP sees it.
FOUND = ([BOX, BOX2], [B, A], [0.5, 0.5])
FOUND_B = ([BOX], [B], [0.5])
CASES = {
    # IoU 1/3 with the object of its class: localization; the object is not "missed" since the fix claims it
    "Loc": ([_shift(BOX, 50)], [A], [0.9]),
    # IoU 1 with an object of the other class
    "Cls": ([BOX], [B], [0.9]),
    # the object found (0.9), a second detection of it (0.8) above image 1's true positive
    "Dupe": ([BOX, _shift(BOX, 10)], [A, A], [0.9, 0.8]),
    # the object found, plus a detection far from everything, above image 1's true positive
    "Bkg": ([BOX, [300, 300, 340, 340]], [A, B], [0.9, 0.8]),
    # the object found, plus a class-B detection overlapping it at IoU 1/3: wrong class and poor box
    "Both": ([BOX, _shift(BOX, 50)], [A, B], [0.9, 0.8]),
    # nothing found in image 0
    "Miss": ([], [], []),
}


@pytest.mark.parametrize("kind", MAIN_ERRORS)
def test_hand_made_case_moves_exactly_its_error(kind: str) -> None:
    boxes, labels, scores = CASES[kind]
    records = [_rec(0, [BOX], [A]), _rec(1, [BOX, BOX2], [B, A])]
    dets = [_det(boxes, labels, scores), _det(*FOUND)]
    result = tide_analysis(records, dets, ["a", "b"])
    assert result.main[kind] > 0.05, result.main
    assert result.counts[kind] == 1
    for other in MAIN_ERRORS:
        if other != kind:
            assert result.main[other] == 0.0, (kind, other, result.main)
            assert result.counts[other] == 0, (kind, other, result.counts)
    # fixing the one mistake makes the detector perfect
    assert result.ap + result.main[kind] == pytest.approx(1.0)


def test_hand_made_values() -> None:
    """Hand-computed: class A (1 object) found by nothing, class B found (AP 1): mAP 0.5;
    fixing the miss leaves class A with no object and no detection: out of the mean, mAP 1."""
    result = tide_analysis([_rec(0, [BOX], [A]), _rec(1, [BOX], [B])], [_det([], [], []), _det(*FOUND_B)], ["a", "b"])
    assert result.ap == pytest.approx(0.5)
    assert result.main["Miss"] == pytest.approx(0.5)
    assert result.special["FalseNeg"] == pytest.approx(0.5)
    assert result.special["FalsePos"] == pytest.approx(0.0)
    assert list(result.class_ap) == [0.0, 1.0]


def test_duplicate_below_true_positives_costs_nothing() -> None:
    """AP only sees a false positive ranked above a true positive: a duplicate scored below
    every true positive counts as an error but gains no AP when fixed."""
    records = [_rec(0, [BOX], [A]), _rec(1, [BOX], [B])]
    dets = [_det([BOX, _shift(BOX, 10)], [A, A], [0.9, 0.1]), _det(*FOUND_B)]
    result = tide_analysis(records, dets, ["a", "b"])
    assert result.counts["Dupe"] == 1 and result.main["Dupe"] == 0.0


def test_crowd_region_ignores_detections_inside_it() -> None:
    records = [_rec(0, [BOX, [0, 0, 400, 90]], [A, A], crowd=[False, True])]
    inside = _det([BOX, [10, 10, 60, 60]], [A, A], [0.5, 0.9])
    outside = _det([BOX, [10, 150, 60, 200]], [A, A], [0.5, 0.9])
    assert tide_analysis(records, [inside], ["a"]).ap == pytest.approx(1.0)
    assert tide_analysis(records, [outside], ["a"]).ap < 1.0


def test_tide_ap_101_point() -> None:
    # TP, FP, TP of 2 objects: precision 1 up to recall 0.5, then 2/3 up to recall 1
    assert tide_ap(np.array([True, False, True]), 2) == pytest.approx((51 * 1 + 50 * 2 / 3) / 101)
    assert tide_ap(np.array([True]), 0) == 0.0


def test_json_and_table() -> None:
    records = [_rec(0, [BOX], [A]), _rec(1, [BOX], [B])]
    result = tide_analysis(records, [_det(*CASES["Loc"]), _det(*FOUND_B)], ["a", "b"])
    js = json.loads(json.dumps(tide_to_json(result)))
    assert js["main"]["Loc"] == result.main["Loc"] and [r["name"] for r in js["per_class"]] == ["a", "b"]
    assert js["per_class"][0]["counts"]["Loc"] == 1
    table = format_tide(result)
    assert "Loc" in table and f"{100 * result.main['Loc']:.2f}" in table


def test_bad_input_is_named() -> None:
    with pytest.raises(ValueError, match="records but"):
        tide_analysis([_rec(0, [BOX], [A])], [], ["a"])
    with pytest.raises(ValueError, match="labels must lie"):
        tide_analysis([_rec(0, [BOX], [A])], [_det([BOX], [3], [0.5])], ["a"])


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), st.integers(1, 4), st.integers(0, 10**6)), min_size=1, max_size=6))
def test_perfect_detections_have_no_errors_and_extra_ones_only_add(images: list) -> None:
    """Property: one exact detection per object gives AP 1 and no error of any kind; adding a
    background detection on top of every image cannot raise AP, and fixing it gives AP 1 back."""
    records, perfect, noisy = [], [], []
    for i, (first_class, n, seed) in enumerate(images):
        rng = np.random.default_rng(seed)
        xy = rng.uniform(0, 300, (n, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(10, 90, (n, 2))], 1).astype(np.float32)
        labels = (first_class + np.arange(n)) % 3
        records.append(ImageRecord(image_id=i, width=400, height=400, boxes=boxes, labels=labels))
        perfect.append(_det(boxes, labels, rng.uniform(0.5, 1.0, n)))
        noisy.append(_det(np.concatenate([boxes, [[395, 395, 400, 400]]]), np.r_[labels, first_class],
                          np.r_[perfect[-1]["scores"], 0.99]))
    clean = tide_analysis(records, perfect, ["a", "b", "c"])
    assert clean.ap == pytest.approx(1.0)
    assert all(v == 0 for v in clean.main.values()) and all(v == 0 for v in clean.counts.values())
    dirty = tide_analysis(records, noisy, ["a", "b", "c"])
    assert dirty.ap <= clean.ap and dirty.counts["Bkg"] == len(images)
    assert dirty.ap + dirty.main["Bkg"] == pytest.approx(1.0)


def test_eval_results_file_prints_tide(tmp_path: Path, capsys) -> None:
    """`onestage eval --results FILE --dataset CONFIG --json` carries TIDE: a results file
    holding the ground truth itself scores AP 1 with no errors; swapping the classes of one
    image's boxes makes classification errors."""
    from onestage.build import read_dataset
    from onestage.cli import main as cli_main
    from onestage.config import load_config
    from onestage.eval.coco import coco_image_id_map
    from onestage.eval.results import save_coco_results

    config, over = str(ROOT / "configs" / "demo_shapes.yaml"), ["data.val.num_images=6"]
    spec = read_dataset(load_config(config, over).data.val, load_config(config, over))
    ids = coco_image_id_map([r.image_id for r in spec.records])
    exact = [_det(r.boxes, r.labels, np.linspace(0.9, 0.5, len(r.labels))) for r in spec.records]
    swapped = [dict(d) for d in exact]
    swapped[0]["labels"] = (swapped[0]["labels"] + 1) % len(spec.class_names)
    for name, dets in (("exact", exact), ("swapped", swapped)):
        save_coco_results(tmp_path / f"{name}.json", [ids[r.image_id] for r in spec.records], dets,
                          list(range(1, len(spec.class_names) + 1)))
        capsys.readouterr()
        assert cli_main(["eval", "--results", str(tmp_path / f"{name}.json"), "--dataset", config, *over, "--json"]) == 0
        tide = json.loads(capsys.readouterr().out)["tide"]
        if name == "exact":
            assert tide["ap"] == pytest.approx(1.0) and sum(tide["counts"].values()) == 0
        else:
            # (a swapped box lying on an object of its new class may count as Loc instead)
            assert tide["ap"] < 1 and tide["counts"]["Cls"] > 0 and tide["main"]["Cls"] > 0
