"""The one place that turns a config into objects (DESIGN.md section 2).

Constructors elsewhere take built objects (``SSD(backbone, extras, head)``); only this
module reads the config. Tests build objects directly, without YAML.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from onestage.config import Config, DatasetConfig
from onestage.data.base import DetectionDataset, ImageRecord, Transform
from onestage.data.problems import DatasetSpec, DataError
from onestage.engine.precision import should_force_fp32
from onestage.postprocess import Detections


@dataclass(frozen=True)
class LayoutRow:
    """One output map as ``onestage inspect`` shows it."""

    name: str
    grid: tuple[int, int]  # (H, W) cells
    anchors_per_cell: int
    values_per_anchor: int

    @property
    def candidates(self) -> int:
        return self.grid[0] * self.grid[1] * self.anchors_per_cell


@dataclass
class Detector:
    """Model, criterion and post-processor: separate objects (DESIGN.md section 2)."""

    model: nn.Module
    criterion: nn.Module
    postprocess: Callable[[object], list[Detections]]
    layout: list[LayoutRow]
    class_names: list[str]
    scoring: str  # "softmax over C+1 (background is a class)" or "sigmoid objectness + C classes"
    priors: Tensor | None = None  # (P, 4) cxcywh normalized, SSD only


# ----------------------------------------------------------------------------- data
def read_dataset(ds: DatasetConfig, cfg: Config, class_names: list[str] | None = None) -> DatasetSpec:
    """Read one split in its format. ``class_names`` fixes the label order (the train split's)."""
    on_error = cfg.data.on_error
    names = class_names or cfg.data.class_names
    if ds.format == "shapes":
        from onestage.data.shapes import make_shapes

        records, found = make_shapes(ds.num_images, size=cfg.model.input_size, seed=ds.seed)
        spec = DatasetSpec(records, found)
    elif ds.format == "voc":
        from onestage.data.voc import read_voc

        spec = read_voc(_need(ds.root, "root", ds), split=ds.split, class_names=names, on_error=on_error)
    elif ds.format == "coco":
        from onestage.data.coco import read_coco

        images = ds.images or _need(ds.root, "root", ds)
        spec = read_coco(_need(ds.annotations, "annotations", ds), images, class_names=names, on_error=on_error)
    else:
        from onestage.data.yolo_txt import read_yolo

        spec = read_yolo(_need(ds.root, "root", ds), split=ds.split or "train", class_names=names, on_error=on_error)
    if ds.limit is not None:
        spec.records = spec.records[: ds.limit]
    if not spec.records:
        raise DataError(f"{ds.root or ds.format}: the dataset has no images")
    return spec


def _need(value, name: str, ds: DatasetConfig):
    if value is None:
        raise DataError(f"data: format {ds.format!r} needs `{name}`")
    return value


def build_transform(cfg: Config, train: bool) -> Transform:
    from onestage.data import transforms as T

    size, mean, std = cfg.model.input_size, cfg.data.mean, cfg.data.std
    aug = cfg.data.augment
    letterbox = cfg.model.arch in ("yolov3", "yolov1") and aug.preset == "yolo"
    if not train or aug.preset == "none":
        return T.LetterboxEvalTransform(size, mean, std) if letterbox else T.EvalTransform(size, mean, std)
    if aug.preset == "ssd":
        return T.SSDTrainTransform(
            size, mean, std, photometric=aug.photometric, zoom_out=aug.zoom_out, min_visible=aug.min_visible
        )
    if aug.preset == "yolo":
        return T.YOLOTrainTransform(size, mean, std, min_visible=aug.min_visible)
    return T.FlipOnlyTransform(size, mean, std)


def build_datasets(cfg: Config) -> tuple[DetectionDataset, DetectionDataset, DatasetSpec, DatasetSpec]:
    train_spec = read_dataset(cfg.data.train, cfg)
    val_spec = read_dataset(cfg.data.val, cfg, class_names=train_spec.class_names)
    if val_spec.class_names != train_spec.class_names:
        raise DataError(
            f"data: the val split's classes {val_spec.class_names} differ from the train split's "
            f"{train_spec.class_names}; set data.class_names to fix the order"
        )
    train_ds = DetectionDataset(train_spec.records, train_spec.class_names, build_transform(cfg, train=True))
    val_ds = DetectionDataset(val_spec.records, train_spec.class_names, build_transform(cfg, train=False))
    return train_ds, val_ds, train_spec, val_spec


# ----------------------------------------------------------------------------- models
def _ssd_backbone_and_extras(cfg: Config):
    from onestage.models.backbones.mobilenet_v2 import MobileNetV2Backbone
    from onestage.models.backbones.vgg16 import VGG16Backbone
    from onestage.models.heads.ssd import mobilenet_v2_ssd_extras, vgg16_ssd_extras

    lite = cfg.model.arch == "ssdlite"
    if cfg.model.backbone == "mobilenet_v2":
        backbone = MobileNetV2Backbone(cfg.model.width_mult)
        extras = mobilenet_v2_ssd_extras(backbone.out_channels[-1], cfg.model.extra_channels, depthwise=lite)
    elif cfg.model.backbone == "vgg16":
        backbone = VGG16Backbone()
        extras = vgg16_ssd_extras(backbone.out_channels[-1])
    else:
        raise ValueError(f"model.backbone: {cfg.model.backbone!r} is not available for SSD yet")
    if cfg.model.backbone_weights is not None:
        from onestage.models.backbones.base import load_torchvision_weights

        load_torchvision_weights(backbone, cfg.model.backbone_weights)
    return backbone, extras


def build_ssd(cfg: Config, class_names: list[str]) -> Detector:
    from onestage.losses.multibox import MultiboxLoss
    from onestage.models.heads.ssd import SSD, SSDHead
    from onestage.postprocess import SSDPostProcessor
    from onestage.priors import generate_priors, make_layout

    backbone, extras = _ssd_backbone_and_extras(cfg)
    pc = cfg.model.priors
    num_maps = len(backbone.out_channels) + len(extras.out_channels)
    if len(pc.aspect_ratios) != num_maps:
        raise ValueError(f"model.priors.aspect_ratios: {len(pc.aspect_ratios)} lists for {num_maps} feature maps")
    anchors = [2 + 2 * len(r) for r in pc.aspect_ratios]
    lite = cfg.model.arch == "ssdlite"
    head = SSDHead(backbone.out_channels + extras.out_channels, anchors, len(class_names) + 1, depthwise=lite)
    model = SSD(backbone, extras, head)
    sizes = model.feature_map_sizes(cfg.model.input_size)
    layout = make_layout(
        sizes, cfg.model.input_size, pc.aspect_ratios, s_min=pc.s_min, s_max=pc.s_max,
        min_sizes=pc.min_sizes or None, max_sizes=pc.max_sizes or None, steps=pc.steps or None, clip=pc.clip,
    )
    priors = generate_priors(layout)
    force = _force_fp32(cfg)
    criterion = MultiboxLoss(priors, cfg.matcher, cfg.loss, force_fp32=force)
    ev = cfg.eval
    post = SSDPostProcessor(
        priors, cfg.loss.variances, ev.score_threshold, ev.nms_iou, ev.pre_nms_top_k, ev.max_detections, force
    )
    values = len(class_names) + 1 + 4
    rows = [
        LayoutRow(f"map{i} (stride {cfg.model.input_size / h:.0f})", (h, w), a, values)
        for i, ((h, w), a) in enumerate(zip(sizes, anchors))
    ]
    return Detector(model, criterion, post, rows, class_names, "softmax over C+1 classes (background is class 0)", priors)


def _force_fp32(cfg: Config) -> Callable[[str], bool]:
    precision = cfg.precision

    def force(op_name: str) -> bool:
        # Off AMP everything is fp32 anyway; on AMP the config's list decides.
        return not precision.amp or should_force_fp32(op_name, precision)

    return force


def build_detector(cfg: Config, class_names: list[str]) -> Detector:
    if cfg.model.arch in ("ssd", "ssdlite"):
        return build_ssd(cfg, class_names)
    raise ValueError(f"model.arch: {cfg.model.arch!r} is not wired into the pipeline yet")


def records_class_counts(records: list[ImageRecord], num_classes: int) -> list[int]:
    counts = [0] * num_classes
    for rec in records:
        for label in rec.labels.tolist():
            counts[label] += 1
    return counts


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
