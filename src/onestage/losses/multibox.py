"""The SSD multibox loss with hard negative mining (DESIGN.md section 3, seed 002).

L = (L_conf + alpha * L_loc) / N, N = number of positives (at least 1), per batch or per image.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from onestage.assign.ssd import BACKGROUND, match_ssd
from onestage.boxes import paired_giou
from onestage.coders import ssd_decode, ssd_encode
from onestage.config import LossConfig, MatcherConfig
from onestage.losses.functional import smooth_l1, weighted_terms


def hard_negative_mask(neg_loss: Tensor, candidates: Tensor, num_pos: Tensor, ratio: float) -> Tensor:
    """Per image, the ``ratio * num_pos`` background priors with the highest loss.

    neg_loss: (B, P) classification loss per prior (detached); candidates: (B, P) bool,
    the background priors (never the ignored ones); num_pos: (B,) positives per image.
    Returns (B, P) bool. One top-k over the batch (k = the largest quota), no loop over
    images and no full sort: the quota is a few hundred out of thousands of priors.
    """
    num_neg = torch.minimum((num_pos.float() * ratio).long(), candidates.sum(dim=1))  # (B,)
    mask = torch.zeros_like(candidates)
    k = int(num_neg.max()) if num_neg.numel() else 0
    if k == 0:
        return mask
    ranked = neg_loss.masked_fill(~candidates, -torch.inf)
    top = ranked.topk(k, dim=1).indices  # (B, k), highest loss first
    within_quota = torch.arange(k, device=neg_loss.device)[None] < num_neg[:, None]  # (B, k)
    return mask.scatter_(1, top, within_quota)


class MultiboxLoss(nn.Module):
    """Criterion for SSD outputs (docs/contracts.md).

    forward(outputs, gt_boxes (B, M, 4) xyxy normalized, gt_labels (B, M) in [0, C), -1 pad)
    -> {"loc", "cls", "total"} scalars, plus "num_pos" (not differentiable, for logging).
    ``force_fp32(op_name)`` is the precision predicate (``should_force_fp32`` bound to the
    run's precision config); without one, everything runs in fp32.

    ``positives_normalizer``: under DDP (``normalize="batch"`` only), maps this process's
    positive count (a float scalar) to the N its sums are divided by, so that the loss and its
    gradients do not depend on how the global batch is split over processes
    (``distributed.positives_across_ranks``: the global count / the number of processes,
    because DDP averages gradients). None: the local count, clamped to >= 1 (one process).
    ``normalize="image"`` needs nothing: a mean over images is already split-invariant when
    every process has the same batch size.
    """

    def __init__(
        self,
        priors: Tensor,
        matcher: MatcherConfig | None = None,
        loss: LossConfig | None = None,
        variances: tuple[float, float] = (0.1, 0.2),
        force_fp32: Callable[[str], bool] | None = None,
        positives_normalizer: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.register_buffer("priors", priors, persistent=False)  # (P, 4) cxcywh normalized
        self.matcher = matcher or MatcherConfig()
        self.cfg = loss or LossConfig()
        self.variances = variances  # the box encoding (coders.ssd_encode)
        self.force_fp32 = force_fp32 or (lambda op: True)
        self.positives_normalizer = positives_normalizer

    def assign(self, gt_boxes: Tensor, gt_labels: Tensor) -> Tensor:
        """(B, P) matched ground-truth index, BACKGROUND or IGNORE."""
        iou_dtype = torch.float32 if self.force_fp32("iou") else torch.bfloat16
        return match_ssd(gt_boxes, gt_labels, self.priors, self.matcher.pos_iou, self.matcher.neg_iou, iou_dtype)

    def forward(self, outputs: dict[str, Tensor], gt_boxes: Tensor, gt_labels: Tensor) -> dict[str, Tensor]:
        cls_logits, loc = outputs["cls"], outputs["loc"]  # (B, P, C+1), (B, P, 4)
        matched = self.assign(gt_boxes, gt_labels)  # (B, P)
        pos = matched >= 0
        safe = matched.clamp(min=0)
        with torch.no_grad():
            target_labels = torch.where(pos, gt_labels.gather(1, safe) + 1, 0)  # 0 = background
            target_boxes = gt_boxes.gather(1, safe[..., None].expand(-1, -1, 4))  # (B, P, 4) xyxy

        if self.force_fp32("loss_reduction"):
            cls_logits, loc = cls_logits.float(), loc.float()
        batch, num_priors, num_classes = cls_logits.shape
        ce = F.cross_entropy(cls_logits.reshape(-1, num_classes), target_labels.reshape(-1), reduction="none")
        ce = ce.view(batch, num_priors)  # (B, P)
        num_pos = pos.sum(dim=1)  # (B,)
        hard_neg = hard_negative_mask(ce.detach(), matched == BACKGROUND, num_pos, self.cfg.neg_pos_ratio)

        if self.cfg.box_loss == "giou":
            # decoded in fp32 (ssd_decode), whatever the autocast dtype of the offsets
            loc_per_prior = 1.0 - paired_giou(ssd_decode(loc, self.priors, self.variances), target_boxes)  # (B, P)
        else:
            target_loc = ssd_encode(target_boxes, self.priors, self.variances)  # (B, P, 4), no grad: targets
            loc_per_prior = smooth_l1(loc, target_loc.to(loc.dtype), self.cfg.beta, reduction="none")  # (B, P)
        loc_per_image = (loc_per_prior * pos).sum(dim=1)  # (B,)
        cls_per_image = (ce * (pos | hard_neg)).sum(dim=1)  # (B,)

        if self.cfg.normalize == "batch":
            if self.positives_normalizer is None:
                n = num_pos.sum().clamp(min=1).to(ce.dtype)
            else:
                n = self.positives_normalizer(num_pos.sum().to(ce.dtype))
            loc_loss, cls_loss = loc_per_image.sum() / n, cls_per_image.sum() / n
        else:
            n = num_pos.clamp(min=1).to(ce.dtype)
            loc_loss, cls_loss = (loc_per_image / n).mean(), (cls_per_image / n).mean()
        terms = weighted_terms({"loc": loc_loss, "cls": cls_loss}, self.weights)
        terms["num_pos"] = num_pos.sum().detach().float()
        return terms

    @property
    def weights(self) -> dict[str, float]:
        """L = (L_conf + alpha L_loc) / N (SSD paper eq. 1)."""
        return {"loc": self.cfg.alpha, "cls": 1.0}
