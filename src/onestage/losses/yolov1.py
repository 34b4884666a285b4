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
"""

from __future__ import annotations

from typing import Callable, Literal

import torch
from torch import Tensor, nn

from onestage.assign.yolov1 import YoloV1Targets, build_yolov1_targets
from onestage.boxes import box_iou
from onestage.coders import YOLOv1Prediction, check_yolov1_outputs, yolov1_activate, yolov1_cell_decode

ConfTarget = Literal["iou", "one"]


def predictor_ious(pred: YOLOv1Prediction, targets: YoloV1Targets, dtype: torch.dtype = torch.float32) -> Tensor:
    """IoU of each predictor's decoded box with its cell's object: (N, S, S, B), 0 in empty cells.

    Detached: it only chooses the responsible predictor and sets a confidence target.
    """
    boxes = yolov1_cell_decode(pred.cell_boxes.detach())  # (N, S, S, B, 4) xyxy normalized
    iou = box_iou(boxes, targets.boxes_xyxy[..., None, :], dtype=dtype)[..., 0]  # (N, S, S, B)
    return iou.float() * targets.obj[..., None]


def responsible_predictors(iou: Tensor, obj: Tensor) -> Tensor:
    """1_ij^obj: (N, S, S, B) IoUs and (N, S, S) cell flags -> (N, S, S, B) bool.

    In each cell holding an object, the predictor with the highest IoU; ties go to the
    lowest index (``max`` returns the first of equal maxima), so the choice does not depend
    on the device.
    """
    best = iou.max(dim=-1).indices  # (N, S, S)
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
    ) -> None:
        super().__init__()
        if conf_target not in ("iou", "one"):
            raise ValueError(f"conf_target must be 'iou' or 'one', got {conf_target!r}")
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
        pred = yolov1_activate(outputs, self.B, self.num_classes)
        targets = build_yolov1_targets(gt_boxes, gt_labels, self.S, self.num_classes)
        with torch.no_grad():
            iou_dtype = torch.float32 if self.force_fp32("iou") else torch.bfloat16
            iou = predictor_ious(pred, targets, iou_dtype)  # (N, S, S, B)
            resp = responsible_predictors(iou, targets.obj)  # (N, S, S, B) 1_ij^obj
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

        terms = {
            "coord_xy": self.lambda_coord * coord_xy / n,
            "coord_wh": self.lambda_coord * coord_wh / n,
            "obj": obj / n,
            "noobj": self.lambda_noobj * noobj / n,
            "cls": cls / n,
        }
        terms["total"] = sum(terms.values(), torch.zeros((), dtype=dtype, device=outputs.device))
        return terms
