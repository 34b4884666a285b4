"""Encode/decode pairs: what the network regresses, relative to its priors or anchors.

Each coder is a matched pair with a round-trip test (tests/test_coders.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

from onestage.boxes import cxcywh_to_xyxy, xyxy_to_cxcywh

# exp() of a large regression output overflows fp32 (exp(89) = inf); clamping t_w, t_h at
# log(1000/16) as torchvision's BoxCoder does keeps a wild early prediction finite.
_MAX_LOG_SCALE = 4.135166556742356


def ssd_encode(boxes: Tensor, priors: Tensor, variances: tuple[float, float] = (0.1, 0.2)) -> Tensor:
    """SSD paper eq. 2 with the reference variances.

    boxes: (..., P, 4) xyxy normalized ground truth matched to each prior.
    priors: (P, 4) cxcywh normalized. Returns (..., P, 4) offsets (t_cx, t_cy, t_w, t_h):
    t_cx = (g_cx - p_cx) / (v0 p_w), t_w = log(g_w / p_w) / v1.
    """
    g = xyxy_to_cxcywh(boxes.float())
    p = priors.float()
    t_xy = (g[..., :2] - p[..., :2]) / (variances[0] * p[..., 2:])
    # A degenerate matched box (zero width) would give log(0) = -inf; such boxes are
    # dropped by the data layer, and the clamp keeps the loss finite if one slips through.
    t_wh = torch.log(g[..., 2:].clamp(min=1e-8) / p[..., 2:]) / variances[1]
    return torch.cat((t_xy, t_wh), dim=-1)


def ssd_decode(offsets: Tensor, priors: Tensor, variances: tuple[float, float] = (0.1, 0.2)) -> Tensor:
    """Exact inverse of :func:`ssd_encode`: (..., P, 4) offsets -> (..., P, 4) xyxy normalized."""
    t = offsets.float()
    p = priors.float()
    cxcy = p[..., :2] + t[..., :2] * variances[0] * p[..., 2:]
    wh = p[..., 2:] * torch.exp((t[..., 2:] * variances[1]).clamp(max=_MAX_LOG_SCALE))
    return cxcywh_to_xyxy(torch.cat((cxcy, wh), dim=-1))
