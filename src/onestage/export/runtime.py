"""Run an exported ``.onnx`` detector with onnxruntime: no torch, no training code.

    from onestage.export.runtime import load_onnx_detector
    det = load_onnx_detector("model.onnx")
    preds = det.predict(["a.jpg"], threshold=0.4)     # the same Prediction objects as onestage.api

Imports numpy, onnxruntime, OpenCV and Pillow (through ``onestage.data.geometry``,
``onestage.data.io``, ``onestage.prediction``), and ``onnx`` only for a file exported without
``--nms`` (its NMS tail, ``onestage.export.nms_graph``, is built and run as a second graph).
Everything else comes from the file's metadata (``onestage.export.onnx.metadata``): the
input size, resize or letterbox and its padding, mean and std, the class names, the thresholds.
Pre-processing is ``onestage.data.geometry``, the very code of the checkpoint's eval
transform, so both paths feed the network the same numbers.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from onestage.data.geometry import eval_plan, invert_boxes, normalize_image, render
from onestage.export import FORMAT_VERSION, META_FORMAT, ExportError
from onestage.prediction import Prediction

ImageLike = np.ndarray | str | Path


def _session(model: str | bytes, threads: int | None = None) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3  # no notices about initializers the optimizer folded
    if threads is not None:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


@lru_cache(maxsize=8)
def _tail_session(num_candidates: int, num_classes: int, settings: Any) -> ort.InferenceSession:
    from onestage.export.nms_graph import tail_model

    return _session(tail_model(num_candidates, num_classes, settings).SerializeToString())


def run_tail(boxes: np.ndarray, scores: np.ndarray, settings: Any) -> list[np.ndarray]:
    """The NMS tail (``nms_graph``) on decoded candidates: boxes (B, N, 4), scores (B, N, C)
    -> [boxes (B, M, 4), scores (B, M), labels (B, M), num_detections (B,)]."""
    session = _tail_session(boxes.shape[1], scores.shape[2], settings)
    return session.run(None, {"candidate_boxes": np.ascontiguousarray(boxes, np.float32),
                              "candidate_scores": np.ascontiguousarray(scores, np.float32)})


def preprocess(image: np.ndarray, rule: str, size: int, fill: tuple[int, int, int], mean: Sequence[float],
               std: Sequence[float]) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (3, S, S) float32: ``rule`` ("resize" or "letterbox") onto a ``fill``
    canvas, then ``(x / 255 - mean) / std``: what ``EvalTransform`` / ``LetterboxEvalTransform`` do."""
    plan = eval_plan(rule, image.shape[1], image.shape[0], size)  # type: ignore[arg-type]
    return normalize_image(render(image, plan, size, fill), tuple(mean), tuple(std))  # type: ignore[arg-type]


