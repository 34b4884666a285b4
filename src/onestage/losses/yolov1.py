"""The YOLOv1 loss, term by term (Redmon et al. 2016, section 2.2, eq. 3; seed 000).

    coord_xy = lambda_coord sum_i sum_j 1_ij^obj [(x_i - x^_i)^2 + (y_i - y^_i)^2]
    coord_wh = lambda_coord sum_i sum_j 1_ij^obj [(sqrt w_i - sqrt w^_i)^2 + (sqrt h_i - sqrt h^_i)^2]
    obj      =              sum_i sum_j 1_ij^obj   (C_i - C^_i)^2
    noobj    = lambda_noobj sum_i sum_j 1_ij^noobj (C_i - C^_i)^2
    cls      =              sum_i 1_i^obj sum_c (p_i(c) - p^_i(c))^2

i runs over the S*S cells, j over the B predictors of a cell; hats are targets.
- 1_i^obj: cell i holds an object's centre (``onestage.assign.yolov1``).
- 1_ij^obj: predictor j is *responsible* for that object: among the cell's B predictors,
  the one whose decoded box has the highest IoU with the object (paper: "the predictor
  whose prediction has the highest current IoU with the ground truth"); equal IoUs (often
  0 and 0 early in training) go to the lowest predictor index.
- 1_ij^noobj = 1 - 1_ij^obj: every other predictor, *including* the non-responsible
  predictors of a cell that holds an object; their confidence target is 0.
- C^ of a responsible predictor: the IoU of its predicted box with the object, detached
  (``conf_target="iou"``, the paper's "Pr(Object) * IoU"), or 1 (``conf_target="one"``).

Square root of a width: the network predicts sqrt(w) and sqrt(h) directly, through a sigmoid
(``onestage.coders.yolov1_activate``), so w = s^2 is in [0, 1] and the loss compares
s with sqrt(w^) of the ground truth (w^ >= 0, and computed without gradient). No square root
of a prediction is ever taken: a very negative or zero raw width gives s = sigmoid(t) >= 0,
a finite loss and a finite gradient.

Reduction: every term is summed over cells, predictors and images, then divided by the
number of images N (the batch size), so the loss of an image does not depend on the batch
it is in. It is not divided by the number of objects, so at the start of training the
"noobj" term alone is about S*S*B * 0.25 * lambda_noobj per image (12 at S = 7, B = 2) and
gradients are large: start SGD near lr 1e-3 (the paper's first rate, section 2.2) with
warmup; a much higher rate from scratch can saturate the sigmoids for good.
Returns the already weighted terms and their sum:
{"coord_xy", "coord_wh", "obj", "noobj", "cls", "total"}.

``preset="darknet"``: exactly Darknet's detection layer (``forward_detection_layer`` in
``src/detection_layer.c`` with yolov1.cfg: ``softmax=0 sqrt=1 rescore=1``, coord_scale 5,
noobject_scale .5, object_scale 1, class_scale 1). Two differences from the default:
- linear outputs (``yolov1_activate(linear=True)``): x, y, sqrt(w), sqrt(h), confidence and
  the class scores are the raw values, which is what Darknet trains on;
- the responsible predictor: the highest IoU (the first of equal positive IoUs, Darknet's
  ``iou > best_iou``), and when no predictor overlaps the object (every IoU 0, as is common
  early in training) the one with the smallest RMSE between (x/S, y/S, w, h) of the predicted
  box and of the truth (Darknet's ``box_rmse``), not the lowest index.
Darknet's deltas are ``scale * (target - output)`` and its gradient is their negation, so
with lambda_coord = coord_scale and lambda_noobj = noobject_scale this loss times N equals
sum(delta^2 / scale) over Darknet's deltas, and its gradient times N is -2 delta. What the
preset gives up: a linear sqrt(w) may be negative (w = s^2 stays >= 0) and unbounded outputs
may diverge at high learning rates, which the default's bounded activations rule out. The
objects of a cell are chosen as in the default (the largest; Darknet's data loader keeps the
first of its randomly shuffled labels).
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
from torch import Tensor, nn

from onestage.assign.yolov1 import YoloV1Targets, build_yolov1_targets
from onestage.boxes import box_iou
from onestage.losses.functional import weighted_terms
from onestage.coders import YOLOv1Prediction, check_yolov1_outputs, yolov1_activate, yolov1_cell_decode

ConfTarget = Literal["iou", "one"]
Preset = Literal["darknet"]


def predictor_ious(pred: YOLOv1Prediction, targets: YoloV1Targets, dtype: torch.dtype = torch.float32) -> Tensor:
    """IoU of each predictor's decoded box with its cell's object: (N, S, S, B), 0 in empty cells.

    Detached: it only chooses the responsible predictor and sets a confidence target.
    """
    boxes = yolov1_cell_decode(pred.cell_boxes.detach())  # (N, S, S, B, 4) xyxy normalized
    iou = box_iou(boxes, targets.boxes_xyxy[..., None, :], dtype=dtype)[..., 0]  # (N, S, S, B)
    return iou.float() * targets.obj[..., None]


def predictor_rmse(pred: YOLOv1Prediction, targets: YoloV1Targets) -> Tensor:
    """Darknet's ``box_rmse`` of each predictor's box with its cell's object: (N, S, S, B).

    Both boxes as (x / S, y / S, w, h): centre offsets in image fractions (the same cell, so
    the cell's position cancels) and sizes. Detached: it only breaks ties of the choice.
    """
    s = pred.xy.shape[1]
    scale = torch.tensor([1.0 / s, 1.0 / s, 1.0, 1.0], device=pred.xy.device)
    diff = (pred.cell_boxes.detach().float() - targets.cell_boxes[..., None, :].float()) * scale  # (N, S, S, B, 4)
    return diff.square().sum(dim=-1).sqrt()


def responsible_predictors(iou: Tensor, obj: Tensor, rmse: Tensor | None = None) -> Tensor:
    """1_ij^obj: (N, S, S, B) IoUs and (N, S, S) cell flags -> (N, S, S, B) bool.

    In each cell holding an object, the predictor with the highest IoU; ties go to the
    lowest index (``max`` returns the first of equal maxima), so the choice does not depend
    on the device. With ``rmse`` (N, S, S, B) (the Darknet preset), a cell where no predictor
    overlaps its object (every IoU 0) takes the predictor of smallest RMSE instead.
    """
    best = iou.max(dim=-1).indices  # (N, S, S)
    if rmse is not None:
        no_overlap = iou.max(dim=-1).values <= 0  # (N, S, S)
        best = torch.where(no_overlap, rmse.min(dim=-1).indices, best)
    one_hot = best[..., None] == torch.arange(iou.shape[-1], device=iou.device)  # (N, S, S, B)
    return one_hot & obj[..., None]


class YOLOv1Loss(nn.Module):
    """Criterion for YOLOv1 outputs (docs/contracts.md); terms in the module docstring.

    forward(outputs (N, S, S, 5B + C) raw, gt_boxes (N, M, 4) xyxy normalized,
    gt_labels (N, M) in [0, C), -1 padding) -> {"coord_xy", "coord_wh", "obj", "noobj",
    "cls", "total"} scalars. ``force_fp32(op_name)`` is the precision predicate ("iou",
    "loss_reduction"); without one, everything runs in fp32.
    """

    def __init__(
        self,
        S: int = 7,
        B: int = 2,
        num_classes: int = 20,
        lambda_coord: float = 5.0,
        lambda_noobj: float = 0.5,
        conf_target: ConfTarget = "iou",
        force_fp32: Callable[[str], bool] | None = None,
        preset: Preset | None = None,
    ) -> None:
        super().__init__()
        if conf_target not in ("iou", "one"):
            raise ValueError(f"conf_target must be 'iou' or 'one', got {conf_target!r}")
        if preset not in (None, "darknet"):
            raise ValueError(f"preset must be 'darknet' or None, got {preset!r}")
        self.preset = preset
        self.linear = preset == "darknet"  # Darknet trains the raw outputs (module docstring)
        self.S = S
        self.B = B
        self.num_classes = num_classes
        self.lambda_coord = lambda_coord  # paper: 5
        self.lambda_noobj = lambda_noobj  # paper: 0.5
        self.conf_target = conf_target
        self.force_fp32 = force_fp32 or (lambda op: True)

    def forward(self, outputs: Tensor, gt_boxes: Tensor, gt_labels: Tensor) -> dict[str, Tensor]:
        if check_yolov1_outputs(outputs, self.B, self.num_classes) != self.S:
            raise ValueError(f"YOLOv1Loss expects an S={self.S} grid, got {outputs.shape[1]}x{outputs.shape[2]}")
        if self.force_fp32("loss_reduction"):
            outputs = outputs.float()
        pred = yolov1_activate(outputs, self.B, self.num_classes, linear=self.linear)
        targets = build_yolov1_targets(gt_boxes, gt_labels, self.S, self.num_classes)
        with torch.no_grad():
            iou_dtype = torch.float32 if self.force_fp32("iou") else torch.bfloat16
            iou = predictor_ious(pred, targets, iou_dtype)  # (N, S, S, B)
            rmse = predictor_rmse(pred, targets) if self.preset == "darknet" else None
            resp = responsible_predictors(iou, targets.obj, rmse)  # (N, S, S, B) 1_ij^obj
            conf_target = iou if self.conf_target == "iou" else torch.ones_like(iou)
            target_xy = targets.cell_boxes[..., None, :2]  # (N, S, S, 1, 2)
            target_sqrt_wh = targets.cell_boxes[..., None, 2:].clamp(min=0).sqrt()  # (N, S, S, 1, 2)

        dtype = pred.conf.dtype
        resp_f = resp.to(dtype)
        noobj_f = (~resp).to(dtype)
        n = outputs.shape[0]
        coord_xy = (resp_f * (pred.xy - target_xy.to(dtype)).square().sum(dim=-1)).sum()
        coord_wh = (resp_f * (pred.sqrt_wh - target_sqrt_wh.to(dtype)).square().sum(dim=-1)).sum()
        obj = (resp_f * (pred.conf - conf_target.to(dtype)).square()).sum()
        noobj = (noobj_f * pred.conf.square()).sum()  # target confidence 0
        cls = (targets.obj[..., None] * (pred.class_probs - targets.class_one_hot.to(dtype)).square()).sum()

        raw = {"coord_xy": coord_xy / n, "coord_wh": coord_wh / n, "obj": obj / n, "noobj": noobj / n, "cls": cls / n}
        return weighted_terms(raw, self.weights)

    @property
    def weights(self) -> dict[str, float]:
        """The paper's lambda_coord on both box terms and lambda_noobj on the empty predictors (eq. 3)."""
        return {"coord_xy": self.lambda_coord, "coord_wh": self.lambda_coord, "obj": 1.0,
                "noobj": self.lambda_noobj, "cls": 1.0}
