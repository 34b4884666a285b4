"""The YOLOv3 family: anchor slots on three grids, one responsible slot per object, objectness + C sigmoids.

Candidates: every (scale, anchor, row, column) slot, scale by scale (coarsest first), then
anchor, row, column (the order of ``postprocess.yolov3.decode_yolov3``). Roles:
``onestage.assign.yolov3.assign_yolov3``: the responsible slot of each object, IGNORE where a
negative gets no objectness loss, BACKGROUND elsewhere.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from onestage.assign.ssd import BACKGROUND, IGNORE
from onestage.assign.yolov3 import AssignMode, IgnoreBy, assign_yolov3, assignable
from onestage.boxes import cxcywh_to_xyxy, xyxy_to_cxcywh
from onestage.coders import yolov3_decode_boxes
from onestage.families import Assignment, LayoutRow, positives_per_object
from onestage.postprocess.yolov3 import YOLOv3PostProcessor


@dataclass
class YOLOv3Family:
    anchors: list[Tensor]  # [(A_s, 2)] w, h normalized, coarsest first
    grid_sizes: list[tuple[int, int]]  # [(H_s, W_s)], same order
    rows: list[LayoutRow]
    post: YOLOv3PostProcessor
    assign_mode: AssignMode = "global"
    ignore_by: IgnoreBy = "prediction"
    ignore_thres: float = 0.5

    name = "yolov3"
    scoring = "sigmoid objectness + C independent class sigmoids"
    background_is_a_class = False

    def layout(self) -> list[LayoutRow]:
        return self.rows

    def candidate_boxes(self) -> Tensor:
        """(N, 4) xyxy normalized: each slot's anchor centred on its cell."""
        boxes = []
        for anc, (h, w) in zip(self.anchors, self.grid_sizes):
            ys, xs = torch.meshgrid(torch.arange(h) + 0.5, torch.arange(w) + 0.5, indexing="ij")  # (H, W)
            centres = torch.stack((xs / w, ys / h), dim=-1).expand(len(anc), h, w, 2)  # (A, H, W, 2)
            sizes = anc.float().view(-1, 1, 1, 2).expand(-1, h, w, 2)
            boxes.append(cxcywh_to_xyxy(torch.cat((centres, sizes), dim=-1)).reshape(-1, 4))
        return torch.cat(boxes)

    @torch.no_grad()
    def assign(self, gt_boxes: Tensor, gt_labels: Tensor, outputs: Sequence[Tensor] | None = None) -> Assignment:
        """Roles per slot. Ignoring by prediction needs ``outputs``; without them no negative is
        ignored (extras["ignore_rule"] says which rule was applied).

        extras["lost"]: (B, M) int64, the responsible slots an object was meant to own but lost
        to a LATER object on the same (cell, anchor) (Darknet overwrites); extras["targets"]:
        the per-scale ``YoloTargets`` the loss trains on.
        """
        pred_boxes = None
        if self.ignore_by == "anchor":
            rule = f"anchor shape IoU > {self.ignore_thres}"
        elif outputs is not None:
            pred_boxes = [yolov3_decode_boxes(o.detach(), a) for o, a in zip(outputs, self.anchors)]
            rule = f"prediction IoU > {self.ignore_thres}"
        else:  # empty predicted boxes overlap nothing: no negative is ignored
            pred_boxes = [gt_boxes.new_zeros(gt_boxes.shape[0], len(a), h, w, 4) for a, (h, w) in zip(self.anchors, self.grid_sizes)]
            rule = "none (ignoring by prediction needs the model's outputs)"
        targets = assign_yolov3(
            gt_boxes, gt_labels, self.anchors, self.grid_sizes, mode=self.assign_mode, ignore_by=self.ignore_by,
            ignore_thres=self.ignore_thres, pred_boxes=pred_boxes,
        )
        batch = gt_boxes.shape[0]
        roles = torch.cat([
            torch.where(t.obj_mask, t.gt_index, torch.where(t.ignore_mask, IGNORE, BACKGROUND)).reshape(batch, -1)
            for t in targets
        ], dim=1)  # (B, N)
        valid = assignable(xyxy_to_cxcywh(gt_boxes.float()), gt_labels)  # the objects assign_yolov3 assigns
        intended = valid.long() * (1 if self.assign_mode == "global" else len(self.anchors))
        lost = intended - positives_per_object(roles, gt_labels.shape[1])
        return Assignment(roles=roles, valid=valid, extras={"lost": lost, "ignore_rule": rule, "targets": targets})

    def decode(self, outputs: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        return self.post.decode(outputs)
