"""Typed, strict experiment configuration.

A YAML experiment file is read with ``yaml.safe_load`` and validated by the pydantic
models below. Every model forbids unknown keys, so a typo is an error that names the key
path (``train.warmup_stpes``) and the keys that are allowed there. Command-line overrides
(``train.lr=0.01``) are parsed as YAML scalars and applied by dotted key before validation.
"""

from __future__ import annotations

import types
import warnings
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file and the key path."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @field_validator("*", mode="before")
    @classmethod
    def _strict_scalars(cls, value: Any, info: ValidationInfo) -> Any:
        """No silent casts between scalar kinds (see ``scalar_type_error``)."""
        field = cls.model_fields.get(info.field_name or "")
        problem = None if field is None else scalar_type_error(value, field.annotation)
        if problem is not None:
            raise ValueError(problem)
        return value


def _kinds(annotation: Any) -> set[type] | None:
    """The scalar kinds an annotation admits (bool, int, float, str); None: not a scalar type."""
    origin = get_origin(annotation)
    if origin is Literal:
        return {type(a) for a in get_args(annotation)}
    if origin in (Union, types.UnionType):
        parts = [_kinds(a) for a in get_args(annotation) if a is not type(None)]
        if any(p is None for p in parts):
            return None
        return set().union(*parts)  # type: ignore[arg-type]
    return {annotation} if annotation in (bool, int, float, str) else None


def scalar_type_error(value: Any, annotation: Any) -> str | None:
    """Why ``value`` does not fit ``annotation`` without a silent cast, or None.

    pydantic's lax mode reads ``true`` as 1 for an int, ``1`` or ``"on"`` as True for a bool
    and ``"16"`` as 16: ``train.batch_size=true`` would train with batch size 1. Here a
    boolean is accepted only where a boolean is expected, a bool field takes only a boolean,
    an int field no string; a float field takes an int (YAML reads ``lr: 1`` as an int) and a
    numeric string (PyYAML reads ``1e-3`` without a dot as a string). Lists and tuples are
    checked element by element.
    """
    origin = get_origin(annotation)
    if origin is Literal:
        allowed = get_args(annotation)
        if any(value == a and type(value) is type(a) for a in allowed):
            return None
        return f"{value!r} is not one of {', '.join(repr(a) for a in allowed)}"
    if origin in (list, tuple) and isinstance(value, (list, tuple)):
        args = [a for a in get_args(annotation) if a is not Ellipsis]
        if not args:
            return None
        for k, item in enumerate(value):
            element = args[0] if origin is list or len(args) == 1 else args[min(k, len(args) - 1)]
            problem = scalar_type_error(item, element)
            if problem is not None:
                return f"item {k}: {problem}"
        return None
    if origin in (Union, types.UnionType):
        options = [a for a in get_args(annotation) if a is not type(None)]
        if value is None and len(options) < len(get_args(annotation)):
            return None
        if any(scalar_type_error(value, a) is None for a in options):
            return None
        problems = [str(scalar_type_error(value, a)) for a in options]
        return problems[0] if len(problems) == 1 else f"{value!r} fits none of: " + "; ".join(problems)
    kinds = _kinds(annotation)
    if kinds is None or value is None:
        return None
    expected = " or ".join(sorted(k.__name__ for k in kinds))
    if isinstance(value, bool):
        return None if bool in kinds else f"{str(value).lower()} is a boolean; expected {expected}"
    if kinds == {bool}:
        return f"{value!r} is not a boolean (true or false)"
    if isinstance(value, str) and str not in kinds:
        if float in kinds:
            return None  # "1e-3": pydantic parses it, or reports a non-number
        return f"{value!r} is a string; expected {expected}"
    return None


