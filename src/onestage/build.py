"""The one place that turns a config into objects (DESIGN.md section 2).

Constructors elsewhere take built objects (``SSD(backbone, extras, head)``); only this
module reads the config. Tests build objects directly, without YAML.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
from torch import Tensor, nn

from onestage.config import Config, ConfigError, DatasetConfig
from onestage.data.base import DetectionDataset, Transform
from onestage.data.problems import DatasetSpec, DataError
from onestage.engine.precision import should_force_fp32
from onestage.families import Detector, LayoutRow
from onestage.models.layers import probe

if TYPE_CHECKING:
    from onestage.data.mosaic import Mosaic


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

        spec = read_voc(_need(ds.root, "root", ds), split=ds.split, class_names=names, on_error=on_error,
                        annotations_dir=ds.annotations, images_dir=ds.images)
    elif ds.format == "coco":
        from onestage.data.coco import read_coco

        images = ds.images or _need(ds.root, "root", ds)
        spec = read_coco(_need(ds.annotations, "annotations", ds), images, class_names=names, on_error=on_error)
    elif ds.format == "mot":
        from onestage.data.mot import read_mot

        spec = read_mot(_need(ds.root, "root", ds), class_names=names, on_error=on_error)
    else:
        from onestage.data.yolo_txt import read_yolo

        spec = read_yolo(_need(ds.root, "root", ds), split=ds.split or "train", class_names=names, on_error=on_error)
    if ds.limit is not None:
        spec.records = spec.records[: ds.limit]
    if names is None and ds.format != "shapes":
        from onestage.data.classes import note_classes

        note_classes(spec, str(ds.root or ds.annotations))  # classes found, likely typos
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


def build_mosaic(cfg: Config) -> Mosaic | None:
    """The training set's mosaic, filled with the colour its preset pads with; None when off."""
    from onestage.data import transforms as T
    from onestage.data.mosaic import Mosaic

    aug = cfg.data.augment
    if aug.mosaic == 0 or aug.preset == "none":
        return None
    grey = (T.YOLO_PAD_VALUE,) * 3
    fill = grey if aug.preset == "yolo" else T.fill_colour(cfg.data.mean)
    return Mosaic(aug.mosaic, cfg.model.input_size, fill, aug.min_visible)


def build_datasets(cfg: Config) -> tuple[DetectionDataset, DetectionDataset, DatasetSpec, DatasetSpec]:
    train_spec = read_dataset(cfg.data.train, cfg)
    val_spec = read_dataset(cfg.data.val, cfg, class_names=train_spec.class_names)
    if val_spec.class_names != train_spec.class_names:
        raise DataError(
            f"data: the val split's classes {val_spec.class_names} differ from the train split's "
            f"{train_spec.class_names}; set data.class_names to fix the order"
        )
    train_ds = DetectionDataset(
        train_spec.records, train_spec.class_names, build_transform(cfg, train=True),
        cache_max_side=2 * cfg.model.input_size if cfg.data.cache_images else None,
        skip_unreadable=cfg.data.on_error == "skip",
        mosaic=build_mosaic(cfg),
    )
    return train_ds, build_eval_dataset(cfg, val_spec, train_spec.class_names), train_spec, val_spec


def build_eval_dataset(cfg: Config, spec: DatasetSpec, class_names: list[str]) -> DetectionDataset:
    """The validation/evaluation dataset of ``spec``: eval transform, nothing cached or skipped."""
    return DetectionDataset(spec.records, class_names, build_transform(cfg, train=False))


