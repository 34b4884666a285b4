"""Export to ONNX and run the exported file (``onestage export``, ``onestage predict model.onnx``).

- ``onestage.export.onnx``: the exporter (torch): model + the family's decode traced with
  ``torch.onnx.export``, optionally the NMS tail, metadata, and the self-check against eager PyTorch.
- ``onestage.export.nms_graph``: the NMS tail as plain ONNX nodes (``onnx`` only, no torch):
  the same threshold / top-k / per-class NMS / cap as ``onestage.postprocess.select_detections``.
- ``onestage.export.runtime``: runs an exported file with onnxruntime, pre- and
  post-processing from its metadata; imports neither torch nor the training code.

This package's ``__init__`` stays torch-free: the runtime imports it.
"""

from __future__ import annotations


class ExportError(RuntimeError):
    """An export that cannot be done or does not reproduce PyTorch, or an ONNX file that cannot
    be run; the message says what and how to change it."""


# Metadata keys (``metadata_props``) written by the exporter and read by the runtime. Values
# are strings; lists and numbers are JSON.
META_FORMAT = "onestage_format"  # "1": the layout of these keys
FORMAT_VERSION = "1"