# --------------------------------------------------------------------------- model
class PriorsConfig(Strict):
    """SSD default boxes (DESIGN.md section 3). Feature-map sizes come from the model."""

    # Linear scales as in the SSD paper (s_min..s_max), used when min_sizes is empty.
    s_min: float = Field(0.2, gt=0, le=1)
    s_max: float = Field(0.9, gt=0, le=1.5)
    # Explicit sizes in input pixels (the reference SSD300: 30..264 and 60..315).
    min_sizes: list[float] = []
    max_sizes: list[float] = []
    # Step between cell centres in input pixels; empty: input_size / feature map size.
    steps: list[float] = []
    # Aspect ratios per map, beyond 1: [2] gives 4 boxes per cell, [2, 3] gives 6.
    aspect_ratios: list[list[float]] = [[2], [2, 3], [2, 3], [2, 3], [2], [2]]
    clip: bool = True


class AnchorsConfig(Strict):
    """YOLOv3 anchors in input pixels, one list per output scale (stride 32, 16, 8)."""

    sizes: list[list[tuple[float, float]]] = [
        [(116, 90), (156, 198), (373, 326)],
        [(30, 61), (62, 45), (59, 119)],
        [(10, 13), (16, 30), (33, 23)],
    ]


class YOLOv3Config(Strict):
    """YOLOv3 assignment and loss (DESIGN.md section 3, seed 000); see losses/yolov3.py."""

    # null: the seed-000 loss as configured below; darknet: reproduce Darknet's yolo layer
    # (BCE-gradient x, y; 0.5 MSE w, h; the (2 - w h) weight; global anchors; ignore 0.7;
    # multi-hot class target on collisions).
    preset: Literal["darknet"] | None = None
    assign_mode: Literal["global", "per_scale"] = "global"  # best of all anchors, or per scale
    ignore_by: Literal["prediction", "anchor"] = "prediction"
    ignore_thres: float = Field(0.5, ge=0, le=1)
    xy_loss: Literal["mse", "bce"] = "mse"
    box_weight_2wh: bool = False  # weight box terms by (2 - w h): small boxes count more
    box_weight: float = Field(1.0, ge=0)
    obj_weight: float = Field(1.0, ge=0)
    noobj_weight: float = Field(1.0, ge=0)
    cls_weight: float = Field(1.0, ge=0)
    reduction: Literal["sum", "mean"] = "sum"  # sum over the batch / batch size, or mean
    # two objects on one (cell, anchor): last = the later object's class alone (one-hot);
    # union = every class that landed there is a positive (multi-hot, Darknet; preset darknet sets it)
    class_collisions: Literal["last", "union"] = "last"
    neck_width: float = Field(1.0, gt=0, le=2)  # channel multiplier of the neck and head


class YOLOv1Config(Strict):
    """YOLOv1 grid, head and loss (YOLOv1 paper section 2, seed 000)."""

    grid: int = Field(7, ge=1)  # S
    boxes_per_cell: int = Field(2, ge=1)  # B
    # fc: the paper's two fully connected layers; conv: a 3x3 + 1x1 conv head with the same
    # output, shared across cells (generalises from a few thousand images; heads/yolov1.py)
    head: Literal["fc", "conv"] = "fc"
    hidden: int = Field(4096, ge=1)  # the first fully connected layer's width (conv: the 3x3 conv's channels)
    dropout: float = Field(0.5, ge=0, lt=1)  # after the first fully connected layer (fc head only)
    lambda_coord: float = Field(5.0, ge=0)
    lambda_noobj: float = Field(0.5, ge=0)
    conf_target: Literal["iou", "one"] = "iou"
    # null: sigmoid/softmax outputs (finite gradients from any raw value); darknet: Darknet's
    # detection layer exactly (linear outputs, responsible predictor by IoU then RMSE; losses/yolov1.py)
    preset: Literal["darknet"] | None = None


class MatcherConfig(Strict):
    """SSD matching (DESIGN.md section 3): positive >= pos_iou, background < neg_iou."""

    pos_iou: float = Field(0.5, gt=0, le=1)
    neg_iou: float = Field(0.4, gt=0, le=1)

    @model_validator(mode="after")
    def _order(self) -> "MatcherConfig":
        if self.neg_iou > self.pos_iou:
            raise ValueError(f"neg_iou ({self.neg_iou}) must be <= pos_iou ({self.pos_iou})")
        return self


