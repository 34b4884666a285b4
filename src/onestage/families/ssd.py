"""The SSD family (SSD300, MobileNetV2-SSD, SSDLite): priors, IoU matching, softmax over C+1.

Candidates: the priors (``onestage.priors``), map by map, row-major over cells, the boxes of a
cell together. Roles: ``onestage.assign.ssd.match_ssd`` (positive / background / ignored by
IoU, every object forced onto its best prior). With the model's outputs, the hard negatives
that mining selects under those predictions (``losses.multibox.hard_negative_mask``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from onestage.assign.ssd import BACKGROUND, match_ssd
from onestage.boxes import cxcywh_to_xyxy
from onestage.families import Assignment, LayoutRow
from onestage.losses.multibox import hard_negative_mask
from onestage.postprocess.ssd import decode_ssd


@dataclass
class SSDFamily:
    priors: Tensor  # (P, 4) cxcywh normalized
    rows: list[LayoutRow]
    variances: tuple[float, float] = (0.1, 0.2)
    pos_iou: float = 0.5
    neg_iou: float = 0.4
    neg_pos_ratio: float = 3.0
    iou_dtype: torch.dtype = torch.float32

    name = "ssd"
    scoring = "softmax over C+1 classes (background is class 0)"
    background_is_a_class = True

    def layout(self) -> list[LayoutRow]:
        return self.rows

    def candidate_boxes(self) -> Tensor:
        """(P, 4) xyxy normalized: the priors."""
        return cxcywh_to_xyxy(self.priors)

    @torch.no_grad()
    def assign(self, gt_boxes: Tensor, gt_labels: Tensor, outputs: dict[str, Tensor] | None = None) -> Assignment:
        """Roles per prior (``match_ssd``). extras["hard_negative"]: (B, P) bool, only with ``outputs``:
        the background priors that hard negative mining keeps under these predictions."""
        priors = self.priors.to(gt_boxes.device)
        roles = match_ssd(gt_boxes, gt_labels, priors, self.pos_iou, self.neg_iou, self.iou_dtype)  # (B, P)
        assignment = Assignment(roles=roles, valid=gt_labels >= 0)
        if outputs is not None:
            cls_logits = outputs["cls"].float()  # (B, P, C+1)
            target = torch.where(roles >= 0, gt_labels.gather(1, roles.clamp(min=0)) + 1, 0)  # 0 = background
            ce = F.cross_entropy(cls_logits.flatten(0, 1), target.flatten(), reduction="none").view_as(roles)
            num_pos = (roles >= 0).sum(dim=1)
            assignment.extras["hard_negative"] = hard_negative_mask(ce, roles == BACKGROUND, num_pos, self.neg_pos_ratio)
        return assignment

    def decode(self, outputs: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        return decode_ssd(outputs, self.priors, self.variances)
