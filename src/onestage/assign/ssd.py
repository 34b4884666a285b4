"""SSD target assignment: IoU matching with an ignore band (DESIGN.md section 3).

The output is tiny: per prior, the index of its ground truth (>= 0), ``BACKGROUND`` (-1)
or ``IGNORE`` (-2). Encoding the targets and the loss are separate steps.

Rules, on a whole padded batch at once:
1. Each prior takes its best ground truth: positive when IoU >= ``pos_iou``, background
   when IoU < ``neg_iou``, ignored in between (no loss at all).
2. Every ground truth is then forced onto its best prior, even below ``pos_iou``, so that
   each object has at least one positive (SSD paper section 2.2, "matching strategy").
3. Two objects with the same best prior: the one with the higher IoU keeps it, the other
   takes its best prior that is still free; repeated until no conflict is left.
4. Ties go to the lowest index (``torch.max`` returns the first maximum), so the result
   does not depend on the device or on float summation order.
With ``pos_iou == neg_iou`` this is classic SSD matching (nothing ignored).
"""

from __future__ import annotations

import torch
from torch import Tensor

from onestage.boxes import box_iou, cxcywh_to_xyxy

BACKGROUND = -1
IGNORE = -2


@torch.no_grad()
def match_ssd(
    gt_boxes: Tensor,
    gt_labels: Tensor,
    priors: Tensor,
    pos_iou: float = 0.5,
    neg_iou: float = 0.4,
    iou_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Assign every prior of every image.

    gt_boxes: (B, M, 4) xyxy normalized, padded; gt_labels: (B, M) int64, -1 on padding.
    priors: (P, 4) cxcywh normalized. Returns (B, P) int64: ground-truth index in [0, M),
    ``BACKGROUND`` or ``IGNORE``.
    """
    if neg_iou > pos_iou:
        raise ValueError(f"neg_iou ({neg_iou}) must be <= pos_iou ({pos_iou})")
    batch, num_gt = gt_labels.shape
    num_priors = priors.shape[0]
    device = priors.device
    matched = torch.full((batch, num_priors), BACKGROUND, dtype=torch.int64, device=device)
    if num_gt == 0:
        return matched

    valid = gt_labels >= 0  # (B, M)
    iou = box_iou(gt_boxes, cxcywh_to_xyxy(priors)[None], dtype=iou_dtype)  # (B, M, P)
    iou = iou.float().masked_fill(~valid[..., None], -1.0)

    # 1. Each prior's best ground truth and the three-way split.
    best_gt_iou, best_gt = iou.max(dim=1)  # (B, P)
    matched = torch.where(best_gt_iou >= pos_iou, best_gt, matched)
    matched = torch.where((best_gt_iou >= neg_iou) & (best_gt_iou < pos_iou), IGNORE, matched)

    # 2-3. Force each object onto its best free prior.
    forced_prior = _resolve_forced_priors(iou, valid)  # (B, M), -1 where none
    b_idx, g_idx = (forced_prior >= 0).nonzero(as_tuple=True)
    matched[b_idx, forced_prior[b_idx, g_idx]] = g_idx
    return matched


def _resolve_forced_priors(iou: Tensor, valid: Tensor) -> Tensor:
    """(B, M) the prior each valid ground truth is forced onto, -1 for padding.

    Each round, every unresolved object proposes its best prior not yet taken; among the
    objects proposing the same prior, the one with the highest IoU (then the lowest index)
    wins it. Losers propose again next round. Every round settles at least one object per
    contested prior, so there are at most M rounds; in practice one or two. The loop is
    over rounds, each round vectorized over the whole batch.
    """
    batch, num_gt, num_priors = iou.shape
    device = iou.device
    forced = torch.full((batch, num_gt), -1, dtype=torch.int64, device=device)
    # An object that overlaps no prior at all (a degenerate box) has nothing to be forced onto.
    pending = valid & (iou.amax(dim=2) > 0)
    taken = torch.zeros(batch, num_priors, dtype=torch.bool, device=device)
    gt_order = torch.arange(num_gt, device=device).expand(batch, num_gt)
    for _ in range(num_gt):
        if not pending.any():
            break
        free_iou = iou.masked_fill(taken[:, None, :], -1.0)
        cand_iou, cand = free_iou.max(dim=2)  # (B, M)
        pending &= cand_iou > 0  # every overlapping prior is taken: nothing left to force onto
        # Priority: higher IoU first, lower ground-truth index on ties (a stable sort).
        order = torch.sort(torch.where(pending, -cand_iou, torch.inf), dim=1, stable=True).indices
        rank = torch.empty_like(order).scatter_(1, order, gt_order)  # (B, M) position in priority order
        best_rank = torch.full((batch, num_priors), num_gt, dtype=torch.int64, device=device)
        best_rank.scatter_reduce_(1, cand, torch.where(pending, rank, num_gt), reduce="amin")
        wins = pending & (rank == best_rank.gather(1, cand))
        forced = torch.where(wins, cand, forced)
        # amax, not a plain scatter: a loser proposing the same prior must not unset it.
        won = torch.zeros(batch, num_priors, dtype=torch.int64, device=device)
        taken |= won.scatter_reduce_(1, cand, wins.long(), reduce="amax").bool()
        pending &= ~wins
    return forced
