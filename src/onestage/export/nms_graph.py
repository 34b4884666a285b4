"""The detection tail as ONNX nodes: threshold, top-k, per-class NMS, per-image cap, padding.

Built with ``onnx.helper`` only (no torch), so that the exporter appends it to a traced
graph (``onestage export --nms``) and the runtime runs it after a file exported without
``--nms``: one implementation of the ONNX tail. It reproduces
``onestage.postprocess.select_detections`` step for step:

    candidates: boxes (B, N, 4) xyxy normalized, scores (B, N, C)
    top_k_per="class": per (image, class) the best K = min(pre_nms_top_k, N) scores (TopK),
        NMS on each of the B*C lists alone (NonMaxSuppression with batch B*C, one class);
    top_k_per="image": per image the best K = min(pre_nms_top_k, N*C) (candidate, class)
        pairs, NMS over them with class-aware suppression (a (B, C, K) score tensor that
        holds each pair's score in its own class row and -inf elsewhere);
    then the best ``max_detections`` kept pairs per image (TopK), padded to that many.

Why the results are the same, not merely close (checked by tests/test_export.py):
- ONNX TopK orders equal values lowest index first, as ``stable_top_k`` does in PyTorch.
- onnxruntime's NonMaxSuppression visits candidates by descending score, equal scores lowest
  index first (the order of the top-k list), and suppresses when IoU > threshold, computed in
  fp32 as intersection / (area_a + area_b - intersection) like ``boxes.box_iou``; a box with
  zero area or zero intersection never suppresses (IoU 0 in ``box_iou``).
- Its score filter is ``score > threshold``; ours is ``score >= threshold``. The graph
  passes the next float32 below the threshold, which makes the two the same test.
- ``max_output_boxes_per_class`` is K, the whole list, so NMS never stops early: the
  pre-NMS top-k is the graph's TopK, as in PyTorch.

Outputs: ``boxes`` (B, M, 4) float32 xyxy normalized to the S x S network input, ``scores``
(B, M) descending, ``labels`` (B, M) int64 in [0, C), ``num_detections`` (B,) int64: rows
past the count are padding (boxes and scores 0, labels -1). M = max_detections.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

MIN_OPSET = 11  # NonMaxSuppression with its thresholds as inputs, TopK with k as an input, ScatterND
OUTPUT_NAMES = ("boxes", "scores", "labels", "num_detections")


@dataclass(frozen=True)
class TailSettings:
    """What ``select_detections`` is called with (the family's post-processor settings)."""

    score_threshold: float
    nms_iou: float
    pre_nms_top_k: int
    max_detections: int
    top_k_per: Literal["class", "image"]


class _Graph:
    """Nodes and constants of the tail, every name prefixed so that it cannot collide with the
    traced graph it is appended to."""

    def __init__(self, opset: int, prefix: str = "nms/") -> None:
        self.opset, self.prefix = opset, prefix
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._n = 0

    def _name(self, hint: str) -> str:
        self._n += 1
        return f"{self.prefix}{hint}_{self._n}"

    def const(self, value: np.ndarray | float | int, hint: str = "c") -> str:
        name = self._name(hint)
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, op_type: str, inputs: list[str], hint: str = "", outputs: int = 1, out_names=None, **attrs) -> str | list[str]:
        names = out_names or [self._name(hint or op_type.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, names, name=self._name(op_type), **attrs))
        return names[0] if outputs == 1 else names

    def unsqueeze(self, x: str, axes: list[int]) -> str:
        if self.opset >= 13:
            return self.op("Unsqueeze", [x, self.const(np.array(axes, np.int64), "axes")])
        return self.op("Unsqueeze", [x], axes=axes)

    def reduce_sum(self, x: str, axes: list[int]) -> str:
        if self.opset >= 13:
            return self.op("ReduceSum", [x, self.const(np.array(axes, np.int64), "axes")], keepdims=0)
        return self.op("ReduceSum", [x], axes=axes, keepdims=0)

    def top_k(self, x: str, k: int) -> tuple[str, str]:
        values, indices = self.op("TopK", [x, self.const(np.array([k], np.int64), "k")], outputs=2, axis=-1,
                                  largest=1, sorted=1)
        return values, indices

    def gather_rows(self, data: str, index: str, width: int) -> str:
        """data (B, L, W), index (B, M) -> (B, M, W): row index[b, m] of image b."""
        expanded = self.op("Expand", [self.unsqueeze(index, [2]), self.const(np.array([1, 1, width], np.int64))])
        return self.op("GatherElements", [data, expanded], axis=1)