class LossConfig(Strict):
    """The SSD multibox loss (DESIGN.md section 3); see losses/multibox.py."""

    alpha: float = Field(1.0, ge=0)  # weight of the localization term
    # SSD localization term: smooth L1 on the encoded offsets (the paper), or 1 - GIoU of
    # the decoded box and its ground truth (scale-free: a large object's box counts by overlap)
    box_loss: Literal["smooth_l1", "giou"] = "smooth_l1"
    beta: float = Field(1.0, gt=0)  # smooth L1 threshold
    neg_pos_ratio: float = Field(3.0, ge=0)  # hard negatives kept per positive
    normalize: Literal["batch", "image"] = "batch"  # divide by positives of the batch / each image


class SSDConfig(Strict):
    """The SSD family (SSD, SSDLite): box encoding, matching and loss.

    ``variances`` is the box encoding (``coders.ssd_encode``), which inference reads too;
    ``matcher`` and ``loss`` are read by training only.
    """

    variances: tuple[float, float] = (0.1, 0.2)
    matcher: MatcherConfig = MatcherConfig()
    loss: LossConfig = LossConfig()


class ModelConfig(Strict):
    # Which detector: SSD-family heads score C+1 classes, YOLO ones objectness + C.
    arch: Literal["ssd", "ssdlite", "yolov3", "yolov1"] = "ssd"
    # tiny: a small conv stack for CPU training; yolov1: the 24-conv network of the YOLOv1 paper.
    backbone: Literal["mobilenet_v2", "vgg16", "darknet53", "tiny", "yolov1"] = "mobilenet_v2"
    width_mult: float = Field(1.0, gt=0, le=2)  # MobileNetV2 / Darknet-53 width multiplier
    # MobileNetV2 maps: "blocks" (outputs of blocks 6 and 13) or "expansion" (the expansion
    # layers of blocks 7 and 14, as SSDLite in the MobileNetV2 paper, section 6.2)
    mobilenet_taps: Literal["blocks", "expansion"] = "blocks"
    input_size: int = Field(300, ge=32, le=2048)  # square network input, pixels
    # SSD extra layers' output channels, one per extra map after the backbone's maps; null:
    # the backbone's default (MobileNetV2 [512, 256, 256]; VGG16 the reference [512, 256, 256, 256]).
    extra_channels: list[int] | None = None
    # Each family's own section; setting another family's section is an error (below).
    priors: PriorsConfig = PriorsConfig()  # SSD default boxes
    ssd: SSDConfig = SSDConfig()  # SSD encoding, matching, loss
    anchors: AnchorsConfig = AnchorsConfig()  # YOLOv3 anchors
    yolov3: YOLOv3Config = YOLOv3Config()
    yolov1: YOLOv1Config = YOLOv1Config()
    # ImageNet weights for the backbone, in torchvision's state_dict format (optional).
    backbone_weights: Path | None = None

    @model_validator(mode="after")
    def _one_family(self) -> "ModelConfig":
        """A section of another family is an error, never silently ignored (a setting equal to
        its default is fine: a resolved config lists every section)."""
        owners = {"priors": ("ssd", "ssdlite"), "ssd": ("ssd", "ssdlite"), "extra_channels": ("ssd", "ssdlite"),
                  "anchors": ("yolov3",), "yolov3": ("yolov3",), "yolov1": ("yolov1",)}
        for key, archs in owners.items():
            if self.arch not in archs and getattr(self, key) != type(self).model_fields[key].default:
                raise ValueError(
                    f"model.{key} belongs to model.arch {' / '.join(archs)}, but this config's model.arch is "
                    f"{self.arch!r}: remove it (or change model.arch)"
                )
        return self


