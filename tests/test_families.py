"""The one interface of every detector family (issue 16): assignment alone on a hand-made
batch, candidates, decode, the registries, config symmetry, the shared post-processing tail,
and the Python API against the command line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from onestage.api import load_detector
from onestage.build import build_detector
from onestage.cli import main as cli_main
from onestage.config import ConfigError, load_config
from onestage.families import BACKGROUND, IGNORE, positives_per_object
from onestage.postprocess import batched_nms, nms_keep_mask, select_detections

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["a", "b", "c"]


def family(arch: str, *overrides: str):
    extra = {
        "ssd": ["model.width_mult=0.25", "model.extra_channels=[32,32,32]"],
        "yolov3": ["model.width_mult=0.25", "model.yolov3.neck_width=0.25", "model.anchors.sizes=[[[64,64]],[[32,32]],[[16,16]]]"],
        "yolov1": ["model.backbone=tiny", "model.yolov1.head=conv", "model.yolov1.hidden=16", "model.yolov1.grid=4"],
    }[arch]
    cfg = load_config(None, [f"model.arch={arch}", "model.input_size=128", *extra, *overrides])
    return build_detector(cfg, CLASSES)


# ----------------------------------------------------------------------------- assignment alone
def test_ssd_assign_alone_gives_the_matcher_roles_by_hand():
    det = family("ssd", "model.ssd.matcher.pos_iou=0.5", "model.ssd.matcher.neg_iou=0.4")
    fam = det.family
    cands = fam.candidate_boxes()  # (P, 4) xyxy: the priors
    assert cands.shape == (det.priors.shape[0], 4)
    # An object exactly on prior 7: that prior is positive with IoU 1; padding never matches.
    boxes = torch.stack([cands[7], torch.zeros(4)])[None]  # (1, 2, 4)
    labels = torch.tensor([[2, -1]])
    a = fam.assign(boxes, labels)
    assert a.roles.shape == (1, cands.shape[0])
    assert a.roles[0, 7] == 0
    assert set(a.roles.unique().tolist()) <= {BACKGROUND, IGNORE, 0}
    assert a.positives.tolist() == [[int((a.roles[0] == 0).sum()), 0]]
    assert a.valid.tolist() == [[True, False]]
    # brute force of the rule in numpy: positive iff IoU >= 0.5 (or forced), ignored in [0.4, 0.5)
    c = cands.numpy().astype(np.float64)
    g = boxes[0, 0].numpy().astype(np.float64)
    inter = (np.clip(np.minimum(c[:, 2], g[2]) - np.maximum(c[:, 0], g[0]), 0, None)
             * np.clip(np.minimum(c[:, 3], g[3]) - np.maximum(c[:, 1], g[1]), 0, None))
    iou = inter / ((c[:, 2] - c[:, 0]) * (c[:, 3] - c[:, 1]) + (g[2] - g[0]) * (g[3] - g[1]) - inter)
    expected = np.where(iou >= 0.5, 0, np.where(iou >= 0.4, IGNORE, BACKGROUND))
    np.testing.assert_array_equal(a.roles[0].numpy(), expected)


def test_ssd_hard_negatives_need_the_model_outputs():
    det = family("ssd")
    boxes, labels = torch.tensor([[[0.1, 0.1, 0.5, 0.5]]]), torch.tensor([[0]])
    assert "hard_negative" not in det.family.assign(boxes, labels).extras
    with torch.no_grad():
        outputs = det.model.eval()(torch.zeros(1, 3, 128, 128))
    a = det.family.assign(boxes, labels, outputs)
    hard = a.extras["hard_negative"]
    assert hard.sum() == 3 * (a.roles >= 0).sum()  # 3 negatives per positive
    assert (a.roles[hard] == BACKGROUND).all()  # never a positive or an ignored prior


def test_yolov3_assign_alone_one_slot_and_a_collision_is_lost():
    det = family("yolov3")
    fam = det.family
    # Two 32-px objects (the middle scale's anchor) whose centres fall in the same 16 x 16 cell:
    # the later one wins the slot, the earlier one is lost.
    boxes = torch.tensor([[[0.40, 0.40, 0.65, 0.65], [0.41, 0.41, 0.66, 0.66], [0.0, 0.0, 0.0, 0.0]]])
    labels = torch.tensor([[0, 1, -1]])
    a = fam.assign(boxes, labels)
    assert a.roles.shape == (1, fam.candidate_boxes().shape[0])
    assert a.positives.tolist() == [[0, 1, 0]]
    assert a.extras["lost"].tolist() == [[1, 0, 0]]
    slot = int((a.roles[0] == 1).nonzero())
    # the slot's anchor box sits on the cell holding the object's centre, with the 32 px anchor
    anchor_box = fam.candidate_boxes()[slot]
    centre = (boxes[0, 1, :2] + boxes[0, 1, 2:]) / 2
    assert anchor_box[0] <= centre[0] <= anchor_box[2] and anchor_box[1] <= centre[1] <= anchor_box[3]
    assert anchor_box[2] - anchor_box[0] == pytest.approx(32 / 128)
    assert "needs the model's outputs" in a.extras["ignore_rule"] and not (a.roles == IGNORE).any()


def test_yolov3_object_between_two_cells_lands_where_its_centre_falls():
    fam = family("yolov3").family
    # 8 x 8 grid of the middle scale at 128 px (stride 16): a centre at x = 0.5 exactly is on
    # the border of columns 3 and 4 and belongs to column 4; at 0.49 to column 3.
    for cx, column in ((0.5, 4), (0.49, 3)):
        boxes = torch.tensor([[[cx - 0.125, 0.3, cx + 0.125, 0.55]]])
        a = fam.assign(boxes, torch.tensor([[0]]))
        slot = int((a.roles[0] == 0).nonzero())
        x1, _, x2, _ = fam.candidate_boxes()[slot].tolist()
        assert (x1 + x2) / 2 == pytest.approx((column + 0.5) / 8)


def test_yolov1_assign_alone_cell_and_responsible_predictor():
    det = family("yolov1")
    fam = det.family  # S = 4, B = 2: 32 candidates
    assert fam.candidate_boxes().shape == (32, 4)
    boxes = torch.tensor([[[0.05, 0.05, 0.2, 0.2], [0.6, 0.6, 0.9, 0.9], [0.0, 0.0, 0.1, 0.1]]])
    labels = torch.tensor([[0, 1, 2]])
    a = fam.assign(boxes, labels)
    # object 0 in cell (0, 0), object 1 in cell (3, 3); object 2 shares cell (0, 0) and is smaller: lost
    assert a.roles.shape == (1, 32)
    assert a.roles[0, (0 * 4 + 0) * 2 + 0] == 0 and a.roles[0, (3 * 4 + 3) * 2 + 0] == 1  # predictor 0 without outputs
    assert a.positives.tolist() == [[1, 1, 0]] and a.extras["lost"].tolist() == [[0, 0, 1]]
    assert (a.roles[0][a.roles[0] < 0] == BACKGROUND).all()  # YOLOv1 ignores nothing
    # With outputs, the predictor whose box overlaps the object most is responsible.
    raw = torch.zeros(1, 4, 4, 5 * 2 + 3)
    # predictor 1 of cell (3, 3) predicts the object itself: centre at the cell's corner, side sqrt(0.3)^2
    raw[0, 3, 3, 5 + 0] = raw[0, 3, 3, 5 + 1] = -8.0
    raw[0, 3, 3, 5 + 2] = raw[0, 3, 3, 5 + 3] = float(np.log(0.3**0.5 / (1 - 0.3**0.5)))
    a = fam.assign(boxes, labels, raw)
    assert a.roles[0, (3 * 4 + 3) * 2 + 1] == 1 and a.roles[0, (3 * 4 + 3) * 2] == BACKGROUND


@pytest.mark.parametrize("arch", ["ssd", "yolov3", "yolov1"])
def test_decode_gives_the_candidates_and_the_postprocessor_ends_with_the_shared_tail(arch):
    det = family(arch)
    with torch.no_grad():
        outputs = det.model.eval()(torch.randn(2, 3, 128, 128))
    boxes, scores = det.family.decode(outputs)
    n = det.family.candidate_boxes().shape[0]
    assert boxes.shape == (2, n, 4) and scores.shape == (2, n, 3)
    assert sum(r.candidates for r in det.family.layout()) == n
    assert ((scores >= 0) & (scores <= 1)).all()


def test_positives_per_object_counts_by_hand():
    roles = torch.tensor([[0, 0, -1, 1, -2], [2, -1, -1, -1, -1]])
    assert positives_per_object(roles, 3).tolist() == [[2, 1, 0], [0, 0, 1]]


# ----------------------------------------------------------------------------- registries and config symmetry
def test_unknown_arch_or_backbone_lists_the_known_ones():
    cfg = load_config(None)
    object.__setattr__(cfg.model, "arch", "retinanet")  # past the schema, as a plugin might
    with pytest.raises(ConfigError, match="unknown architecture 'retinanet'; known: ssd, ssdlite, yolov3, yolov1"):
        build_detector(cfg, CLASSES)
    cfg = load_config(None)
    object.__setattr__(cfg.model, "backbone", "resnet50")
    with pytest.raises(ConfigError, match="unknown backbone 'resnet50'; known: mobilenet_v2, vgg16"):
        build_detector(cfg, CLASSES)
    with pytest.raises(ConfigError, match="model.arch"):
        load_config(None, ["model.arch=retinanet"])


@pytest.mark.parametrize("arch,key", [
    ("yolov3", "model.ssd.matcher.pos_iou=0.6"), ("yolov1", "model.ssd.loss.alpha=2"), ("yolov3", "model.priors.s_min=0.1"),
    ("ssd", "model.yolov3.ignore_thres=0.7"), ("ssd", "model.anchors.sizes=[[[10,10]]]"), ("yolov3", "model.yolov1.grid=5"),
])
def test_a_setting_of_another_family_is_an_error(arch, key):
    with pytest.raises(ConfigError, match=f"{key.split('=')[0].split('.')[1]}.*belongs to model.arch"):
        load_config(None, [f"model.arch={arch}", key])


def test_the_old_top_level_matcher_and_loss_load_under_model_ssd(tmp_path):
    old = tmp_path / "old.yaml"
    old.write_text("matcher: {pos_iou: 0.6, neg_iou: 0.3}\nloss: {alpha: 2.0, variances: [0.1, 0.3]}\n")
    with pytest.warns(UserWarning, match="matcher -> model.ssd.matcher"):
        cfg = load_config(old)
    assert cfg.model.ssd.matcher.pos_iou == 0.6 and cfg.model.ssd.loss.alpha == 2.0
    assert cfg.model.ssd.variances == (0.1, 0.3)


def test_inference_never_reads_the_training_loss_settings():
    det = family("ssd", "model.ssd.variances=[0.1,0.3]", "model.ssd.loss.alpha=5")
    assert det.postprocess.variances == (0.1, 0.3) and det.criterion.variances == (0.1, 0.3)


@pytest.mark.parametrize("config", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_inspect_prints_what_it_printed_before_the_family_interface(config, capsys):
    """tests/data/inspect/*.txt were recorded with the code before issue 16 (commit 3e74640)."""
    assert cli_main(["inspect", str(ROOT / "configs" / config), "--num-classes", "20"]) == 0
    expected = (ROOT / "tests" / "data" / "inspect" / config.replace(".yaml", ".txt")).read_text()
    assert capsys.readouterr().out == expected


# ----------------------------------------------------------------------------- one NMS, one tail
def test_nms_keeps_a_box_at_exactly_the_threshold_iou():
    # IoU of [0,0,1,1] and [0,0,1,0.5] is 0.5 exactly (in binary): kept at threshold 0.5, as torchvision.
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 0.5]])
    assert batched_nms(boxes, torch.tensor([0.9, 0.8]), torch.tensor([0, 0]), 0.5).tolist() == [0, 1]
    assert batched_nms(boxes, torch.tensor([0.9, 0.8]), torch.tensor([0, 0]), 0.49).tolist() == [0]
    keep = nms_keep_mask(boxes[None], torch.ones(1, 2, dtype=torch.bool), 0.5)
    assert keep.tolist() == [[True, True]]


def test_shared_tail_scopes_agree_when_nothing_is_cut():
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(2, 30, 2, generator=g) * 0.7
    boxes = torch.cat((xy, xy + 0.1 + 0.2 * torch.rand(2, 30, 2, generator=g)), dim=-1)
    scores = torch.rand(2, 30, 3, generator=g)
    a = select_detections(boxes, scores, score_threshold=0.3, nms_iou=0.45, max_detections=1000, pre_nms_top_k=10_000,
                          top_k_per="class")
    b = select_detections(boxes, scores, score_threshold=0.3, nms_iou=0.45, max_detections=1000, pre_nms_top_k=10_000,
                          top_k_per="image")
    for da, db in zip(a, b):
        assert torch.equal(da.scores, db.scores) and torch.equal(da.labels, db.labels) and torch.equal(da.boxes, db.boxes)
        assert len(da) > 0 and (da.scores >= 0.3).all()


def test_ssd_nms_honours_force_fp32_nms():
    """SSD used to pass no dtype to NMS, so `force_fp32: nms` off still ran fp32."""
    det = family("ssd", "precision.amp=true", "precision.force_fp32=[iou]")
    seen = []
    import onestage.postprocess as pp

    original = pp.box_iou

    def spy(a, b, dtype=torch.float32):
        seen.append(dtype)
        return original(a, b, dtype=dtype)

    pp.box_iou = spy
    try:
        outputs = {"cls": torch.randn(1, det.priors.shape[0], 4, dtype=torch.bfloat16),
                   "loc": torch.randn(1, det.priors.shape[0], 4, dtype=torch.bfloat16) * 0.1}
        det.postprocess(outputs)
    finally:
        pp.box_iou = original
    assert seen == [torch.bfloat16]


# ----------------------------------------------------------------------------- the Python API
@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    from onestage.engine.trainer import train

    out = tmp_path_factory.mktemp("api")
    cfg = load_config(ROOT / "configs" / "demo_shapes.yaml", [
        "model.width_mult=0.25", "model.input_size=128", "data.train.num_images=8", "data.val.num_images=4",
        "data.augment.preset=none", "train.batch_size=4", "train.time_budget=null", "train.epochs=1",
        "schedule.warmup_steps=0", f"train.out_dir={out}", "train.name=api",
    ])
    train(cfg, out / "api", progress=False)
    return out / "api"


def test_load_detector_needs_no_yaml_and_predicts_in_original_pixels(trained_run, tmp_path):
    det = load_detector(trained_run / "best.pt", overrides=["eval.score_threshold=0"])  # an untrained model scores low
    assert det.class_names and det.input_size == 128
    image = (np.random.default_rng(0).random((90, 200, 3)) * 255).astype(np.uint8)
    (pred,) = det.predict([image], threshold=0.0)
    assert (pred.width, pred.height) == (200, 90)
    assert len(pred) > 0 and pred.boxes.shape == (len(pred), 4)
    assert (pred.boxes[:, 2] <= 200 + 1e-3).all() and (pred.boxes[:, 3] <= 90 + 1e-3).all()
    assert np.all(np.diff(pred.scores) <= 0) and pred.names == [det.class_names[c] for c in pred.labels]
    assert len(det.predict([image], threshold=0.5)[0]) == int((pred.scores >= 0.5).sum())


def test_api_and_cli_predict_give_the_same_detections(trained_run, tmp_path, capsys):
    import cv2

    images = tmp_path / "imgs"
    images.mkdir()
    rng = np.random.default_rng(1)
    for i in range(3):
        cv2.imwrite(str(images / f"im{i}.png"), (rng.random((64 + 20 * i, 100, 3)) * 255).astype(np.uint8))
    assert cli_main(["predict", str(trained_run / "best.pt"), str(images), "--out", str(tmp_path / "out"),
                     "--threshold", "0.001", "eval.score_threshold=0"]) == 0
    cli = json.loads((tmp_path / "out" / "detections.json").read_text())
    det = load_detector(trained_run / "best.pt", overrides=["eval.score_threshold=0"])
    api = det.predict(sorted(images.glob("*.png")), threshold=0.001)
    assert [Path(c["image"]).name for c in cli] == ["im0.png", "im1.png", "im2.png"]
    for c, p in zip(cli, api):
        assert c["detections"] == p.to_json()["detections"]
    assert sum(len(c["detections"]) for c in cli) > 0


def test_predict_with_an_input_size_override_uses_the_checkpoints_size(trained_run, tmp_path):
    """A model trained at 128 (an override) predicts with its own transform, whatever the config says."""
    det = load_detector(trained_run / "best.pt", config=ROOT / "configs" / "demo_shapes.yaml")
    assert det.input_size == 128 and det.transform.size == 128
    assert len(det.predict([np.zeros((50, 50, 3), np.uint8)], threshold=0.0)) == 1


# ----------------------------------------------------------------------------- checkpoints written before the family interface
@pytest.mark.parametrize("family_name", ["ssdlite", "yolov3", "yolov1"])
def test_a_checkpoint_of_the_layout_before_loads_and_predicts(family_name, tmp_path):
    """tests/data/old_checkpoints/*.json were written by the code before issue 16 (commit 3e74640):
    its dumped config (top-level `matcher` / `loss`) and its model's state_dict keys and shapes.
    The model built today from that config has the same keys and shapes, and a checkpoint in that
    format loads with `load_detector` and predicts."""
    import warnings

    recorded = json.loads((ROOT / "tests" / "data" / "old_checkpoints" / f"{family_name}.json").read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the note that matcher/loss moved under model.ssd
        from onestage.api import checkpoint_config

        cfg = checkpoint_config({"config": recorded["config"]}, "old")
    det = build_detector(cfg, recorded["class_names"])
    state = det.model.state_dict()
    assert {k: list(v.shape) for k, v in state.items()} == recorded["state_dict_shapes"]
    ckpt = tmp_path / "old.pt"
    torch.save({"config": recorded["config"], "class_names": recorded["class_names"], "model": state, "ema": None,
                "scheduler": {"total_steps": 10}}, ckpt)  # the old scheduler state: total_steps only
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = load_detector(ckpt, overrides=["eval.score_threshold=0", "precision.amp=false"])
    (pred,) = loaded.predict([np.zeros((60, 80, 3), np.uint8)], threshold=0.0)
    assert (pred.width, pred.height) == (80, 60) and len(pred) > 0
