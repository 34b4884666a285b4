"""The assignment explorer (``onestage assign``) and ``onestage compare`` (issue 17)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from onestage.build import build_detector
from onestage.cli import main as cli_main
from onestage.compare import STABILITY_NA
from onestage.config import load_config
from onestage.explore import analyse_batch, build_panels, load_source, object_rows

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["a", "b", "c"]


def family(arch: str, *overrides: str):
    extra = {
        "ssd": ["model.width_mult=0.25", "model.extra_channels=[32,32,32]"],
        "yolov3": ["model.width_mult=0.25", "model.yolov3.neck_width=0.25",
                   "model.anchors.sizes=[[[64,64]],[[32,32]],[[16,16]]]"],
        "yolov1": ["model.backbone=tiny", "model.yolov1.head=conv", "model.yolov1.hidden=16", "model.yolov1.grid=4"],
    }[arch]
    cfg = load_config(None, [f"model.arch={arch}", "model.input_size=128", *extra, *overrides])
    return build_detector(cfg, CLASSES)


# ----------------------------------------------------------------------------- SSD against a brute force
def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, 4) x (M, 4) xyxy -> (N, M), float32 like the matcher."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(axis=-1)
    area = lambda x: (x[:, 2] - x[:, 0]) * (x[:, 3] - x[:, 1])  # noqa: E731
    return (inter / (area(a)[:, None] + area(b)[None, :] - inter)).astype(np.float32)


def _brute_force_counts(priors: np.ndarray, boxes: np.ndarray, pos_iou: float) -> np.ndarray:
    """Positives per object by the SSD rule, one object and one prior at a time: a prior is
    positive for its best object when IoU >= pos_iou; then every object is forced onto its best
    prior still free (higher IoU first, then lower index), even below pos_iou."""
    if len(boxes) == 0:
        return np.zeros(0, np.int64)
    iou = _iou(priors, boxes)  # (P, M)
    role = np.where(iou.max(axis=1) >= pos_iou, iou.argmax(axis=1), -1)
    taken: set[int] = set()
    pending = list(range(len(boxes)))
    while pending:
        proposals = {}
        for m in pending:
            free = iou[:, m].copy()
            free[list(taken)] = -1
            proposals[m] = (int(free.argmax()), float(free.max()))
        winners = {}
        for m, (p, v) in proposals.items():
            if p not in winners or v > proposals[winners[p]][1]:
                winners[p] = m
        for p, m in winners.items():
            role[p] = m
            taken.add(p)
            pending.remove(m)
    return np.array([(role == m).sum() for m in range(len(boxes))])


@pytest.mark.parametrize("config", ["demo.yaml", "demo_shapes.yaml"])  # the demo (tiny SSD, 192), SSDLite at 256
def test_demo_data_every_object_has_an_ssd_positive_and_counts_equal_a_brute_force(tmp_path, config):
    out = tmp_path / "assign"
    args = ["assign", str(ROOT / "configs" / config), "--num", "all", "--draw", "1", "--out", str(out),
            "--json", "--no-progress", "data.train.num_images=40"]
    assert cli_main(args) == 0
    result = json.loads((out / "assignment.json").read_text())
    assert (out / "histograms.png").exists() and (out / "0.png").exists()
    cfg = load_config(ROOT / "configs" / config, ["data.train.num_images=40"])
    source = load_source(cfg, "train")
    priors = source.family.candidate_boxes().numpy()
    objects = result["objects"]
    assert len(objects) == sum(len(source.dataset[i]["labels"]) for i in range(len(source.dataset))) > 40
    assert all(o["positives"] >= 1 and not o["no_positive"] for o in objects)  # the project's rule
    assert result["summary"]["no_positive"] == 0
    for i in range(len(source.dataset)):
        boxes = source.dataset[i]["boxes"].numpy()
        ids = source.dataset.records[i].image_id
        got = [o["positives"] for o in objects if o["image"] == ids]
        np.testing.assert_array_equal(got, _brute_force_counts(priors, boxes, source.family.pos_iou))
        assert all(sum(o["positives_per_map"].values()) == o["positives"] for o in objects if o["image"] == ids)
    forced = [o for o in objects if o["only_forced"]]
    assert all(o["positives"] >= 1 and o["best_iou"] < source.family.pos_iou for o in forced)


# ----------------------------------------------------------------------------- YOLOv3
def test_yolov3_two_objects_on_one_cell_and_anchor_one_is_flagged_lost():
    fam = family("yolov3").family
    boxes = torch.tensor([[[0.40, 0.40, 0.65, 0.65], [0.41, 0.41, 0.66, 0.66]]])  # same 16 px cell, 32 px anchor
    a, numbers = analyse_batch(fam, fam.candidate_boxes(), boxes, torch.tensor([[0, 1]]))
    rows = object_rows(numbers, ["img"], CLASSES, [r.name for r in fam.layout()], 128, None)
    assert [r["lost"] for r in rows] == [True, False]
    assert [r["positives"] for r in rows] == [0, 1]
    assert rows[0]["no_positive"]


def test_yolov3_object_between_two_cells_is_drawn_in_the_cell_of_its_centre():
    fam = family("yolov3").family
    layout = fam.layout()
    for cx, column in ((0.5, 4), (0.49, 3)):  # middle scale: 8 x 8 cells of 16 px
        boxes = torch.tensor([[[cx - 0.125, 0.3, cx + 0.125, 0.55]]])
        a, _ = analyse_batch(fam, fam.candidate_boxes(), boxes, torch.tensor([[0]]))
        panels = build_panels(layout, fam.candidate_boxes(), a.roles[0], boxes[0], a.valid[0], 128)
        drawn = [p for p in panels if len(p.positives)]
        assert len(drawn) == 1 and drawn[0].grid == (8, 8)
        x1, _, x2, _ = drawn[0].positives[0]
        assert int((x1 + x2) / 2 // 16) == column  # the anchor box sits on the centre's cell, in pixels


# ----------------------------------------------------------------------------- drawing geometry
def _iou_px(a, b) -> float:
    return float(_iou(np.asarray([a], np.float64), np.asarray([b], np.float64))[0, 0])


def test_a_positive_priors_drawn_rectangle_covers_its_object_in_input_pixels():
    fam = family("ssd").family
    size = 128
    cands = fam.candidate_boxes()
    boxes = torch.stack([cands[40] + 0.01, torch.tensor([0.55, 0.5, 0.95, 0.9])])[None]  # (1, 2, 4)
    a, _ = analyse_batch(fam, cands, boxes, torch.tensor([[0, 2]]))
    panels = build_panels(fam.layout(), cands, a.roles[0], boxes[0], a.valid[0], size)
    checked = 0
    for p in panels:
        np.testing.assert_allclose(p.gt, boxes[0].numpy() * size, rtol=1e-6)  # ground truth in input pixels
        for rect, owner in zip(p.positives, p.owner):
            iou = _iou_px(rect, p.gt[list(p.gt_index).index(owner)])
            best = max(_iou_px(c * size, p.gt[list(p.gt_index).index(owner)]) for c in cands.numpy())
            assert iou >= fam.pos_iou or iou == pytest.approx(best)  # above the threshold, or the forced best
            checked += 1
    assert checked == int((a.roles >= 0).sum()) >= 2


def test_yolov1_panel_names_the_responsible_predictor():
    det = family("yolov1")
    fam = det.family  # S = 4, B = 2
    boxes, labels = torch.tensor([[[0.6, 0.6, 0.9, 0.9]]]), torch.tensor([[1]])
    raw = torch.zeros(1, 4, 4, 5 * 2 + 3)
    raw[0, 3, 3, 5 + 0] = raw[0, 3, 3, 5 + 1] = -8.0  # predictor 1 of cell (3, 3) predicts the object
    raw[0, 3, 3, 5 + 2] = raw[0, 3, 3, 5 + 3] = float(np.log(0.3**0.5 / (1 - 0.3**0.5)))
    a, _ = analyse_batch(fam, fam.candidate_boxes(), boxes, labels, raw)
    (panel,) = build_panels(fam.layout(), fam.candidate_boxes(), a.roles[0], boxes[0], a.valid[0], 128)
    assert panel.slot.tolist() == [1] and panel.shares_box.tolist() == [True]
    np.testing.assert_allclose(panel.positives[0], [96, 96, 128, 128])  # the cell holding the centre, in pixels


# ----------------------------------------------------------------------------- compare
STABILITY_ROWS = [
    "video frames, tracks, VOC AP@0.5 on those frames",
    "E_F / E_C / E_R (mean over score thresholds 0.1..0.9; lower is steadier)",
    "Phi = E_F + E_C + E_R: mean over 0.1..0.9 / at the display threshold",
    "annotated objects detected at the display threshold",
]
ROWS = [
    "architecture", "input, seed, budget", "trained", "maps (grid x anchors)", "candidates", "values per candidate",
    "scoring", "parameters", "MACs at the input size", "positives per object, small / medium / large (mean)",
    "objects only forced / lost / without a positive", "ignored candidates per image (mean)",
    "positive : negative, before / after mining", "terms at the start (share of their sum)",
    "terms at the end (share of their sum)", "VOC AP@0.5", "COCO AP@[.5:.95]", "COCO AP small / medium / large",
    "per-class AP@0.5", "false positives by kind (score >= display threshold)", "true positives / missed objects",
    "training images/s (median of metrics.csv)", "inference latency, batch 1 (ms)",
    "inference latency, batch 16 (ms per batch / per image)", "decode + NMS share of inference, batch 1 / 16",
    *STABILITY_ROWS,
]


def _tiny_run(tmp_path: Path, arch: str) -> Path:
    from onestage.engine.trainer import train

    extra = {"ssdlite": ["model.extra_channels=[32,32,32]"], "yolov3": ["model.yolov3.neck_width=0.25"],
             "yolov1": ["model.yolov1.hidden=16"]}[arch]
    cfg = load_config(ROOT / f"configs/compare/{arch}_shapes.yaml", [
        "model.width_mult=0.25", "model.input_size=96", "data.train.num_images=16", "data.val.num_images=4",
        "train.batch_size=4", "train.time_budget=null", "train.epochs=1", "precision.amp=false", f"train.out_dir={tmp_path}", *extra])
    run_dir = tmp_path / arch
    run_dir.mkdir()
    train(cfg, run_dir, progress=False, max_steps=1)
    return run_dir


@pytest.fixture
def no_calibration(monkeypatch):
    """Precision as configured (fp32 here), without the timing runs of ``precision.amp: auto``."""
    from onestage.engine import calibrate, trainer

    def as_configured(cfg, model, shape, device, **kwargs):
        return calibrate.decide_precision(cfg, calibrate.device_kind(torch.device(device)), {})

    monkeypatch.setattr(calibrate, "resolve_precision", as_configured)
    monkeypatch.setattr(trainer, "resolve_precision", as_configured)


def test_compare_two_runs_gives_every_row_for_each_model(tmp_path, no_calibration):
    runs = [_tiny_run(tmp_path, "ssdlite"), _tiny_run(tmp_path, "yolov3")]
    out = tmp_path / "cmp"
    assert cli_main(["compare", "--runs", *map(str, runs), "--out", str(out), "--assign-images", "4", "--draw", "2",
                     "--latency-repeats", "1", "--no-progress"]) == 0
    data = json.loads((out / "compare.json").read_text())
    assert data["models"] == ["ssdlite", "yolov3"]
    assert [r["row"] for r in data["table"]] == ROWS
    for row in data["table"]:
        assert all(str(row[m]).strip() for m in data["models"]), row
    by_row = {r["row"]: r for r in data["table"]}
    assert all(by_row[r]["ssdlite"] == STABILITY_NA for r in STABILITY_ROWS)  # no video given, val split of images
    assert "softmax" in by_row["scoring"]["ssdlite"] and "objectness" in by_row["scoring"]["yolov3"]
    assert by_row["candidates"]["yolov3"] == f"{data['measurements']['yolov3']['outputs']['total_candidates']:,}"
    md = (out / "compare.md").read_text()
    assert all(name in md for name in ROWS)
    assert (out / "detections.png").exists() and (out / "assign_yolov3.png").exists()
    html = (out / "report.html").read_text()
    assert STABILITY_ROWS[0] in html and "yolov3" in html


def test_compare_stability_rows_come_from_held_out_videos(tmp_path, no_calibration, capsys):
    """``--video DIR``: the stability rows equal ``onestage eval`` of the same checkpoint on that
    video folder (same detections, same metric), for each model."""
    from onestage.data.moving_shapes import write_moving_shapes

    videos = tmp_path / "videos"
    write_moving_shapes(videos, 2, 6, seed=5)
    runs = [_tiny_run(tmp_path, "ssdlite"), _tiny_run(tmp_path, "yolov1")]
    out = tmp_path / "cmp"
    assert cli_main(["compare", "--runs", *map(str, runs), "--out", str(out), "--assign-images", "2", "--draw", "1",
                     "--latency-repeats", "1", "--no-progress", "--video", str(videos)]) == 0
    data = json.loads((out / "compare.json").read_text())
    for name, run in zip(data["models"], runs):
        st = data["measurements"][name]["stability"]
        assert st["frames"] == 12 and st["source"] == str(videos)
        ckpt = run / ("best.pt" if (run / "best.pt").exists() else "last.pt")
        capsys.readouterr()
        assert cli_main(["eval", str(run / "config.yaml"), str(ckpt), f"data.val={{format: mot, root: {videos}}}",
                         "eval.metrics=[voc,coco]", "--json"]) == 0
        evaluated = json.loads(capsys.readouterr().out)
        for key in ("stability_fragment", "stability_center", "stability_scale_ratio", "stability_total",
                    "stability_total_fixed", "voc_ap50"):
            want = evaluated["metrics"][key] if key == "voc_ap50" else evaluated[key]
            assert st[key] == pytest.approx(float("nan") if want is None else want, nan_ok=True), key
    by_row = {r["row"]: r for r in data["table"]}
    assert by_row[STABILITY_ROWS[0]]["yolov1"].startswith(f"12 frames ({videos})")
    assert by_row[STABILITY_ROWS[3]]["ssdlite"].endswith("%")


# ----------------------------------------------------------------------------- configs
COMPARE_CONFIGS = sorted((ROOT / "configs/compare").glob("*.yaml"))


@pytest.mark.parametrize("path", COMPARE_CONFIGS, ids=lambda p: p.name)
def test_compare_configs_load_and_build(path):
    cfg = load_config(path)
    if cfg.model.backbone == "darknet53":  # the layout does not depend on the width; a full Darknet-53 is slow to build
        cfg = load_config(path, ["model.width_mult=0.25"])
    det = build_detector(cfg, CLASSES)
    assert det.family is not None and sum(r.candidates for r in det.layout) > 0


@pytest.mark.parametrize("data", ["shapes", "bccd"])
def test_compare_triples_differ_only_in_the_head(data):
    dumps = []
    for arch in ("ssdlite", "yolov3", "yolov1"):
        d = load_config(ROOT / f"configs/compare/{arch}_{data}.yaml").model_dump(mode="json")
        for key in ("arch", "anchors", "yolov3", "yolov1", "priors", "extra_channels", "ssd"):
            d["model"].pop(key)
        d["train"].pop("name")
        dumps.append(d)
    assert dumps[0] == dumps[1] == dumps[2]
