"""``onestage export CHECKPOINT --out model.onnx``: the detector as an ONNX file that checks itself.

The graph is the model and its family's ``decode`` traced together with the TorchScript
exporter (``torch.onnx.export(..., dynamo=False)``, the mature one for opsets 11-20):

    images (B, 3, S, S) float32, RGB normalized with the metadata's mean / std
      -> boxes (B, N, 4) float32 xyxy NORMALIZED to [0, 1] of the S x S network input
         (multiply by S for input pixels; the runtime maps them back to the original image)
      -> scores (B, N, C) float32 per-class scores (SSD: softmax without the background;
         YOLO: objectness x class probability), N candidates in the family's order.

With ``nms=True`` the tail of ``onestage.export.nms_graph`` follows (the same threshold,
pre-NMS top-k, per-class NMS and per-image cap as the family's PyTorch post-processor) and
the outputs are ``boxes`` (B, M, 4), ``scores`` (B, M), ``labels`` (B, M), ``num_detections`` (B,).

The file explains itself through ``metadata_props`` (``onestage.export.runtime`` reads
nothing else): class names, input size, resize or letterbox and its padding, mean and std,
family, thresholds, onestage version.

Before returning, the export checks itself: ``onnx.checker``, then onnxruntime against eager
PyTorch (fp32, no autocast) on a few inputs: raw boxes and scores within ``RAW_TOL``, and the
detections (count, labels, boxes within ``BOX_TOL`` of the input size, scores within
``SCORE_TOL``). A failed check deletes the file and raises ``ExportError``.
"""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

import onestage
from onestage.export import FORMAT_VERSION, META_FORMAT, ExportError
from onestage.export.nms_graph import MIN_OPSET, TailSettings, append_tail

DEFAULT_OPSET = 17
RAW_TOL = 1e-4  # fp32 raw boxes (normalized) and scores, absolute
BOX_TOL = 1e-3  # detected boxes, as a fraction of the input size
SCORE_TOL = 1e-4
HALF_TOL = 2e-2  # fp16 files: raw values and detections are compared at this looser tolerance
CHECK_IMAGES = 3


class DecodedDetector(nn.Module):
    """``model`` then ``family.decode``: images (B, 3, S, S) -> (boxes (B, N, 4) xyxy
    normalized, scores (B, N, C)), the graph an exported file holds (module docstring)."""

    def __init__(self, model: nn.Module, decode: Callable[[Any], tuple[Tensor, Tensor]], half: bool = False) -> None:
        super().__init__()
        self.model = model
        self.decode = decode
        self.half = half

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        outputs = self.model(images.half() if self.half else images)
        boxes, scores = self.decode(outputs)  # the decoders compute in fp32
        return boxes.float(), scores.float()


@dataclass
class ExportReport:
    """What an export wrote and measured (``check_export``)."""

    path: Path
    nms: bool
    batches: list[int] = field(default_factory=list)  # batch sizes run
    raw_boxes_diff: float = 0.0  # max |onnxruntime - eager| over the check inputs
    raw_scores_diff: float = 0.0
    tail_detections: int = 0  # detections equal to PyTorch's post-processor on the file's candidates
    images: int = 0
    same_images: int = 0  # images whose detections equal eager PyTorch's end to end
    detections: int = 0  # detections in those images
    det_boxes_diff: float = 0.0  # pixels of the input size
    det_scores_diff: float = 0.0
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        kind = "decoded boxes + scores, then NMS" if self.nms else "decoded boxes + scores (no NMS)"
        lines = [
            f"[export] {self.path}: {kind}",
            f"[export] raw outputs, onnxruntime vs eager PyTorch (batches {', '.join(map(str, self.batches))}): "
            f"max |diff| boxes {self.raw_boxes_diff:.2e}, scores {self.raw_scores_diff:.2e}",
            f"[export] NMS vs PyTorch's post-processor on the same candidates: {self.tail_detections} detections, "
            f"all equal",
            f"[export] end to end vs eager PyTorch: {self.same_images} of {self.images} images give the same "
            f"{self.detections} detections (max |diff| boxes {self.det_boxes_diff:.2e} px, scores {self.det_scores_diff:.2e})",
        ]
        if self.same_images < self.images:
            lines.append("[export] the other images differ only where two candidates' scores are within rounding "
                         "of each other, which decides the order NMS visits them in: PyTorch's post-processor "
                         "on the file's own candidates gives exactly the file's detections")
        return "\n".join(lines + [f"[export] {n}" for n in self.notes])


