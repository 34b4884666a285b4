"""YOLOv3 neck + head and the detector module.

Redmon and Farhadi, "YOLOv3: An Incremental Improvement" (2018), section 2.3 ("Predictions
Across Scales"), layer by layer as Darknet's ``cfg/yolov3.cfg`` (layers 75-106):
- at the coarsest map (stride 32) a block of five convs, 1x1 / 3x3 / 1x1 / 3x3 / 1x1 with
  512 / 1024 / 512 / 1024 / 512 channels, then a 3x3 conv (1024) and the 1x1 predictor;
- the five-conv block's output goes through a 1x1 conv (256), is upsampled x2 (nearest)
  and concatenated with the stride-16 backbone map; again five convs (256 / 512), a 3x3
  conv and a predictor; the same once more down to stride 8 (128 / 256);
- every conv but the predictor is conv -> BatchNorm -> LeakyReLU(0.1); the predictor is a
  plain 1x1 conv with bias and ``A * (5 + C)`` channels.

Contracts (docs/contracts.md):
- ``YOLOv3Head(features: list[(B, C_i, H_i, W_i)] finest first) -> list[(B, A_s, H_s, W_s, 5 + C)]``
  COARSEST first (stride 32, 16, 8), last dim (tx, ty, tw, th, obj, class logits...).
  Predictor channel ``a * (5 + C) + k`` becomes ``[:, a, :, :, k]`` (Darknet's entry order).
- ``YOLOv3(images (B, 3, H, W)) -> list[Tensor]``: those raw outputs, identical in train
  and eval mode; anchors, decoding, assignment and loss live elsewhere.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from onestage.models.backbones.darknet53 import darknet_conv, scale_channels

# Channels of the five-conv block at the coarsest scale (yolov3.cfg layer 75); each finer
# scale halves them (256 at stride 16, 128 at stride 8).
COARSEST_NECK_CHANNELS = 512
# Objectness prior as YOLOv5 (``Detect._initialize_biases``): about 8 objects per 640x640
# image, spread over the (640 / s)^2 cells of a stride-s map.
OBJECTS_PER_IMAGE = 8.0
PRIOR_IMAGE_SIZE = 640.0


def objectness_prior(stride: int) -> float:
    """Prior probability that one (cell, anchor) holds an object: 8 / (640 / stride)^2.

    0.00125 at stride 8, 0.005 at 16, 0.02 at 32. Why not 0.5 (a zero bias): a 416 input has
    10647 candidates and a few positives; at sigmoid(0) = 0.5 every negative costs
    BCE = log 2, so the first objectness loss is ~7400 per image and its gradient swamps the
    box and class terms, pushing all objectness down in the first steps (the same argument
    as RetinaNet's prior pi = 0.01, Lin et al. 2017, section 4.1).
    """
    return min(OBJECTS_PER_IMAGE / (PRIOR_IMAGE_SIZE / stride) ** 2, 0.5)


def five_conv_block(in_ch: int, mid: int) -> nn.Sequential:
    """1x1 mid, 3x3 2mid, 1x1 mid, 3x3 2mid, 1x1 mid (yolov3.cfg layers 75-79).

    (B, in_ch, H, W) -> (B, mid, H, W).
    """
    return nn.Sequential(
        darknet_conv(in_ch, mid, 1),
        darknet_conv(mid, 2 * mid, 3),
        darknet_conv(2 * mid, mid, 1),
        darknet_conv(mid, 2 * mid, 3),
        darknet_conv(2 * mid, mid, 1),
    )


class YOLOv3Head(nn.Module):
    """The FPN-like neck and one predictor per scale (see the module docstring).

    in_channels: backbone channels, FINEST first (the backbone contract), e.g. [256, 512, 1024].
    num_anchors: anchors per scale, COARSEST first (the order of the outputs and of
        ``AnchorsConfig.sizes``), e.g. [3, 3, 3]; an int means the same for every scale.
    num_classes: C, foreground classes (no background: YOLO scores objectness separately).
    width: multiplier on the neck channels (512 / 256 / 128 at 1.0).
    strides: the backbone's strides, finest first; only used for the objectness prior.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        num_anchors: Sequence[int] | int,
        num_classes: int,
        width: float = 1.0,
        strides: Sequence[int] = (8, 16, 32),
    ) -> None:
        super().__init__()
        levels = len(in_channels)
        if levels < 1:
            raise ValueError("in_channels must list at least one backbone map")
        anchors = [int(num_anchors)] * levels if isinstance(num_anchors, int) else [int(a) for a in num_anchors]
        if len(anchors) != levels or any(a < 1 for a in anchors):
            raise ValueError(f"num_anchors must give one positive count per scale ({levels}), got {num_anchors}")
        if len(strides) != levels:
            raise ValueError(f"strides must give one stride per backbone map ({levels}), got {list(strides)}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.in_channels = [int(c) for c in in_channels]  # finest first, as the backbone's
        self.num_anchors = anchors  # coarsest first
        self.strides = [int(s) for s in reversed(strides)]  # coarsest first
        backbone_ch = list(reversed([int(c) for c in in_channels]))  # coarsest first
        mids = [scale_channels(COARSEST_NECK_CHANNELS // 2**k, width) for k in range(levels)]

        self.laterals = nn.ModuleList()  # laterals[k - 1]: 1x1 from scale k-1's block to scale k
        self.blocks = nn.ModuleList()
        self.predictors = nn.ModuleList()
        for k in range(levels):
            lateral_ch = 0
            if k > 0:
                self.laterals.append(darknet_conv(mids[k - 1], mids[k], 1))
                lateral_ch = mids[k]
            self.blocks.append(five_conv_block(backbone_ch[k] + lateral_ch, mids[k]))
            self.predictors.append(
                nn.Sequential(
                    darknet_conv(mids[k], 2 * mids[k], 3),
                    nn.Conv2d(2 * mids[k], anchors[k] * (5 + num_classes), 1, bias=True),
                )
            )
        self._init_predictor_biases()

    def _init_predictor_biases(self) -> None:
        # Box offsets and class logits start at 0; objectness at logit(prior) (objectness_prior).
        for conv, num_a, stride in zip(self._final_convs(), self.num_anchors, self.strides):
            with torch.no_grad():
                bias = conv.bias.view(num_a, 5 + self.num_classes)
                bias.zero_()
                p = objectness_prior(stride)
                bias[:, 4] = math.log(p / (1.0 - p))

    def _final_convs(self) -> list[nn.Conv2d]:
        return [predictor[-1] for predictor in self.predictors]

    def forward(self, features: list[Tensor]) -> list[Tensor]:
        """features finest first -> [(B, A_s, H_s, W_s, 5 + C)] coarsest first."""
        if len(features) != len(self.blocks):
            raise ValueError(f"expected {len(self.blocks)} feature maps, got {len(features)}")
        maps = features[::-1]  # coarsest first
        outputs: list[Tensor] = []
        route: Tensor | None = None
        for k, x in enumerate(maps):
            if route is not None:
                # Upsample to the finer map's exact size (not a fixed x2): an input that is
                # not a multiple of 32 gives e.g. 13 -> 7 -> 4, and 4 x 2 = 8 != 7.
                up = F.interpolate(self.laterals[k - 1](route), size=x.shape[-2:], mode="nearest")
                x = torch.cat((up, x), dim=1)  # yolov3.cfg [route] layers = -1, 61: upsampled first
            route = self.blocks[k](x)
            raw = self.predictors[k](route)  # (B, A*(5+C), H, W)
            b, _, h, w = raw.shape
            out = raw.view(b, self.num_anchors[k], 5 + self.num_classes, h, w).permute(0, 1, 3, 4, 2)
            outputs.append(out.contiguous())  # (B, A, H, W, 5 + C)
        return outputs


class YOLOv3(nn.Module):
    """Backbone + YOLOv3 head. forward: (B, 3, H, W) -> [(B, A_s, H_s, W_s, 5 + C)] coarsest first.

    Works with any backbone following the contract (``out_channels``, ``strides`` finest
    first); the head's ``in_channels`` must match the backbone's ``out_channels``.
    """

    def __init__(self, backbone: nn.Module, head: YOLOv3Head) -> None:
        super().__init__()
        if list(backbone.out_channels) != head.in_channels:
            raise ValueError(
                f"the backbone's out_channels {list(backbone.out_channels)} do not match the head's "
                f"in_channels {head.in_channels} (both finest first)"
            )
        self.backbone = backbone
        self.head = head

    @property
    def strides(self) -> list[int]:
        """Input pixels per output cell, coarsest first (the order of the outputs)."""
        return list(reversed(self.backbone.strides))

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    def forward(self, images: Tensor) -> list[Tensor]:
        return self.head(self.backbone(images))
