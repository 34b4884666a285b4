"""ONNX export (issue 19): every shipped config's model exports and matches eager PyTorch, the NMS
tail equals ``select_detections`` on ties and degenerate boxes, the metadata round-trips through
``onestage predict model.onnx``, which never imports torch, and impossible exports say why.

Models have random weights and small inputs (the op types of each config kept: VGG16's
ceil-mode pooling and L2Norm at input 68, where ceil mode turns 17 into 9); checkpoints are
written in the format of ``engine/trainer.py``'s ``_checkpoint_state`` (the keys predict reads).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import onestage
from onestage.build import build_detector
from onestage.cli import main as cli_main
from onestage.config import dump_config, load_config
from onestage.engine.checkpoint import save_checkpoint
from onestage.export import ExportError
from onestage.export.nms_graph import TailSettings, tail_model
from onestage.export.onnx import RAW_TOL, compare_detections, export_onnx
from onestage.export.runtime import OnnxDetector, preprocess, run_tail
from onestage.postprocess import select_detections
from onestage.postprocess.topk import stable_top_k

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["circle", "square", "triangle"]
# Every shipped config at a small size; what each keeps of its model is in the comment.
SMALL = {
    "demo": ["model.input_size=128"],  # SSD on the tiny backbone
    "demo_shapes": ["model.input_size=128", "model.width_mult=0.25"],  # SSDLite, MobileNetV2
    "raccoon_ssdlite": ["model.input_size=96", "model.width_mult=0.25"],
    "ssd300_mobilenetv2_voc": ["model.input_size=96", "model.width_mult=0.25", "model.extra_channels=[32,32,32]"],
    "ssd300_vgg16_voc": ["model.input_size=68", "model.extra_channels=[32,32,32,32]"],  # ceil-mode pool3, L2Norm
    "ssd512_vgg16_voc": ["model.input_size=68", "model.extra_channels=[32,32,32,32,32]"],
    "yolov1_shapes": ["model.input_size=224"],  # tiny backbone, conv head, S = 7
    "yolov3_shapes": ["model.input_size=96", "eval.pre_nms_top_k=300"],  # YOLOv3 on MobileNetV2
    "yolov3_voc": ["model.input_size=96", "model.width_mult=0.125", "model.yolov3.neck_width=0.125",
                   "eval.pre_nms_top_k=300"],  # Darknet-53
    "yolov3_coco": ["model.input_size=64", "model.width_mult=0.125", "model.yolov3.neck_width=0.125",
                    "eval.pre_nms_top_k=300"],
}


def write_checkpoint(path: Path, config: str, overrides: list[str], spread: float = 1.0) -> Path:
    """A random-weight checkpoint with the keys ``onestage predict`` reads. ``spread`` scales the
    classification layers so that scores cover [0, 1] instead of an untrained model's narrow band."""
    cfg = load_config(ROOT / "configs" / f"{config}.yaml", overrides)
    torch.manual_seed(0)
    det = build_detector(cfg, CLASSES)
    state = det.model.state_dict()
    if spread != 1.0:
        for name, value in state.items():
            if ("cls_predictors" in name or "predictors" in name) and name.endswith("weight"):
                value.mul_(spread)
    save_checkpoint(path, {"version": onestage.__version__, "config": dump_config(cfg), "class_names": CLASSES,
                           "model": state, "ema": None})
    return path


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("export")


@pytest.fixture(scope="module")
def demo(work) -> dict[str, Path]:
    """The demo model (spread scores), exported raw with a dynamic batch and with NMS."""
    ckpt = write_checkpoint(work / "demo.pt", "demo_shapes", SMALL["demo_shapes"], spread=30.0)
    raw = work / "demo_raw.onnx"
    export_onnx(ckpt, raw, dynamic_batch=True, check_images=5)  # checked at batch 5 and batch 1
    nms = work / "demo_nms.onnx"
    export_onnx(ckpt, nms, nms=True)
    return {"ckpt": ckpt, "raw": raw, "nms": nms}