def tail_settings(detector: Any) -> TailSettings:
    """The settings the family's PyTorch post-processor calls ``select_detections`` with."""
    post = detector.postprocess
    family = detector.family.name
    if family == "ssd":
        return TailSettings(post.score_threshold, post.nms_iou, post.pre_nms_top_k, post.max_detections, "class")
    if family == "yolov3":
        return TailSettings(post.score_threshold, post.nms_iou, post.pre_nms_top_k, post.max_detections, "image")
    if family == "yolov1":  # every candidate enters NMS (YOLOv1PostProcessor)
        n = post.S * post.S * post.B
        return TailSettings(post.score_threshold, post.nms_iou, n, post.max_detections, "class")
    raise ExportError(f"no ONNX post-processing is known for the {family!r} family")


def metadata(loaded: Any, settings: TailSettings, *, nms: bool, opset: int, dynamic: bool, half: bool,
             num_candidates: int, source: str) -> dict[str, str]:
    """``metadata_props``: everything the runtime needs, as strings (lists and numbers as JSON)."""
    from onestage.data.transforms import LetterboxEvalTransform

    cfg, transform = loaded.cfg, loaded.transform
    letterbox = isinstance(transform, LetterboxEvalTransform)
    return {
        META_FORMAT: FORMAT_VERSION,
        "onestage_version": onestage.__version__,
        "source_checkpoint": source,
        "family": loaded.detector.family.name,
        "arch": cfg.model.arch,
        "backbone": cfg.model.backbone,
        "class_names": json.dumps(list(loaded.class_names)),
        "input_size": str(cfg.model.input_size),
        "input": "images (B, 3, S, S) float32 RGB, (x / 255 - mean) / std",
        "resize": "letterbox" if letterbox else "resize",
        "pad_value": str(transform.pad_value if letterbox else 0),
        "mean": json.dumps(list(transform.mean)),
        "std": json.dumps(list(transform.std)),
        "outputs": "nms" if nms else "raw",
        "boxes_frame": "xyxy normalized to [0, 1] of the S x S network input",
        "num_candidates": str(num_candidates),
        "score_threshold": json.dumps(settings.score_threshold),
        "nms_iou": json.dumps(settings.nms_iou),
        "pre_nms_top_k": str(settings.pre_nms_top_k),
        "top_k_per": settings.top_k_per,
        "max_detections": str(settings.max_detections),
        "display_threshold": json.dumps(cfg.eval.display_threshold),
        "dtype": "float16" if half else "float32",
        "opset": str(opset),
        "dynamic_batch": json.dumps(dynamic),
    }


def export_onnx(
    checkpoint: str | Path,
    out: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    dynamic_batch: bool = False,
    nms: bool = False,
    max_detections: int | None = None,
    half: bool = False,
    overrides: Sequence[str] = (),
    check_images: int = CHECK_IMAGES,
) -> ExportReport:
    """Export ``checkpoint`` to ``out`` and check it (module docstring). Raises ``ExportError``
    (no file left behind) when the export cannot be done or does not reproduce PyTorch.

    ``overrides``: inference settings (``eval.score_threshold=0.05``...); ``max_detections``
    replaces ``eval.max_detections`` (the per-image cap and the padded size M).
    """
    from onestage.api import load_detector

    if nms and opset < MIN_OPSET:
        raise ExportError(f"--nms needs opset >= {MIN_OPSET} (NonMaxSuppression with its thresholds as inputs, "
                          f"TopK, ScatterND); got --opset {opset}: use --opset {DEFAULT_OPSET} (the default)")
    extra = ["precision.amp=false", "precision.channels_last=false"]  # the reference is fp32 eager PyTorch
    if max_detections is not None:
        extra.append(f"eval.max_detections={max_detections}")
    loaded = load_detector(checkpoint, device="cpu", overrides=[*overrides, *extra])
    detector, size = loaded.detector, loaded.cfg.model.input_size
    wrapper = DecodedDetector(detector.model, detector.family.decode, half).eval()
    if half:
        detector.model.half()
    settings = tail_settings(detector)
    num_candidates = int(detector.family.candidate_boxes().shape[0])  # N, in the order of decode
    model = _trace(wrapper, size, opset, dynamic_batch, nms, loaded.cfg)
    if nms:
        append_tail(model, "candidate_boxes", "candidate_scores", num_candidates, len(loaded.class_names), settings)
    import onnx

    onnx.helper.set_model_props(model, metadata(loaded, settings, nms=nms, opset=opset, dynamic=dynamic_batch,
                                                half=half, num_candidates=num_candidates, source=Path(checkpoint).name))
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportError(f"{checkpoint}: the exported graph fails onnx.checker: {exc}") from None
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(out))
    try:
        report = check_export(out, loaded, wrapper, settings, nms=nms, dynamic=dynamic_batch, half=half,
                              images=check_images)
    except BaseException:
        out.unlink(missing_ok=True)
        raise
    return report