def _below(threshold: float) -> np.ndarray:
    """The next float32 below ``threshold``: onnxruntime keeps ``score > t``, PyTorch ``score >= t``."""
    return np.nextafter(np.float32(threshold), np.float32(-np.inf)).reshape(1).astype(np.float32)


def tail_nodes(
    g: _Graph, boxes: str, scores: str, num_candidates: int, num_classes: int, s: TailSettings,
    output_names: tuple[str, str, str, str] = OUTPUT_NAMES,
) -> None:
    """Append the tail reading ``boxes`` (B, N, 4) and ``scores`` (B, N, C) to ``g`` (module docstring)."""
    if g.opset < MIN_OPSET:
        raise ValueError(f"the NMS tail needs opset >= {MIN_OPSET} (NonMaxSuppression, TopK, ScatterND); got {g.opset}")
    n, c = num_candidates, num_classes
    batch = g.op("Slice", [g.op("Shape", [boxes]), g.const(np.array([0], np.int64)), g.const(np.array([1], np.int64))])
    if s.top_k_per == "class":
        k = min(s.pre_nms_top_k, n)
        top_scores, top_idx = g.top_k(g.op("Transpose", [scores], perm=[0, 2, 1]), k)  # (B, C, K)
        flat_idx = g.op("Reshape", [top_idx, g.const(np.array([0, -1], np.int64))])  # (B, C*K)
        flat_boxes = g.gather_rows(boxes, flat_idx, 4)  # (B, C*K, 4)
        nms_boxes = g.op("Reshape", [flat_boxes, g.const(np.array([-1, k, 4], np.int64))])  # (B*C, K, 4)
        nms_scores = g.op("Reshape", [top_scores, g.const(np.array([-1, 1, k], np.int64))])  # (B*C, 1, K)
        list_scores = g.op("Reshape", [top_scores, g.const(np.array([-1, k], np.int64))])  # (B*C, K)
        labels_row = np.repeat(np.arange(c, dtype=np.int64), k)[None]  # (1, C*K): class of each slot
        flat_labels = g.op("Expand", [g.const(labels_row, "labels"), g.op("Concat", [batch, g.const(np.array([c * k], np.int64))], axis=0)])
    elif s.top_k_per == "image":
        k = min(s.pre_nms_top_k, n * c)
        top_scores, top_idx = g.top_k(g.op("Reshape", [scores, g.const(np.array([0, -1], np.int64))]), k)  # (B, K): n*C + c
        c_const = g.const(np.array(c, np.int64))
        flat_labels = g.op("Mod", [top_idx, c_const])  # (B, K)
        flat_boxes = g.gather_rows(boxes, g.op("Div", [top_idx, c_const]), 4)  # (B, K, 4)
        own_class = g.op("Equal", [g.unsqueeze(flat_labels, [1]), g.const(np.arange(c, dtype=np.int64).reshape(1, c, 1))])
        minus_inf = g.const(np.array(-np.inf, np.float32))
        nms_scores = g.op("Where", [own_class, g.unsqueeze(top_scores, [1]), minus_inf])  # (B, C, K)
        nms_boxes, list_scores = flat_boxes, top_scores
    else:
        raise ValueError(f"top_k_per must be 'class' or 'image', got {s.top_k_per!r}")
    # max_output_boxes_per_class = K, the whole list: NMS never stops early (module docstring).
    nms_args = [g.const(np.array([k], np.int64), "max_out"), g.const(np.array([s.nms_iou], np.float32), "iou"),
                g.const(_below(s.score_threshold), "score_thr")]
    selected = g.op("NonMaxSuppression", [nms_boxes, nms_scores, *nms_args])  # (S, 3): list, class, slot
    rows = g.op("Gather", [selected, g.const(np.array([0, 2], np.int64))], axis=1)  # (S, 2): list, slot
    fill = g.op("ConstantOfShape", [g.op("Shape", [list_scores])], value=helper.make_tensor("v", TensorProto.FLOAT, [1], [-1.0]))
    kept = g.op("ScatterND", [fill, rows, g.op("GatherND", [list_scores, rows])])  # kept scores, -1 elsewhere
    flat_scores = g.op("Reshape", [kept, g.op("Concat", [batch, g.const(np.array([-1], np.int64))], axis=0)])  # (B, L)
    _cap_and_pad(g, flat_scores, flat_boxes, flat_labels, min(s.max_detections, k * (c if s.top_k_per == "class" else 1)),
                 s.max_detections, output_names)