# ----------------------------------------------------------------------------- every model
@pytest.mark.parametrize("config", sorted(SMALL))
def test_every_shipped_config_exports_and_matches_eager(config, work):
    ckpt = write_checkpoint(work / f"{config}.pt", config, SMALL[config])
    out = work / f"{config}.onnx"
    # Score threshold 0: every candidate reaches the NMS, which the check compares with PyTorch's.
    report = export_onnx(ckpt, out, nms=True, dynamic_batch=True, check_images=2, overrides=["eval.score_threshold=0"])
    assert out.is_file()
    assert report.raw_boxes_diff <= RAW_TOL and report.raw_scores_diff <= RAW_TOL
    model = onnx.load(str(out))
    ops = {n.op_type for n in model.graph.node}
    assert "NonMaxSuppression" in ops
    if "vgg16" in config:  # the reference SSD300 parts survive: ceil-mode pooling, L2Norm's division
        assert any(n.op_type == "MaxPool" and any(a.name == "ceil_mode" and a.i == 1 for a in n.attribute)
                   for n in model.graph.node)
    assert [d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim][:1] == ["batch"]
    assert report.tail_detections > 0 and report.batches == [2, 1]  # NMS compared on real detections, 2 batch sizes


def test_the_yolov1_fully_connected_head_exports(work):
    ckpt = write_checkpoint(work / "yolov1_fc.pt", "yolov1_shapes",
                            SMALL["yolov1_shapes"] + ["model.yolov1.head=fc", "model.yolov1.hidden=64"])
    report = export_onnx(ckpt, work / "yolov1_fc.onnx", nms=True, check_images=2)
    assert report.raw_scores_diff <= RAW_TOL
    assert "Gemm" in {n.op_type for n in onnx.load(str(work / "yolov1_fc.onnx")).graph.node}