def _trace(wrapper: nn.Module, size: int, opset: int, dynamic: bool, nms: bool, cfg: Any):
    """The traced graph as an ``onnx.ModelProto``; an exporter failure becomes an ``ExportError``
    that says what could not be exported and what to change."""
    import onnx

    names = ["candidate_boxes", "candidate_scores"] if nms else ["boxes", "scores"]
    axes = {n: {0: "batch"} for n in ["images", *names]} if dynamic else None
    example = torch.zeros(2 if dynamic else 1, 3, size, size)
    buffer = io.BytesIO()
    what = f"{cfg.model.arch} on {cfg.model.backbone} at input {size}, opset {opset}"
    try:
        with warnings.catch_warnings():
            # The legacy-exporter notice and the tracer's "converting a tensor to a Python int"
            # remarks on shape arithmetic, which is fixed for a fixed input size.
            warnings.simplefilter("ignore")
            torch.onnx.export(wrapper, (example,), buffer, dynamo=False, opset_version=opset, input_names=["images"],
                              output_names=names, dynamic_axes=axes, do_constant_folding=True)
    except (RuntimeError, ValueError, torch.onnx.errors.OnnxExporterError) as exc:
        raise ExportError(_explain(exc, what, opset)) from None
    return onnx.load_from_string(buffer.getvalue())


def _explain(exc: Exception, what: str, opset: int) -> str:
    """The exporter's error, with what to change."""
    from torch.onnx import _constants
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "adaptive_avg_pool2d" in str(exc) or "adaptive" in message.lower():
        hint = ("YOLOv1's head average-pools the backbone's last map to S x S (adaptive pooling), which ONNX "
                "can express only when the map side is a multiple of S; train at a model.input_size that "
                "gives such a map (e.g. the tiny backbone at 224 gives 7 x 7 for S = 7), or set model.yolov1.grid "
                "to a divisor of the map side")
    elif "onnx_opset_version" in message:
        hint = f"choose --opset from {_constants.ONNX_MIN_OPSET} to {_constants.ONNX_MAX_OPSET} (default {DEFAULT_OPSET})"
    elif "opset" in message.lower() or "Unsupported" in type(exc).__name__:
        hint = f"an operator is missing at opset {opset}: try a newer --opset (up to {_constants.ONNX_MAX_OPSET})"
    else:
        hint = "see the exporter's message above"
    return f"cannot export {what}: {message}. {hint}"


# ----------------------------------------------------------------------------- the self-check
def check_inputs(size: int, count: int, seed: int = 0) -> np.ndarray:
    """(count, 3, S, S) float32 network inputs: normalized noise of growing contrast, so that
    they reach the post-processor with different score ranges."""
    rng = np.random.default_rng(seed)
    return np.stack([rng.standard_normal((3, size, size)).astype(np.float32) * (0.5 + i) for i in range(count)])