# --------------------------------------------------------------------------- data
class DatasetConfig(Strict):
    # mot: videos with MOTChallenge gt.txt (onestage.data.mot; `onestage data make-video`)
    format: Literal["shapes", "voc", "coco", "yolo", "mot"] = "shapes"
    root: Path | None = None  # dataset folder; relative paths are relative to the config file
    # VOC ImageSets name, YOLO split folder, a .txt/.csv split file (relative to root)
    split: str | None = None
    # COCO JSON; VOC: the folder of XML files. Relative to root when root is given.
    annotations: Path | None = None
    # the image folder when it is not implied by the format (VOC: XML may sit beside the images)
    images: Path | None = None
    # Synthetic shapes: how many images and which seed generates them.
    num_images: int = Field(256, ge=1)
    seed: int = 0
    limit: int | None = Field(None, ge=1)  # keep only the first N images (smoke tests)

    @model_validator(mode="after")
    def _keys_of_the_format(self) -> "DatasetConfig":
        """A key the format does not read is an error, not silently ignored (issue 21). A key
        left at its default is no error: a dumped config (run folders, checkpoints) writes them all."""
        given = {k for k in self.model_fields_set if getattr(self, k) != type(self).model_fields[k].default}
        unused = sorted((given - {"format", "limit"}) - DATASET_KEYS[self.format])
        if unused:
            raise ValueError(
                f"{', '.join(unused)}: not used by format {self.format!r} (it reads "
                f"{', '.join(sorted(DATASET_KEYS[self.format]))}); remove {'them' if len(unused) > 1 else 'it'}"
            )
        return self


# The keys each dataset format reads (besides format and limit). VOC: root, the split, and
# the XML and image folders (relative to root); COCO: the JSON and the image folder
# (root: the image folder when images is not given); YOLO: root (or its data.yaml) and split.
DATASET_KEYS: dict[str, set[str]] = {
    "shapes": {"num_images", "seed"},
    "voc": {"root", "split", "annotations", "images"},
    "coco": {"root", "annotations", "images"},
    "yolo": {"root", "split"},
    "mot": {"root"},  # a folder of sequences or one sequence (onestage.data.mot)
}


class AugmentConfig(Strict):
    # "ssd": photometric + zoom-out + min-IoU crop + flip; "yolo": letterbox + HSV + affine + flip;
    # "flip": horizontal flip only; "none": resize only.
    preset: Literal["ssd", "yolo", "flip", "none"] = "ssd"
    zoom_out: float = Field(4.0, ge=1)  # largest canvas / image ratio for zoom-out
    photometric: bool = True
    min_visible: float = Field(0.3, ge=0, le=1)  # drop a cropped box keeping less of its area
    # probability that a training sample is a 4-image mosaic (onestage.data.mosaic), made
    # before the preset's pipeline; 0 = off (the SSD paper's recipe)
    mosaic: float = Field(0.0, ge=0, le=1)
    # the last fraction of training runs without mosaic (YOLOX, Ge et al. 2021, section 2.2:
    # the last 15 of 300 epochs), so that the final weights fit whole photographs as they come
    # at test time; 0 = mosaic to the end
    close_mosaic: float = Field(0.0, ge=0, le=1)


class DataConfig(Strict):
    train: DatasetConfig = DatasetConfig()
    val: DatasetConfig = DatasetConfig(seed=1, num_images=64)
    class_names: list[str] | None = None  # default: what the dataset declares
    augment: AugmentConfig = AugmentConfig()
    on_error: Literal["raise", "skip"] = "raise"
    # Training images decoded once and kept in memory, longer side at most 2x the input size
    # (small photo datasets: decoding a 2000 px JPEG every epoch costs more than the model).
    cache_images: bool = False
    num_workers: int = Field(0, ge=0)
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------- training
class OptimConfig(Strict):
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.01, gt=0)  # base learning rate, reached at the end of warmup
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = Field(5e-4, ge=0)  # never applied to norm and bias parameters
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW


class ScheduleConfig(Strict):
    name: Literal["cosine", "step"] = "cosine"
    warmup_steps: int = Field(100, ge=0)
    min_lr: float = Field(0.0, ge=0)
    # step decay: multiply by gamma at these fractions of training (older recipes)
    milestones: list[float] = [0.66, 0.88]
    gamma: float = Field(0.1, gt=0, le=1)


