"""The YOLOv1 family: S x S cells with B predictors each, one responsible predictor per object.

Candidates: the S*S*B predictors, row-major over cells, the B predictors of a cell together
(``postprocess.yolov1.decode_yolov1``'s order). Roles: the cell holding an object's centre is
responsible (``assign.yolov1.build_yolov1_targets``: the largest object of a cell wins it),
and within it the predictor whose predicted box overlaps the object most
(``losses.yolov1.responsible_predictors``). Every other predictor is background (the paper's
1_ij^noobj); nothing is ignored.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from onestage.assign.ssd import BACKGROUND
from onestage.assign.yolov1 import build_yolov1_targets
from onestage.families import Assignment, LayoutRow, positives_per_object
from onestage.coders import yolov1_activate
from onestage.losses.yolov1 import predictor_ious, predictor_rmse, responsible_predictors
from onestage.postprocess.yolov1 import YOLOv1PostProcessor


@dataclass
class YOLOv1Family:
    S: int
    B: int
    num_classes: int
    rows: list[LayoutRow]
    post: YOLOv1PostProcessor

    name = "yolov1"
    scoring = "sigmoid confidence per box x softmax class probability per cell"
    background_is_a_class = False

    def layout(self) -> list[LayoutRow]:
        return self.rows

    def candidate_boxes(self) -> Tensor:
        """(S*S*B, 4) xyxy normalized: each predictor's cell (YOLOv1 has no anchors)."""
        edges = torch.arange(self.S + 1, dtype=torch.float32) / self.S
        y1, x1 = torch.meshgrid(edges[:-1], edges[:-1], indexing="ij")  # (S, S)
        cells = torch.stack((x1, y1, x1 + 1 / self.S, y1 + 1 / self.S), dim=-1)  # (S, S, 4)
        return cells[:, :, None].expand(-1, -1, self.B, -1).reshape(-1, 4)

    @torch.no_grad()
    def assign(self, gt_boxes: Tensor, gt_labels: Tensor, outputs: Tensor | None = None) -> Assignment:
        """Roles per predictor. The responsible predictor needs ``outputs`` (the highest IoU of
        its predicted box); without them every IoU is 0 and the tie rule gives predictor 0.

        extras["responsible"]: (B, S, S, B) bool, the paper's 1_ij^obj; extras["lost"]: (B, M)
        int64, 1 for an object whose cell went to a larger object.
        """
        targets = build_yolov1_targets(gt_boxes, gt_labels, self.S, self.num_classes)
        rmse = None
        if outputs is None:
            iou = torch.zeros(*targets.obj.shape, self.B, device=gt_boxes.device)
        else:
            # The darknet preset (linear outputs) breaks zero-IoU ties by RMSE, as its loss does.
            pred = yolov1_activate(outputs.float(), self.B, self.num_classes, linear=self.post.linear)
            iou = predictor_ious(pred, targets)
            rmse = predictor_rmse(pred, targets) if self.post.linear else None
        resp = responsible_predictors(iou, targets.obj, rmse)  # (B, S, S, B)
        owner = targets.gt_index[..., None].expand_as(resp)  # (B, S, S, B)
        roles = torch.where(resp, owner, BACKGROUND).reshape(gt_boxes.shape[0], -1)  # (B, S*S*B)
        valid = gt_labels >= 0
        lost = valid.long() - positives_per_object(roles, gt_labels.shape[1])
        return Assignment(roles=roles, valid=valid, extras={"responsible": resp, "lost": lost, "targets": targets})

    def decode(self, outputs: Tensor) -> tuple[Tensor, Tensor]:
        return self.post.decode(outputs)