# ----------------------------------------------------------------------------- models
def _ssd_backbone_and_extras(cfg: Config, num_maps: int):
    """The backbone named in the config and the extra layers that give ``num_maps`` maps in all.

    MobileNetV2 and VGG16 get the reference extras (SSDLite: depthwise-separable); any other
    backbone gets generic extras that halve its last map down to 1x1 (issue 7: any head on
    any backbone, the maps a head reads declared by the backbone).
    """
    from onestage.models.heads.ssd import SSDExtras, extra_strides_paddings, vgg16_ssd_extras

    lite = cfg.model.arch == "ssdlite"
    backbone = _backbone(cfg)
    num_extras = num_maps - len(backbone.out_channels)
    if num_extras < 0:
        raise ConfigError(
            f"model.priors.aspect_ratios: {num_maps} maps, but the {cfg.model.backbone} backbone alone gives "
            f"{len(backbone.out_channels)}"
        )
    channels = cfg.model.extra_channels
    reference_vgg = cfg.model.backbone == "vgg16" and cfg.model.input_size == 300 and num_extras == 4 and not lite
    if channels is None:
        defaults = {"mobilenet_v2": [512, 256, 256], "vgg16": [512, 256, 256, 256]}
        channels = (defaults.get(cfg.model.backbone, []) + [256] * num_extras)[:num_extras]
    if len(channels) != num_extras:
        raise ConfigError(
            f"model.extra_channels: {len(channels)} values, but {num_maps} maps with {len(backbone.out_channels)} "
            f"from the backbone need {num_extras} extra layers"
        )
    if reference_vgg and channels == [512, 256, 256, 256]:
        return backbone, vgg16_ssd_extras(backbone.out_channels[-1])
    last_map = _backbone_map_sizes(backbone, cfg.model.input_size)[-1]
    plan = extra_strides_paddings(last_map, num_extras)
    if cfg.model.backbone == "vgg16":  # the reference VGG extras: conv + bias + ReLU, no BatchNorm
        extras = SSDExtras(backbone.out_channels[-1], channels, plan, depthwise=False, batch_norm=False, act=nn.ReLU)
    else:
        extras = SSDExtras(backbone.out_channels[-1], channels, plan, depthwise=lite)
    return backbone, extras


def _backbone_map_sizes(backbone: nn.Module, size: int) -> list[int]:
    """Side of each backbone map for a square input, measured by one dummy forward."""
    return [m.shape[-1] for m in probe(backbone, size)]


def build_ssd(
    cfg: Config, class_names: list[str], positives_normalizer: Callable[[Tensor], Tensor] | None = None
) -> Detector:
    from onestage.families.ssd import SSDFamily
    from onestage.losses.multibox import MultiboxLoss
    from onestage.models.heads.ssd import SSD, SSDHead
    from onestage.postprocess.ssd import SSDPostProcessor
    from onestage.priors import generate_priors, make_layout

    pc = cfg.model.priors
    backbone, extras = _ssd_backbone_and_extras(cfg, len(pc.aspect_ratios))
    anchors = [2 + 2 * len(r) for r in pc.aspect_ratios]
    lite = cfg.model.arch == "ssdlite"
    head = SSDHead(backbone.out_channels + extras.out_channels, anchors, len(class_names) + 1, depthwise=lite)
    model = SSD(backbone, extras, head)
    try:
        sizes = model.feature_map_sizes(cfg.model.input_size)
    except ValueError as exc:  # a map shrank to nothing: the input is too small for these layers
        raise ConfigError(f"model.input_size: {exc}") from None
    layout = make_layout(
        sizes, cfg.model.input_size, pc.aspect_ratios, s_min=pc.s_min, s_max=pc.s_max,
        min_sizes=pc.min_sizes or None, max_sizes=pc.max_sizes or None, steps=pc.steps or None, clip=pc.clip,
    )
    priors = generate_priors(layout)
    force = _force_fp32(cfg)
    ssd = cfg.model.ssd
    criterion = MultiboxLoss(
        priors, ssd.matcher, ssd.loss, variances=ssd.variances, force_fp32=force, positives_normalizer=positives_normalizer
    )
    ev = cfg.eval
    post = SSDPostProcessor(
        priors, ssd.variances, _or(ev.score_threshold, 0.01), ev.nms_iou, _or(ev.pre_nms_top_k, 200),
        _or(ev.max_detections, 200), force,
    )
    values = len(class_names) + 1 + 4
    rows = [
        LayoutRow(f"map{i} (step {cfg.model.input_size / h:.0f} px)", (h, w), a, values)
        for i, ((h, w), a) in enumerate(zip(sizes, anchors))
    ]
    family = SSDFamily(
        priors, rows, ssd.variances, ssd.matcher.pos_iou, ssd.matcher.neg_iou, ssd.loss.neg_pos_ratio,
        iou_dtype=torch.float32 if force("iou") else torch.bfloat16,
    )
    return Detector(model, criterion, post, rows, class_names, family.scoring, priors, family)