# ----------------------------------------------------------------------------- the NMS tail
def _tail_equals_select(boxes: np.ndarray, scores: np.ndarray, s: TailSettings, opset: int = 17) -> list:
    session = ort.InferenceSession(tail_model(boxes.shape[1], scores.shape[2], s, opset).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    got = session.run(None, {"candidate_boxes": boxes, "candidate_scores": scores})
    ref = select_detections(torch.from_numpy(boxes), torch.from_numpy(scores), score_threshold=s.score_threshold,
                            nms_iou=s.nms_iou, max_detections=s.max_detections, pre_nms_top_k=s.pre_nms_top_k,
                            top_k_per=s.top_k_per)
    assert compare_detections(ref, got, 1, box_tol=0.0, score_tol=0.0) is None  # bit for bit
    return got


@pytest.mark.parametrize("scope", ["class", "image"])
def test_tail_by_hand_ties_degenerate_boxes_and_the_threshold(scope):
    box, near = [0.1, 0.1, 0.5, 0.5], [0.1, 0.1, 0.5, 0.52]  # IoU 0.96
    boxes = np.array([[near, box, [0.3, 0.3, 0.3, 0.6], [0.3, 0.3, 0.3, 0.6], [0.6, 0.6, 0.9, 0.9]]], np.float32)
    # two overlapping boxes tied at 0.7: the first (lower index) is kept, the second suppressed;
    # two zero-width boxes overlap nothing (IoU 0) and both stay; the last box has exactly the
    # score threshold (0.25) and is kept (>=, as in PyTorch; onnxruntime alone would drop it).
    scores = np.array([[[0.7], [0.7], [0.5], [0.5], [0.25]]], np.float32)
    got = _tail_equals_select(boxes, scores, TailSettings(0.25, 0.45, 10, 10, scope))
    boxes_out, scores_out, labels, count = got
    assert count.tolist() == [4]
    assert scores_out[0, :4].tolist() == pytest.approx([0.7, 0.5, 0.5, 0.25])
    np.testing.assert_array_equal(boxes_out[0, 0], np.float32(near))
    assert labels[0, :4].tolist() == [0, 0, 0, 0] and labels[0, 4:].tolist() == [-1] * 6  # padding


def test_tail_at_exactly_the_iou_threshold_keeps_the_box():
    boxes = np.array([[[0.0, 0.0, 0.4, 1.0], [0.2, 0.0, 0.6, 1.0]]], np.float32)  # IoU exactly 1/3
    got = _tail_equals_select(boxes, np.array([[[0.9], [0.8]]], np.float32), TailSettings(0.0, 1 / 3, 10, 5, "class"))
    assert got[3].tolist() == [2]


@pytest.mark.parametrize("trial", range(12))
def test_tail_equals_select_detections_on_random_tied_and_degenerate_inputs(trial):
    rng = np.random.default_rng(trial)
    b, n, c = 2, int(rng.integers(5, 60)), int(rng.integers(1, 4))
    centre, size = rng.random((b, n, 2)), rng.random((b, n, 2)) * 0.5
    size[rng.random((b, n)) < 0.2] = 0.0  # degenerate: zero width and height
    boxes = np.concatenate([centre - size / 2, centre + size / 2], -1).clip(0, 1).astype(np.float32)
    boxes[:, n // 2 :] = boxes[:, : n - n // 2]  # every box twice
    scores = (np.round(rng.random((b, n, c)) * 4) / 4).astype(np.float32)  # five values: ties everywhere
    settings = TailSettings(float(rng.choice([0.0, 0.25])), float(rng.choice([0.0, 0.45, 1.0])),
                            int(rng.integers(1, 2 * n)), int(rng.integers(1, 30)), ("class", "image")[trial % 2])
    _tail_equals_select(boxes, scores, settings, opset=(11, 13, 17)[trial % 3])


def test_stable_top_k_orders_ties_by_index_also_at_the_cut():
    values = torch.tensor([[0.5, 0.7, 0.5, 0.7, 0.7, 0.1, 0.5]])
    top, idx = stable_top_k(values, 4)
    assert idx.tolist() == [[1, 3, 4, 0]] and top[0].tolist() == pytest.approx([0.7, 0.7, 0.7, 0.5])
    assert stable_top_k(values, 2)[1].tolist() == [[1, 3]]


# ----------------------------------------------------------------------------- metadata and the runtime
def test_metadata_says_what_the_runtime_needs(demo):
    meta = {p.key: p.value for p in onnx.load(str(demo["nms"])).metadata_props}
    assert json.loads(meta["class_names"]) == CLASSES
    assert meta["input_size"] == "128" and meta["resize"] == "resize" and meta["family"] == "ssd"
    assert json.loads(meta["mean"]) == pytest.approx([0.485, 0.456, 0.406])
    assert meta["onestage_version"] == onestage.__version__ and meta["outputs"] == "nms"
    assert float(meta["score_threshold"]) == 0.01 and float(meta["nms_iou"]) == 0.45
    assert meta["top_k_per"] == "class" and meta["max_detections"] == "200"


def test_runtime_preprocessing_is_the_eval_transform_and_the_metadata_names_it(demo, work):
    from onestage.export.onnx import metadata, tail_settings

    ckpt = write_checkpoint(work / "yolo_letterbox.pt", "yolov3_shapes", SMALL["yolov3_shapes"])
    image = (np.random.default_rng(0).random((70, 150, 3)) * 255).astype(np.uint8)
    for path in (demo["ckpt"], ckpt):
        loaded = onestage.load_detector(path, device="cpu")
        meta = metadata(loaded, tail_settings(loaded.detector), nms=False, opset=17, dynamic=False, half=False,
                        num_candidates=1, source=path.name)
        expected = "letterbox" if path == ckpt else "resize"
        assert meta["resize"] == expected and meta["pad_value"] == ("114" if expected == "letterbox" else "0")
        x = preprocess(image, meta["resize"], int(meta["input_size"]), (int(meta["pad_value"]),) * 3,
                       json.loads(meta["mean"]), json.loads(meta["std"]))
        np.testing.assert_array_equal(x, loaded.transform(image, np.zeros((0, 4)), np.zeros(0))[0].numpy())


def _images(folder: Path) -> Path:
    import cv2

    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(1)
    for i, (h, w) in enumerate([(90, 160), (128, 128), (200, 75)]):
        cv2.imwrite(str(folder / f"im{i}.png"), (rng.random((h, w, 3)) * 255).astype(np.uint8))
    return folder


def _detections(path: Path) -> list[dict]:
    return json.loads((path / "detections.json").read_text())


@pytest.mark.parametrize("kind", ["raw", "nms"])
def test_predict_onnx_gives_what_predict_checkpoint_gives(demo, work, kind):
    images = _images(work / "images")
    assert cli_main(["predict", str(demo["ckpt"]), str(images), "--out", str(work / f"ckpt_{kind}"),
                     "precision.amp=false"]) == 0  # the exported file is fp32
    assert cli_main(["predict", str(demo[kind]), str(images), "--out", str(work / f"onnx_{kind}")]) == 0
    ckpt, exported = _detections(work / f"ckpt_{kind}"), _detections(work / f"onnx_{kind}")
    assert sum(len(e["detections"]) for e in ckpt) > 0  # at the display threshold 0.4, read from the metadata
    for a, b in zip(ckpt, exported):
        assert Path(a["image"]).name == Path(b["image"]).name and (a["width"], a["height"]) == (b["width"], b["height"])
        assert [d["class"] for d in a["detections"]] == [d["class"] for d in b["detections"]]
        for da, db in zip(a["detections"], b["detections"]):
            assert da["box_xyxy"] == pytest.approx(db["box_xyxy"], abs=0.011)  # rounded to 2 decimals
            assert da["score"] == pytest.approx(db["score"], abs=2e-4)
    assert sorted(p.name for p in (work / f"onnx_{kind}").glob("*.png")) == ["im0.png", "im1.png", "im2.png"]


def test_predict_onnx_never_imports_torch(demo, work):
    images = _images(work / "images")
    code = (
        "import sys\n"
        "from onestage.cli import main\n"
        f"rc = main(['predict', {str(demo['nms'])!r}, {str(images)!r}, '--out', {str(work / 'boundary')!r}])\n"
        "loaded = [m for m in sys.modules if m == 'torch' or m.startswith(('torch.', 'onestage.engine', 'onestage.models',"
        " 'onestage.build', 'onestage.api', 'onestage.losses'))]\n"
        "print('LOADED', loaded)\n"
        "sys.exit(rc if not loaded else 99)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            env={"PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "LOADED []" in result.stdout
    assert len(_detections(work / "boundary")) == 3


def test_predict_onnx_refuses_settings_it_cannot_change(demo, work, capsys):
    assert cli_main(["predict", str(demo["nms"]), str(_images(work / "images")), "--out", str(work / "x"),
                     "eval.score_threshold=0.5"]) == 2
    assert "carries its inference settings" in capsys.readouterr().err


def test_runtime_batches_a_fixed_batch_file_and_a_dynamic_one_alike(demo):
    image = (np.random.default_rng(3).random((60, 80, 3)) * 255).astype(np.uint8)
    fixed, dynamic = OnnxDetector(demo["nms"]), OnnxDetector(demo["raw"])
    assert fixed.fixed_batch == 1 and dynamic.fixed_batch is None
    a = fixed.predict([image] * 5, threshold=0.0)
    b = dynamic.predict([image] * 5, threshold=0.0)
    assert len(a) == len(b) == 5 and len(a[0]) > 0 and len(b[0]) > 0
    np.testing.assert_array_equal(a[4].boxes, a[0].boxes)  # one image at a time through the batch-1 file


# ----------------------------------------------------------------------------- what cannot be exported
def test_an_impossible_export_says_what_and_how_and_leaves_no_file(work):
    # The tiny backbone at 128 gives a 4 x 4 map that YOLOv1 pools up to 7 x 7: no ONNX op does that.
    ckpt = write_checkpoint(work / "yolov1_128.pt", "yolov1_shapes", ["model.input_size=128"])
    out = work / "impossible.onnx"
    with pytest.raises(ExportError, match="multiple of S"):
        export_onnx(ckpt, out)
    assert not out.exists()
    with pytest.raises(ExportError, match="opset >= 11"):
        export_onnx(ckpt, out, nms=True, opset=10)
    assert not out.exists()


def test_a_file_that_does_not_match_pytorch_is_deleted(work, monkeypatch):
    import onestage.export.onnx as exporter

    ckpt = write_checkpoint(work / "mismatch.pt", "yolov1_shapes", SMALL["yolov1_shapes"])
    monkeypatch.setattr(exporter, "RAW_TOL", -1.0)  # no difference can be small enough
    out = work / "mismatch.onnx"
    with pytest.raises(ExportError, match="the file was deleted"):
        exporter.export_onnx(ckpt, out, check_images=1)
    assert not out.exists()


def test_run_tail_is_the_file_tail(demo):
    """A raw file + the runtime's tail gives what the NMS file gives on the same input."""
    raw, nms = ort.InferenceSession(str(demo["raw"])), ort.InferenceSession(str(demo["nms"]))
    x = np.random.default_rng(0).standard_normal((1, 3, 128, 128)).astype(np.float32)
    meta = OnnxDetector(demo["raw"])
    for a, b in zip(run_tail(*raw.run(None, {"images": x}), meta.tail), nms.run(None, {"images": x})):
        np.testing.assert_array_equal(a, b)


def test_predict_on_an_onnx_file_it_cannot_use_names_the_file(work, capsys):
    images = _images(work / "images")
    (work / "garbage.onnx").write_text("not a model")
    onnx.save(tail_model(10, 2, TailSettings(0.1, 0.5, 5, 5, "class")), str(work / "foreign.onnx"))
    for name, why in (("garbage.onnx", "onnxruntime cannot load it"), ("foreign.onnx", "no onestage metadata"),
                      ("absent.onnx", "no such ONNX file")):
        assert cli_main(["predict", str(work / name), str(images), "--out", str(work / "o")]) == 2
        assert f"{name}: {why}" in capsys.readouterr().err