class OnnxDetector:
    """An exported detector ready to predict on images; the interface of ``api.LoadedDetector``."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ExportError(f"{self.path}: no such ONNX file")
        try:
            self.session = _session(str(self.path), threads)
        except (ort.capi.onnxruntime_pybind11_state.Fail, ort.capi.onnxruntime_pybind11_state.InvalidGraph,
                ort.capi.onnxruntime_pybind11_state.InvalidProtobuf) as exc:
            raise ExportError(f"{self.path}: onnxruntime cannot load it: {exc}") from None
        self.meta = self.session.get_modelmeta().custom_metadata_map
        if self.meta.get(META_FORMAT) != FORMAT_VERSION:
            raise ExportError(f"{self.path}: no onestage metadata (format {FORMAT_VERSION}) in the file; "
                              f"export it with `onestage export CHECKPOINT --out {self.path.name}`")
        m = self.meta
        self.class_names: list[str] = json.loads(m["class_names"])
        self.input_size = int(m["input_size"])
        self.rule = m["resize"]
        self.fill = (int(m["pad_value"]),) * 3
        self.mean = tuple(json.loads(m["mean"]))
        self.std = tuple(json.loads(m["std"]))
        self.display_threshold = float(json.loads(m["display_threshold"]))
        self.has_nms = m["outputs"] == "nms"
        self.input_dtype = np.float16 if "float16" in self.session.get_inputs()[0].type else np.float32
        self.fixed_batch = self.session.get_inputs()[0].shape[0] if isinstance(self.session.get_inputs()[0].shape[0], int) else None
        if not self.has_nms:
            from onestage.export.nms_graph import TailSettings

            self.tail = TailSettings(float(json.loads(m["score_threshold"])), float(json.loads(m["nms_iou"])),
                                     int(m["pre_nms_top_k"]), int(m["max_detections"]), m["top_k_per"])

    def __repr__(self) -> str:
        return (f"OnnxDetector({self.meta['arch']} on {self.meta['backbone']}, input {self.input_size} "
                f"({self.rule}), {len(self.class_names)} classes, {'NMS in the graph' if self.has_nms else 'raw'})")

    def preprocess(self, image: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 RGB -> (3, S, S) float32 network input (the checkpoint's eval transform)."""
        return preprocess(image, self.rule, self.input_size, self.fill, self.mean, self.std)

    def detect(self, batch: np.ndarray) -> list[np.ndarray]:
        """(B, 3, S, S) inputs -> [boxes (B, M, 4) normalized, scores (B, M), labels (B, M), count (B,)]."""
        if self.fixed_batch is not None and len(batch) != self.fixed_batch:  # exported without --dynamic-batch
            parts = [self.detect(batch[i : i + self.fixed_batch]) for i in range(0, len(batch), self.fixed_batch)]
            return [np.concatenate(p) for p in zip(*parts)]
        outputs = self.session.run(None, {"images": batch.astype(self.input_dtype)})
        return outputs if self.has_nms else run_tail(outputs[0], outputs[1], self.tail)

    def predict(self, images: Sequence[ImageLike] | ImageLike, *, threshold: float | None = None,
                batch_size: int = 16) -> list[Prediction]:
        """Detections for each image (RGB uint8 (H, W, 3) arrays or paths), in its own pixels;
        ``threshold``: lowest score kept (default: the metadata's display threshold)."""
        from onestage.data.io import load_image

        items = [images] if isinstance(images, (str, Path)) or (isinstance(images, np.ndarray) and images.ndim == 3) \
            else list(images)
        threshold = self.display_threshold if threshold is None else threshold
        results: list[Prediction] = []
        for start in range(0, len(items), batch_size):
            chunk = [load_image(Path(x)) if isinstance(x, (str, Path)) else _check_array(x) for x in items[start:start + batch_size]]
            boxes, scores, labels, counts = self.detect(np.stack([self.preprocess(im) for im in chunk]))
            for i, image in enumerate(chunk):
                h, w = image.shape[:2]
                n = int(counts[i])
                keep = scores[i, :n] >= threshold
                px = invert_boxes(eval_plan(self.rule, w, h, self.input_size), boxes[i, :n][keep], self.input_size, w, h)  # type: ignore[arg-type]
                kept_labels = labels[i, :n][keep].astype(np.int64)
                results.append(Prediction(px.astype(np.float32).reshape(-1, 4), scores[i, :n][keep].astype(np.float32),
                                          kept_labels, [self.class_names[int(c)] for c in kept_labels], w, h))
        return results


def _check_array(image: np.ndarray) -> np.ndarray:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"predict: an image array must be (H, W, 3) uint8 RGB; got {image.shape} {image.dtype}")
    return image


def load_onnx_detector(path: str | Path, *, config: Any = None, overrides: Sequence[str] = ()) -> OnnxDetector:
    """An exported file ready to predict. Its settings are fixed at export: ``config`` and
    ``overrides`` (which a checkpoint accepts) are refused with what to do instead."""
    if config is not None or overrides:
        raise ExportError(f"{path}: an exported file carries its inference settings; --config and key=value "
                          f"overrides apply when exporting (`onestage export CHECKPOINT --out {Path(path).name} "
                          f"eval.score_threshold=...`), not to the .onnx file")
    return OnnxDetector(path)