def _or(value, default):
    """An eval setting left null takes the family's default (DESIGN.md section 3)."""
    return default if value is None else value


def _mobilenet_v2(cfg: Config) -> nn.Module:
    from onestage.models.backbones.mobilenet_v2 import MobileNetV2Backbone

    return MobileNetV2Backbone(cfg.model.width_mult, taps=cfg.model.mobilenet_taps)


def _vgg16(cfg: Config) -> nn.Module:
    from onestage.models.backbones.vgg16 import VGG16Backbone

    return VGG16Backbone()


def _darknet53(cfg: Config) -> nn.Module:
    from onestage.models.backbones.darknet53 import Darknet53Backbone

    return Darknet53Backbone(cfg.model.width_mult)


def _tiny(cfg: Config) -> nn.Module:
    from onestage.models.backbones.tiny import TinyBackbone

    return TinyBackbone()


def _yolov1_net(cfg: Config) -> nn.Module:
    from onestage.models.backbones.yolov1_net import YOLOv1PaperBackbone

    return YOLOv1PaperBackbone()


# The backbones, registered explicitly (any head sits on any backbone: issue 7).
BACKBONES: dict[str, Callable[[Config], nn.Module]] = {
    "mobilenet_v2": _mobilenet_v2, "vgg16": _vgg16, "darknet53": _darknet53, "tiny": _tiny, "yolov1": _yolov1_net,
}


def _backbone(cfg: Config) -> nn.Module:
    """The backbone the config names, with its ImageNet weights when given."""
    name = cfg.model.backbone
    if name not in BACKBONES:
        raise ConfigError(f"model.backbone: unknown backbone {name!r}; known: {', '.join(BACKBONES)}")
    backbone = BACKBONES[name](cfg)
    if cfg.model.backbone_weights is not None:
        from onestage.models.backbones.base import load_torchvision_weights

        load_torchvision_weights(backbone, cfg.model.backbone_weights)
    return backbone


def build_yolov3(cfg: Config, class_names: list[str]) -> Detector:
    from onestage.anchors import normalize_anchors
    from onestage.families.yolov3 import YOLOv3Family
    from onestage.losses.yolov3 import YOLOv3Loss
    from onestage.models.heads.yolov3 import YOLOv3, YOLOv3Head
    from onestage.postprocess.yolov3 import YOLOv3PostProcessor

    y = cfg.model.yolov3
    num_classes = len(class_names)
    backbone = _backbone(cfg)
    sizes = cfg.model.anchors.sizes  # pixels at input_size, coarsest scale first
    if len(sizes) != len(backbone.out_channels):
        raise ConfigError(
            f"model.anchors.sizes: {len(sizes)} scales, but the {cfg.model.backbone} backbone gives "
            f"{len(backbone.out_channels)} maps"
        )
    anchors = normalize_anchors(sizes, cfg.model.input_size)
    head = YOLOv3Head(backbone.out_channels, [len(g) for g in sizes], num_classes, width=y.neck_width,
                      strides=backbone.strides)
    model = YOLOv3(backbone, head)
    criterion = YOLOv3Loss(
        anchors, num_classes, xy_loss=y.xy_loss, box_weight_2wh=y.box_weight_2wh, noobj_weight=y.noobj_weight,
        obj_weight=y.obj_weight, cls_weight=y.cls_weight, box_weight=y.box_weight, reduction=y.reduction,
        assign_mode=y.assign_mode, ignore_by=y.ignore_by, ignore_thres=y.ignore_thres,
        class_collisions=y.class_collisions, preset=y.preset,
    )
    ev = cfg.eval
    post = YOLOv3PostProcessor(
        anchors, num_classes, score_threshold=_or(ev.score_threshold, 0.001), nms_iou=ev.nms_iou,
        max_detections=_or(ev.max_detections, 100), pre_nms_top_k=_or(ev.pre_nms_top_k, 1000),
    )
    outputs = probe(model, cfg.model.input_size)  # [(1, A, H, W, 5 + C)], coarsest first
    rows = [
        LayoutRow(f"scale {i} (stride {s})", (o.shape[2], o.shape[3]), len(g), 5 + num_classes)
        for i, (s, g, o) in enumerate(zip(model.strides, sizes, outputs))
    ]
    family = YOLOv3Family(
        anchors, [(o.shape[2], o.shape[3]) for o in outputs], rows, post, assign_mode=criterion.assign_mode,
        ignore_by=criterion.ignore_by, ignore_thres=criterion.ignore_thres,
    )  # the criterion's settings: a preset may have replaced the config's
    return Detector(model, criterion, post, rows, class_names, family.scoring, family=family)


