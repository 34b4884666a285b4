"""The Python API: what a notebook user types.

    from onestage import load_detector
    det = load_detector("runs/demo/best.pt")
    preds = det.predict(["a.jpg", "b.jpg"], threshold=0.4)
    preds[0].boxes, preds[0].scores, preds[0].names      # original-image pixels

Everything needed comes from the checkpoint: the architecture, the class names, the input
transform (size, resize or letterbox, normalization) and which weights to use (the EMA
weights when the run kept them and evaluated with them). No YAML is needed; ``config``
(a YAML file) or ``overrides`` may change inference settings (``eval.*``, ``precision.*``),
never the architecture. The command line (``onestage predict``, ``eval``) is a thin layer over this.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from tqdm import tqdm

from onestage.config import Config, ConfigError, apply_overrides, config_from_dict, load_config
from onestage.data.transforms import EvalTransform, LetterboxEvalTransform
from onestage.families import Detector
from onestage.prediction import Prediction, save_predictions  # noqa: F401  (torch-free, shared with the ONNX runtime)

ImageLike = np.ndarray | str | Path


def checkpoint_config(ckpt: dict[str, Any], source: str) -> Config:
    """The resolved config a checkpoint was trained with (old layouts migrated)."""
    if not ckpt.get("config"):
        raise ConfigError(f"{source}: the checkpoint holds no config; it was not written by `onestage train`")
    return config_from_dict(yaml.safe_load(ckpt["config"]), f"{source} (its config)")


def inference_config(trained: Config, given: Config | None = None, overrides: Sequence[str] = ()) -> Config:
    """The checkpoint's model and input transform with the inference settings of ``given``.

    What the weights were trained for is the checkpoint's alone: ``model`` and the transform
    (``data.mean``, ``data.std``, ``data.augment.preset``, which decides resize or letterbox).
    Data splits, ``eval``, ``precision`` and the loaders come from ``given`` (default: the
    checkpoint's own), then ``overrides`` (dotted key=value) on top.
    """
    base = given if given is not None else trained
    data = base.data.model_copy(update={
        "mean": trained.data.mean, "std": trained.data.std,
        "augment": base.data.augment.model_copy(update={"preset": trained.data.augment.preset}),
    })
    cfg = base.model_copy(update={"model": trained.model, "data": data, "ema": trained.ema})
    if overrides:
        cfg = config_from_dict(apply_overrides(cfg.model_dump(mode="json"), list(overrides)), "overrides")
    return cfg


def model_state(ckpt: dict[str, Any], use_ema: bool) -> dict[str, torch.Tensor]:
    """The weights to run: the EMA shadow when asked for and present, else the raw model."""
    if use_ema and ckpt.get("ema") is not None:
        return ckpt["ema"]["shadow"]
    return ckpt["model"]


class LoadedDetector:
    """A trained detector ready to predict on images (see the module docstring)."""

    def __init__(self, detector: Detector, cfg: Config, device: torch.device) -> None:
        self.detector = detector
        self.cfg = cfg
        self.device = device
        from onestage.build import build_transform

        self.transform: EvalTransform | LetterboxEvalTransform = build_transform(cfg, train=False)  # type: ignore[assignment]
        self.detector.model.to(device).eval()
        if cfg.precision.channels_last:
            self.detector.model.to(memory_format=torch.channels_last)

    @property
    def class_names(self) -> list[str]:
        return self.detector.class_names

    @property
    def input_size(self) -> int:
        return self.cfg.model.input_size

    @property
    def display_threshold(self) -> float:
        """The default ``predict`` threshold (``eval.display_threshold``), as the ONNX runtime's."""
        return self.cfg.eval.display_threshold

    def __repr__(self) -> str:
        return (f"LoadedDetector({self.cfg.model.arch} on {self.cfg.model.backbone}, input {self.input_size}, "
                f"{len(self.class_names)} classes, device {self.device})")

    @torch.no_grad()
    def raw_detections(self, batch: torch.Tensor) -> list:
        """(B, 3, S, S) network inputs -> one ``Detections`` per image (normalized boxes)."""
        from onestage.engine.precision import autocast_context

        images = batch.to(self.device)
        if self.cfg.precision.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast_context(self.cfg.precision, self.device):
            outputs = self.detector.model(images)
        return self.detector.postprocess(outputs)

    def predict(
        self,
        images: Sequence[ImageLike] | ImageLike,
        *,
        threshold: float | None = None,
        batch_size: int = 16,
        progress: bool = False,
    ) -> list[Prediction]:
        """Detections for each image, in order: RGB uint8 (H, W, 3) arrays or paths.

        ``threshold``: the lowest score kept (default ``eval.display_threshold``; 0 keeps every
        detection the post-processor returns). Boxes come back in each image's own pixels.
        """
        from onestage.data.io import load_image

        items = [images] if isinstance(images, (str, Path)) or (isinstance(images, np.ndarray) and images.ndim == 3) \
            else list(images)
        threshold = self.display_threshold if threshold is None else threshold
        empty_boxes, empty_labels = np.zeros((0, 4), np.float32), np.zeros((0,), np.int64)
        results: list[Prediction] = []
        bar = tqdm(total=len(items), desc="predict", unit="img", disable=not progress, dynamic_ncols=True)
        for start in range(0, len(items), batch_size):
            chunk = [load_image(Path(x)) if isinstance(x, (str, Path)) else _check_array(x) for x in items[start:start + batch_size]]
            batch = torch.stack([self.transform(im, empty_boxes, empty_labels)[0] for im in chunk])
            for image, det in zip(chunk, self.raw_detections(batch)):
                h, w = image.shape[:2]
                boxes = np.asarray(self.transform.invert_boxes(det.boxes.float().cpu().numpy(), w, h), np.float32)
                scores, labels = det.scores.float().cpu().numpy(), det.labels.cpu().numpy().astype(np.int64)
                keep = scores >= threshold
                results.append(Prediction(boxes[keep].reshape(-1, 4), scores[keep], labels[keep],
                                          [self.class_names[int(c)] for c in labels[keep]], w, h))
            bar.update(len(chunk))
        bar.close()
        return results


def _check_array(image: np.ndarray) -> np.ndarray:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"predict: an image array must be (H, W, 3) uint8 RGB; got {image.shape} {image.dtype}")
    return image


