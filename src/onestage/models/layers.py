"""Small building blocks shared by the backbones and the SSD heads.

``conv_bn_act`` reproduces the module layout of torchvision's ``Conv2dNormActivation``
(index 0 = conv, 1 = BatchNorm, 2 = activation) so that a model built from it keeps
torchvision's ``state_dict`` keys (``features.0.0.weight``, ``features.0.1.running_mean``).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ActFactory = Callable[..., nn.Module]


def conv_bn_act(
    in_ch: int,
    out_ch: int,
    kernel: int,
    stride: int = 1,
    padding: int = 0,
    groups: int = 1,
    act: ActFactory | None = nn.ReLU6,
) -> nn.Sequential:
    """Conv (no bias: the BatchNorm shift replaces it) -> BatchNorm -> activation.

    (B, in_ch, H, W) -> (B, out_ch, H', W'). ``act=None`` leaves the activation out (the
    linear bottleneck of MobileNetV2, section 3.2). BatchNorm keeps PyTorch's defaults
    (eps 1e-5, momentum 0.1), as torchvision's MobileNetV2 does.
    """
    layers: list[nn.Module] = [
        nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=padding, groups=groups, bias=False),
        nn.BatchNorm2d(out_ch),
    ]
    if act is not None:
        layers.append(act(inplace=True))
    return nn.Sequential(*layers)


def depthwise_separable(in_ch: int, out_ch: int, stride: int, padding: int) -> nn.Sequential:
    """SSDLite's replacement for a 3x3 conv (MobileNetV2 paper, section 6.2).

    Depthwise 3x3 (one filter per channel) + BN + ReLU6, then pointwise 1x1 + BN + ReLU6:
    (B, in_ch, H, W) -> (B, out_ch, H', W') with H' = (H + 2 padding - 3) // stride + 1.
    Layout as torchvision's ``_extra_block`` in ``ssdlite.py``.
    """
    return nn.Sequential(
        conv_bn_act(in_ch, in_ch, 3, stride=stride, padding=padding, groups=in_ch),
        conv_bn_act(in_ch, out_ch, 1),
    )


class L2Norm(nn.Module):
    """Per-location L2 normalization with a learned per-channel scale.

    SSD paper, section 3.1 (after ParseNet, Liu et al. 2015): conv4_3 has a much larger
    feature scale than the deeper layers, so each location's channel vector is scaled to
    unit L2 norm and then multiplied by a learned scale per channel, initialised to 20.

    (B, C, H, W) -> (B, C, H, W). The norm is taken in fp32 even under autocast: a sum of
    512 squares in bf16 loses about 3 significant digits.
    """

    def __init__(self, channels: int, scale: float = 20.0, eps: float = 1e-10) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.full((channels,), float(scale)))

    def forward(self, x: Tensor) -> Tensor:
        normalized = F.normalize(x.float(), p=2.0, dim=1, eps=self.eps)
        return (normalized * self.weight.float().view(1, -1, 1, 1)).to(x.dtype)


def probe(module: nn.Module, size: int, forward: Callable[[Tensor], Any] | None = None) -> Any:
    """``forward`` (default: the module itself) on one zero (1, 3, size, size) image, on the
    module's device and dtype, without gradients and in eval mode so that BatchNorm
    statistics stay untouched; the module's mode is restored afterwards. Measures the map
    sizes a stack of layers gives, instead of restating its arithmetic."""
    param = next(module.parameters())
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            return (forward or module)(torch.zeros(1, 3, size, size, device=param.device, dtype=param.dtype))
    finally:
        module.train(was_training)