def build_yolov1(cfg: Config, class_names: list[str]) -> Detector:
    from onestage.families.yolov1 import YOLOv1Family
    from onestage.losses.yolov1 import YOLOv1Loss
    from onestage.models.heads.yolov1 import YOLOv1, YOLOv1ConvHead, YOLOv1Head
    from onestage.postprocess.yolov1 import YOLOv1PostProcessor

    y = cfg.model.yolov1
    num_classes = len(class_names)
    backbone = _backbone(cfg)
    if y.head == "conv":
        head = YOLOv1ConvHead(backbone.out_channels[-1], S=y.grid, B=y.boxes_per_cell, num_classes=num_classes,
                              hidden=y.hidden)
    else:
        head = YOLOv1Head(backbone.out_channels[-1], S=y.grid, B=y.boxes_per_cell, num_classes=num_classes,
                          hidden=y.hidden, dropout=y.dropout)
    model = YOLOv1(backbone, head)
    force = _force_fp32(cfg)
    criterion = YOLOv1Loss(S=y.grid, B=y.boxes_per_cell, num_classes=num_classes, lambda_coord=y.lambda_coord,
                           lambda_noobj=y.lambda_noobj, conf_target=y.conf_target, force_fp32=force,
                           preset=y.preset)
    ev = cfg.eval
    post = YOLOv1PostProcessor(
        S=y.grid, B=y.boxes_per_cell, num_classes=num_classes, score_threshold=_or(ev.score_threshold, 0.001),
        nms_iou=ev.nms_iou, max_detections=_or(ev.max_detections, 100), force_fp32=force,
        linear=y.preset == "darknet",
    )
    # YOLOv1: B boxes (x, y, w, h, conf) per cell share one set of C class scores, so a cell
    # holds 5B + C values rather than B x (5 + C).
    rows = [LayoutRow(f"grid S={y.grid}", (y.grid, y.grid), y.boxes_per_cell, 5, shared_per_cell=num_classes)]
    family = YOLOv1Family(y.grid, y.boxes_per_cell, num_classes, rows, post)
    return Detector(model, criterion, post, rows, class_names, family.scoring, family=family)


def _force_fp32(cfg: Config) -> Callable[[str], bool]:
    precision = cfg.precision

    def force(op_name: str) -> bool:
        # Off AMP everything is fp32 anyway; on AMP the config's list decides.
        return not precision.amp or should_force_fp32(op_name, precision)

    return force


# The detector families, registered explicitly: model.arch -> its builder.
FAMILIES: dict[str, Callable[..., Detector]] = {
    "ssd": build_ssd, "ssdlite": build_ssd, "yolov3": build_yolov3, "yolov1": build_yolov1,
}


def build_detector(
    cfg: Config, class_names: list[str], positives_normalizer: Callable[[Tensor], Tensor] | None = None
) -> Detector:
    """Model, criterion, post-processor and family of ``cfg.model.arch`` for ``class_names``.

    ``positives_normalizer``: the SSD loss's N under DDP (see ``MultiboxLoss``); the YOLO
    losses divide by the per-process batch size, which is already split-invariant."""
    arch = cfg.model.arch
    if arch not in FAMILIES:
        raise ConfigError(f"model.arch: unknown architecture {arch!r}; known: {', '.join(FAMILIES)}")
    if arch in ("ssd", "ssdlite"):
        return build_ssd(cfg, class_names, positives_normalizer)
    return FAMILIES[arch](cfg, class_names)