class PrecisionConfig(Strict):
    # auto: chosen by measurement (engine/calibrate.py resolve_precision): on a GPU autocast
    # (bf16 where supported, else fp16 + loss scaling); on the CPU bf16 only where a short
    # calibration of the model finds it faster. true / false: as set (a warning when measured
    # more than 1.5x slower than the alternative).
    amp: Union[Literal["auto"], bool] = "auto"
    dtype: Literal["auto", "float16", "bfloat16"] = "auto"  # auto: bf16 on CPU and on GPUs with bf16, else fp16
    loss_scale: Union[Literal["dynamic"], float] = "dynamic"  # fp16 only; bf16 needs none
    force_fp32: list[Literal["iou", "loss_reduction", "nms", "decode", "softmax"]] = [
        "iou",
        "loss_reduction",
        "nms",
    ]
    channels_last: Union[Literal["auto"], bool] = "auto"  # NHWC memory format; auto: the faster one measured


class EMAConfig(Strict):
    enabled: bool = True
    decay: float = Field(0.999, ge=0, lt=1)
    start_step: int = Field(0, ge=0)
    update_every: int = Field(1, ge=1)
    use_for_eval: bool = True


class TrainConfig(Strict):
    epochs: int = Field(10, ge=1)
    # Images per process and per forward pass: with torchrun, each of the N processes (GPUs)
    # takes this many, so one optimizer step sees batch_size x N x accumulate images.
    batch_size: int = Field(16, ge=1)
    # minutes of wall time for the whole run (set-up, steps, validation, the final evaluation);
    # the schedule stretches over the steps it affords at the measured pace (engine/budget.py)
    time_budget: float | None = Field(None, gt=0)
    # with a time budget: the largest share of the time spent that validation may take
    val_budget_share: float = Field(0.1, gt=0, le=1)
    grad_clip: float | None = Field(10.0, gt=0)  # max gradient norm; null disables
    accumulate: int = Field(1, ge=1)  # gradient accumulation steps
    eval_every: int = Field(1, ge=1)  # epochs between validations
    best_metric: str = "voc_ap50"
    max_nonfinite_steps: int = Field(10, ge=1)
    log_every: int = Field(10, ge=1)
    out_dir: Path = Path("runs")
    name: str | None = None  # run folder name; default: config stem + time


class DistConfig(Strict):
    """Training with several processes (torchrun, DDP); ignored when a single process runs.

    See README "Training on several GPUs or machines". train.batch_size is per process.
    """

    # auto: NCCL when CUDA GPUs are present (one per process), gloo on CPU.
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    # Seconds the rendezvous and any collective may wait for the other processes: a process
    # that died or stalls stops the run with an error naming the rank, not a hang. Keep it
    # longer than the slowest step, validation included (rank 0 alone checkpoints meanwhile).
    timeout_s: float = Field(1800.0, gt=0)
    # BatchNorm statistics over the global batch (SyncBatchNorm): results no longer depend on
    # how the batch is split, at the cost of two all-reduces per BatchNorm layer and step.
    sync_bn: bool = False
    # Linear scaling rule (Goyal et al. 2017): optim.lr and schedule.min_lr are multiplied by
    # the number of processes, as the global batch grows with it. off: used as written.
    scale_lr: bool = False


class EvalConfig(Strict):
    # null = the family's default (DESIGN.md section 3): SSD 0.01 / 200 per class / 200 per
    # image; YOLO 0.001 / 1000 per image / 100 per image.
    score_threshold: float | None = Field(None, ge=0, le=1)
    display_threshold: float = Field(0.4, ge=0, le=1)  # for drawn predictions
    nms_iou: float = Field(0.45, gt=0, le=1)
    pre_nms_top_k: int | None = Field(None, ge=1)
    max_detections: int | None = Field(None, ge=1)
    iou_threshold: float = Field(0.5, gt=0, le=1)  # VOC AP
    voc_metric: Literal["area", "11point"] = "area"
    # box widths and the IoU = threshold case (eval/voc.py): continuous = no +1 pixel, IoU >=
    # (COCO-style); devkit = the official VOCevaldet.m, +1 pixel, IoU >=; voc_eval_py =
    # py-faster-rcnn's voc_eval.py and its copies, +1 pixel, IoU > (strict)
    voc_convention: Literal["continuous", "devkit", "voc_eval_py"] = "continuous"
    metrics: list[Literal["voc", "coco"]] = ["voc"]  # coco adds AP@[.5:.95], AP75, AR...
    num_images_drawn: int = Field(8, ge=0)