def load_detector(
    checkpoint: str | Path,
    *,
    device: str | torch.device | None = None,
    use_ema: bool | None = None,
    config: str | Path | Config | None = None,
    overrides: Sequence[str] = (),
    batch_size: int = 16,
    measure_precision: bool = True,
) -> LoadedDetector:
    """A checkpoint written by ``onestage train``, ready to ``predict`` (module docstring).

    ``use_ema``: None follows the run's ``ema.use_for_eval``. ``config``/``overrides`` change
    inference settings only. ``batch_size``: the batch the precision is chosen for (``predict``'s);
    ``measure_precision=False`` takes ``precision`` as configured (an already resolved run's,
    as at the end of training) instead of measuring. Raises ``CheckpointError`` / ``ConfigError`` naming the file.
    """
    from onestage.build import build_detector
    from onestage.engine.checkpoint import load_checkpoint

    ckpt = load_checkpoint(checkpoint)
    trained = checkpoint_config(ckpt, str(checkpoint))
    given = load_config(config) if isinstance(config, (str, Path)) else config
    cfg = inference_config(trained, given, overrides)
    class_names = list(ckpt.get("class_names") or [])
    if not class_names:
        raise ConfigError(f"{checkpoint}: the checkpoint holds no class names")
    detector = build_detector(cfg, class_names)
    use_ema = cfg.ema.use_for_eval if use_ema is None else use_ema
    try:
        detector.model.load_state_dict(model_state(ckpt, use_ema))
    except RuntimeError as exc:
        raise ConfigError(f"{checkpoint}: its weights do not fit the model its config describes: {exc}") from None
    if device is None:
        from onestage.engine import distributed as dist

        device = dist.device()
    device = torch.device(device)
    if measure_precision or cfg.precision.amp == "auto" or cfg.precision.channels_last == "auto":
        cfg = cfg.model_copy(update={"precision": inference_precision(cfg, detector.model.to(device), device, batch_size)})
    return LoadedDetector(detector, cfg, device)


def inference_precision(cfg: Config, model: torch.nn.Module, device: torch.device, batch_size: int):
    """The concrete precision for inference: ``precision.amp: auto`` measured forward-only at
    this batch shape (cached per machine, model and shape; ``engine/calibrate.py``), as training does."""
    from onestage.engine.calibrate import resolve_precision

    shape = (batch_size, 3, cfg.model.input_size, cfg.model.input_size)
    decision = resolve_precision(cfg.precision, model, shape, device, train=False)
    if decision.warning:
        warnings.warn(decision.warning, stacklevel=3)
    return decision.apply(cfg.precision)