def check_export(path: Path, loaded: Any, wrapper: nn.Module, settings: TailSettings, *, nms: bool, dynamic: bool,
                 half: bool, images: int) -> ExportReport:
    """onnxruntime on ``path`` against eager PyTorch; raises ``ExportError``.

    Three checks on each batch of ``check_inputs``:
    1. raw outputs: the file's candidates (boxes, scores) against the eager model + decode,
       within ``RAW_TOL`` (for an NMS file: its graph cut before the tail);
    2. the tail: the file's detections against the PyTorch post-processor
       (``select_detections``) run on the file's own candidates: count, classes, boxes and
       scores equal within the tolerances (in practice bit for bit);
    3. end to end: the file's detections against the eager post-processor on the eager
       candidates. Scores that differ by rounding (1e-9 on an untrained model's packed scores)
       may swap two near-equal candidates and so change which one NMS keeps: such images are
       counted and reported; 1 and 2 together prove they are PyTorch's answer for inputs within
       the raw tolerance. Images where 1 or 2 fail raise.
    """
    session = _checking_session(path, nms)
    x = check_inputs(loaded.cfg.model.input_size, images)
    batches = [x, x[:1]] if dynamic else [x[i : i + 1] for i in range(len(x))]
    report = ExportReport(path, nms)
    raw_tol, box_tol, score_tol = (HALF_TOL,) * 3 if half else (RAW_TOL, BOX_TOL, SCORE_TOL)
    size = loaded.cfg.model.input_size
    for batch in batches:
        with torch.no_grad():
            outputs = _raw(wrapper, batch)
            boxes, scores = (t.float() for t in wrapper.decode(outputs))  # (B, N, 4), (B, N, C) eager
            eager = loaded.detector.postprocess(outputs)
        outputs = session.run(None, {"images": batch})
        raw_boxes, raw_scores = outputs[-2:]  # the candidates (for an NMS file: the tail's inputs)
        report.raw_boxes_diff = max(report.raw_boxes_diff, float(np.abs(raw_boxes - boxes.numpy()).max()))
        report.raw_scores_diff = max(report.raw_scores_diff, float(np.abs(raw_scores - scores.numpy()).max()))
        got = outputs[:4] if nms else _tail(raw_boxes, raw_scores, settings)
        on_own = _select(raw_boxes, raw_scores, settings)
        problem = compare_detections(on_own, got, size, box_tol, score_tol)
        if problem is not None:
            raise ExportError(f"{path}: the file's NMS differs from PyTorch's on the same candidates: {problem}; "
                              f"the file was deleted")
        report.batches.append(len(batch))
        report.tail_detections += sum(len(d) for d in on_own)
        for i, det in enumerate(eager):
            report.images += 1
            if compare_detections([det], [g[i : i + 1] for g in got], size, box_tol, score_tol) is None:
                report.same_images += 1
                _measure(det, [g[i] for g in got], size, report)
    if report.raw_boxes_diff > raw_tol or report.raw_scores_diff > raw_tol:
        raise ExportError(f"{path}: onnxruntime's raw outputs differ from eager PyTorch by {report.raw_boxes_diff:.2e} "
                          f"(boxes) / {report.raw_scores_diff:.2e} (scores), over the tolerance {raw_tol:g}; "
                          f"the file was deleted")
    if report.tail_detections == 0:
        report.notes.append(f"no candidate scored {settings.score_threshold:g} or more on the check inputs: the NMS "
                            f"was compared on empty results only (an untrained model?)")
    if half:
        report.notes.append(f"float16 file: compared with the float16 eager model at tolerance {HALF_TOL:g}")
    return report


def _raw(wrapper: DecodedDetector, batch: np.ndarray) -> Any:
    images = torch.from_numpy(batch)
    return wrapper.model(images.half() if wrapper.half else images)


def _select(boxes: np.ndarray, scores: np.ndarray, s: TailSettings) -> list:
    from onestage.postprocess import select_detections

    return select_detections(torch.from_numpy(boxes), torch.from_numpy(scores), score_threshold=s.score_threshold,
                             nms_iou=s.nms_iou, max_detections=s.max_detections, pre_nms_top_k=s.pre_nms_top_k,
                             top_k_per=s.top_k_per)


def _tail(boxes: np.ndarray, scores: np.ndarray, settings: TailSettings) -> list[np.ndarray]:
    from onestage.export.runtime import run_tail

    return run_tail(boxes, scores, settings)


def _checking_session(path: Path, nms: bool):
    """onnxruntime on the written file; for an NMS file, its graph with the tail's inputs
    (``candidate_boxes``, ``candidate_scores``) as two more outputs, so that one run gives both."""
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if not nms:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    model = onnx.load(str(path))
    model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in ("candidate_boxes", "candidate_scores"))
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def compare_detections(ref: list, got: Sequence[np.ndarray], size: int, box_tol: float = BOX_TOL,
                       score_tol: float = SCORE_TOL) -> str | None:
    """None when the padded (boxes, scores, labels, count) of ``got`` hold the ``Detections`` of
    ``ref`` (same count and classes, boxes within ``box_tol`` x size pixels, scores within
    ``score_tol``), else what differs first."""
    boxes, scores, labels, counts = got
    for i, det in enumerate(ref):
        n = len(det)
        if int(counts[i]) != n:
            return f"image {i}: {int(counts[i])} detections against {n}"
        if not np.array_equal(labels[i, :n], det.labels.numpy()):
            return f"image {i}: the classes differ"
        if n and float(np.abs(boxes[i, :n] - det.boxes.float().numpy()).max()) > box_tol:
            return f"image {i}: boxes differ by {float(np.abs(boxes[i, :n] - det.boxes.float().numpy()).max()) * size:.2e} px"
        if n and float(np.abs(scores[i, :n] - det.scores.float().numpy()).max()) > score_tol:
            return f"image {i}: scores differ by {float(np.abs(scores[i, :n] - det.scores.float().numpy()).max()):.2e}"
    return None


def _measure(det: Any, got: Sequence[np.ndarray], size: int, report: ExportReport) -> None:
    n = len(det)
    report.detections += n
    if n:
        report.det_boxes_diff = max(report.det_boxes_diff, float(np.abs(got[0][:n] - det.boxes.float().numpy()).max()) * size)
        report.det_scores_diff = max(report.det_scores_diff, float(np.abs(got[1][:n] - det.scores.float().numpy()).max()))