class Config(Strict):
    seed: int = 0
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    precision: PrecisionConfig = PrecisionConfig()
    ema: EMAConfig = EMAConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    dist: DistConfig = DistConfig()


# --------------------------------------------------------------------------- loading
def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid configuration"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "<root>"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = f"unknown key; allowed here: {', '.join(_allowed_keys(e['loc']))}"
        lines.append(f"  {path}: {msg}")
    return "\n".join(lines)


def _allowed_keys(loc: tuple) -> list[str]:
    model: Any = Config
    for part in loc[:-1]:
        field = model.model_fields.get(str(part)) if isinstance(model, type) else None
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return []
        model = field.annotation
    return sorted(model.model_fields)


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b.c=value`` -> (["a", "b", "c"], value parsed as a YAML scalar or list)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key=value, e.g. train.epochs=5")
    key, raw = item.split("=", 1)
    if not key:
        raise ConfigError(f"override {item!r}: empty key")
    return key.split("."), yaml.safe_load(raw) if raw != "" else None


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for item in overrides:
        path, value = parse_override(item)
        node = data
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part} is not a section")
            node = child
        node[path[-1]] = value
    return data


def _resolve_paths(cfg: Config, base: Path) -> None:
    """Relative dataset paths: ``root`` relative to the config file (a command-line override
    relative to the current folder is taken from there only when the config-relative path
    does not exist); ``annotations`` and ``images`` relative to ``root`` when it is given
    (the dataset's own folders, never the current folder's), else like ``root``."""
    for ds in (cfg.data.train, cfg.data.val):
        if ds.root is not None and not ds.root.is_absolute():
            ds.root = _near_config(ds.root, base)
        for name in ("annotations", "images"):
            value = getattr(ds, name)
            if value is None or value.is_absolute():
                continue
            setattr(ds, name, (ds.root / value).resolve() if ds.root is not None else _near_config(value, base))


def _near_config(value: Path, base: Path) -> Path:
    candidate = (base / value).resolve()
    return candidate if candidate.exists() or not value.exists() else value.resolve()


# Sections that moved (old top-level key -> its new path); old files and checkpoints still load.
MOVED_SECTIONS = {"matcher": ("model", "ssd", "matcher"), "loss": ("model", "ssd", "loss")}


def migrate_legacy(data: dict, source: str) -> dict:
    """Move sections of the layout before onestage 0.2 to their new place, with a note.

    ``matcher`` and ``loss`` (SSD-only) now live under ``model.ssd``, and ``loss.variances``
    (the box encoding, read by inference too) is ``model.ssd.variances``.
    """
    moved = []
    for old, new in MOVED_SECTIONS.items():
        if old not in data:
            continue
        section = data.pop(old)
        node = data
        for part in new[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{source}: {'.'.join(new[:-1])} is not a section")
        if isinstance(section, dict) and old == "loss" and "variances" in section:
            node["variances"] = section.pop("variances")
            moved.append("loss.variances -> model.ssd.variances")
        node[new[-1]] = section
        moved.append(f"{old} -> {'.'.join(new)}")
    if moved:
        warnings.warn(f"{source}: old config layout, read as the new one: {', '.join(moved)}", stacklevel=3)
    return data


def config_from_dict(data: dict, source: str = "<dict>") -> Config:
    """Validate a config mapping (old layouts migrated first); errors name the key path."""
    try:
        return Config.model_validate(migrate_legacy(data, source))
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, source)) from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Read a YAML experiment file (or defaults when None), apply overrides, validate."""
    source = str(path) if path is not None else "<defaults>"
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: no such config file")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
        except UnicodeDecodeError as exc:  # e.g. a checkpoint given where a config was expected
            raise ConfigError(f"{path}: not a YAML text file (byte {exc.start} is not UTF-8); "
                              "a config is a .yaml experiment file") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    cfg = config_from_dict(apply_overrides(data, overrides or []), source)
    if path is not None:
        _resolve_paths(cfg, Path(path).resolve().parent)
    return cfg


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML (written into every run folder)."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