def _cap_and_pad(g: _Graph, flat_scores: str, flat_boxes: str, flat_labels: str, m: int, size: int,
                 output_names: tuple[str, str, str, str]) -> None:
    """The best m kept pairs per image, padded to ``size`` rows; padding zeroed (labels -1)."""
    best, best_idx = g.top_k(flat_scores, m)  # (B, m) descending
    valid = g.op("Not", [g.op("Less", [best, g.const(np.array(0.0, np.float32))])])  # kept pairs have scores >= 0
    zero = g.const(np.array(0.0, np.float32))
    boxes = g.op("Where", [g.unsqueeze(valid, [2]), g.gather_rows(flat_boxes, best_idx, 4), zero])
    scores = g.op("Where", [valid, best, zero])
    labels = g.op("Where", [valid, g.op("GatherElements", [flat_labels, best_idx], axis=1), g.const(np.array(-1, np.int64))])
    count = g.reduce_sum(g.op("Cast", [valid], to=TensorProto.INT64), [1])
    pad = size - m
    if pad:
        boxes = g.op("Pad", [boxes, g.const(np.array([0, 0, 0, 0, pad, 0], np.int64)), zero])
        scores = g.op("Pad", [scores, g.const(np.array([0, 0, 0, pad], np.int64)), zero])
        labels = g.op("Pad", [labels, g.const(np.array([0, 0, 0, pad], np.int64)), g.const(np.array(-1, np.int64))])
    for value, name in zip((boxes, scores, labels, count), output_names):
        g.op("Identity", [value], out_names=[name])


def output_infos(output_names: tuple[str, str, str, str] = OUTPUT_NAMES, size: int | None = None) -> list[onnx.ValueInfoProto]:
    """Declared outputs of the tail: batch dimension symbolic, ``size`` rows."""
    return [
        helper.make_tensor_value_info(output_names[0], TensorProto.FLOAT, ["batch", size, 4]),
        helper.make_tensor_value_info(output_names[1], TensorProto.FLOAT, ["batch", size]),
        helper.make_tensor_value_info(output_names[2], TensorProto.INT64, ["batch", size]),
        helper.make_tensor_value_info(output_names[3], TensorProto.INT64, ["batch"]),
    ]


def append_tail(model: onnx.ModelProto, boxes: str, scores: str, num_candidates: int, num_classes: int,
                settings: TailSettings) -> onnx.ModelProto:
    """``model`` whose outputs ``boxes``/``scores`` now feed the tail; its outputs become the tail's."""
    g = _Graph(_onnx_opset(model))
    tail_nodes(g, boxes, scores, num_candidates, num_classes, settings)
    graph = model.graph
    graph.node.extend(g.nodes)
    graph.initializer.extend(g.inits)
    del graph.output[:]
    graph.output.extend(output_infos(size=settings.max_detections))
    return model


def tail_model(num_candidates: int, num_classes: int, settings: TailSettings, opset: int = 17) -> onnx.ModelProto:
    """The tail alone, inputs ``candidate_boxes`` (B, N, 4) and ``candidate_scores`` (B, N, C):
    what the runtime runs after a file exported without ``--nms``."""
    g = _Graph(opset)
    tail_nodes(g, "candidate_boxes", "candidate_scores", num_candidates, num_classes, settings)
    inputs = [
        helper.make_tensor_value_info("candidate_boxes", TensorProto.FLOAT, ["batch", num_candidates, 4]),
        helper.make_tensor_value_info("candidate_scores", TensorProto.FLOAT, ["batch", num_candidates, num_classes]),
    ]
    graph = helper.make_graph(g.nodes, "onestage_nms_tail", inputs, output_infos(size=settings.max_detections), g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="onestage")
    model.ir_version = min(model.ir_version, 8)  # readable by older onnxruntime builds too
    return model


def _onnx_opset(model: onnx.ModelProto) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
