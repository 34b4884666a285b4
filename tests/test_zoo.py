"""Every head on every backbone builds from a config and runs a training step (issue 7), and
`inspect` reproduces the seeds' numbers for every family."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from onestage.build import build_detector
from onestage.cli import main as cli_main
from onestage.config import load_config

ROOT = Path(__file__).resolve().parents[1]
BACKBONES = ["mobilenet_v2", "vgg16", "darknet53", "tiny", "yolov1"]
MAPS = {"mobilenet_v2": 3, "vgg16": 2, "darknet53": 3, "tiny": 3, "yolov1": 1}


def zoo_cfg(arch: str, backbone: str):
    overrides = [f"model.arch={arch}", f"model.backbone={backbone}", "model.input_size=128", "model.width_mult=0.25"]
    if arch == "yolov1":
        overrides.append("model.yolov1.hidden=32")
    if arch == "yolov3":
        overrides.append("model.yolov3.neck_width=0.25")
        groups = [[[40 + 10 * i, 40 + 10 * i]] for i in range(MAPS[backbone])]
        overrides.append(f"model.anchors.sizes={json.dumps(groups)}")
    if arch in ("ssd", "ssdlite"):
        overrides.append("model.extra_channels=" + json.dumps([32] * (6 - MAPS[backbone])))
    return load_config(None, overrides)


@pytest.mark.parametrize("arch", ["ssd", "ssdlite", "yolov3", "yolov1"])
@pytest.mark.parametrize("backbone", BACKBONES)
def test_every_head_on_every_backbone_trains_a_step(arch, backbone):
    torch.manual_seed(0)
    cfg = zoo_cfg(arch, backbone)
    det = build_detector(cfg, ["a", "b", "c"])
    model, criterion = det.model, det.criterion
    images = torch.randn(2, 3, 128, 128)
    boxes = torch.tensor([[[0.1, 0.1, 0.5, 0.6], [0.6, 0.5, 0.9, 0.9]], [[0.2, 0.3, 0.4, 0.5], [0, 0, 0, 0]]])
    labels = torch.tensor([[0, 2], [1, -1]])
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    losses = criterion(model(images), boxes, labels)
    assert torch.isfinite(losses["total"]) and losses["total"] > 0
    losses["total"].backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(torch.isfinite(g).all() for g in grads if g is not None)
    # A head reads only some backbone maps (YOLOv1: the last one), so a few backbone
    # parameters (e.g. VGG's L2Norm on conv4_3) may get no gradient; the head always does.
    assert all(p.grad is not None for p in model.head.parameters())
    assert sum(g is not None for g in grads) >= 0.9 * len(grads)
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    model.eval()
    with torch.no_grad():
        dets = det.postprocess(model(images))
    assert len(dets) == 2 and all(d.boxes.shape[-1] == 4 for d in dets)
    # the layout the builder declares is what the model outputs
    assert sum(r.candidates for r in det.layout) > 0


def _inspect_json(capsys, *args) -> dict:
    assert cli_main(["inspect", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_inspect_yolov3_416_80_classes(capsys, tmp_path):
    cfg = tmp_path / "y3.yaml"
    cfg.write_text("model: {arch: yolov3, backbone: darknet53, input_size: 416}\n")
    info = _inspect_json(capsys, str(cfg), "--num-classes", "80")
    assert [m["grid"] for m in info["maps"]] == [[13, 13], [26, 26], [52, 52]]
    assert [m["channels"] for m in info["maps"]] == [255, 255, 255]
    assert info["total_candidates"] == 10647
    assert info["background_is_a_class"] is False
    five = json.dumps([[[10 * k, 10 * k] for k in range(1, 6)]] * 3)
    info = _inspect_json(capsys, str(cfg), "--num-classes", "20", f"model.anchors.sizes={five}")
    assert [m["channels"] for m in info["maps"]] == [125, 125, 125]  # (20 + 5) x 5, seed 000


def test_inspect_ssd300_vgg16_and_yolov1(capsys, tmp_path):
    ssd = tmp_path / "ssd.yaml"
    ssd.write_text("model: {arch: ssd, backbone: vgg16, input_size: 300, priors: {min_sizes: [30, 60, 111, 162, 213, 264], "
                   "max_sizes: [60, 111, 162, 213, 264, 315], steps: [8, 16, 32, 64, 100, 300]}}\n")
    info = _inspect_json(capsys, str(ssd), "--num-classes", "20")
    assert [m["candidates"] for m in info["maps"]] == [5776, 2166, 600, 150, 36, 4]
    assert info["total_candidates"] == 8732
    assert {m["values_per_anchor"] for m in info["maps"]} == {25}  # (C + 1) + 4
    assert info["parameters"] == 26_285_486  # ssd.pytorch's VOC SSD300
    y1 = tmp_path / "y1.yaml"
    y1.write_text("model: {arch: yolov1, backbone: yolov1, input_size: 448}\n")
    info = _inspect_json(capsys, str(y1), "--num-classes", "20")
    assert info["maps"][0]["grid"] == [7, 7] and info["maps"][0]["channels"] == 30
    assert info["total_candidates"] == 98
    assert cli_main(["inspect", "--compare", str(ssd), str(y1), "--num-classes", "20"]) == 0
    out = capsys.readouterr().out
    assert "8,732" in out and "98" in out and "objectness (sigmoid)" in out and "a class (C+1 softmax)" in out


def test_anchors_command_clusters_the_dataset(capsys, tmp_path):
    cfg = tmp_path / "y3.yaml"
    cfg.write_text("model: {arch: yolov3, backbone: tiny, input_size: 256}\n"
                   "data: {train: {format: shapes, num_images: 40, seed: 3}}\n")
    assert cli_main(["anchors", str(cfg), "--num", "6", "--size", "256"]) == 0
    out = capsys.readouterr().out
    assert "boxes of 40 images, letterboxed to 256x256" in out
    lines = {line.split()[0]: line.split() for line in out.splitlines()
             if line.startswith(("k-means", "config")) and len(line.split()) == 3}  # the fit table rows
    kmeans_iou, config_iou = float(lines["k-means"][1]), float(lines["config"][1])
    # clustered on these very boxes, the anchors fit them at least as well as the paper's defaults
    assert kmeans_iou >= config_iou and 0 < kmeans_iou <= 1
    assert len(json.loads(out.strip().splitlines()[-1])) == 3  # 6 anchors -> 3 scales of 2


def test_ssd512_is_a_config_of_the_same_code(capsys):
    info = _inspect_json(capsys, str(ROOT / "configs" / "ssd512_vgg16_voc.yaml"), "--num-classes", "20")
    assert [m["grid"][0] for m in info["maps"]] == [64, 32, 16, 8, 4, 2, 1]
    # 64^2 x 4 + 32^2 x 6 + 16^2 x 6 + 8^2 x 6 + 4^2 x 6 + 2^2 x 4 + 1 x 4, the reference SSD512
    assert info["total_candidates"] == 24564
    info = _inspect_json(capsys, str(ROOT / "configs" / "ssd300_vgg16_voc.yaml"), "--num-classes", "20")
    assert info["total_candidates"] == 8732 and info["parameters"] == 26_285_486
