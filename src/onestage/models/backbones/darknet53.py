"""Darknet-53, the YOLOv3 backbone, returning the stride 8, 16 and 32 maps.

Redmon and Farhadi, "YOLOv3: An Incremental Improvement" (2018), section 2.4 and Table 1;
layer by layer as Darknet's ``cfg/yolov3.cfg`` (layers 0-74):
- every conv is conv (no bias) -> BatchNorm -> LeakyReLU(0.1), ``pad = size // 2``;
- a stem 3x3 conv with 32 channels, then five stages; each stage starts with a 3x3
  stride-2 conv that doubles the channels (32 -> 64 -> 128 -> 256 -> 512 -> 1024) and
  repeats a residual block 1, 2, 8, 8, 4 times;
- a residual block is 1x1 conv to c/2, 3x3 conv back to c, plus the identity (Darknet's
  ``[shortcut] activation=linear``: no activation after the sum).

Outputs (finest first), at input 416 and width 1.0:
- end of stage 3: 256 ch, stride 8,  52x52
- end of stage 4: 512 ch, stride 16, 26x26
- end of stage 5: 1024 ch, stride 32, 13x13
(a 3x3 stride-2 conv with padding 1 maps H to ceil(H / 2)).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

from torch import Tensor, nn

from onestage.models.backbones.base import Backbone, BackboneWeightsError, StateDictSource, init_conv_bn
from onestage.models.layers import ActFactory, conv_bn_act

STEM_CHANNELS = 32
# Residual blocks per stage: paper, Table 1 ("1x, 2x, 8x, 8x, 4x").
STAGE_BLOCKS: tuple[int, ...] = (1, 2, 8, 8, 4)
# Indices into ``features`` (0 = stem, 1..5 = stages) whose outputs are returned.
OUTPUT_INDICES: tuple[int, ...] = (3, 4, 5)
LEAKY_SLOPE = 0.1  # Darknet's "leaky" activation

leaky_relu: ActFactory = functools.partial(nn.LeakyReLU, LEAKY_SLOPE)


def scale_channels(channels: int, width_mult: float, divisor: int = 8) -> int:
    """``channels * width_mult`` rounded to the nearest multiple of ``divisor`` (at least ``divisor``).

    Multiples of 8 keep the convolutions on the fast paths of oneDNN and cuDNN; with
    ``width_mult = 1`` every Darknet channel count (32 .. 1024) is returned unchanged.
    """
    if width_mult <= 0:
        raise ValueError(f"width_mult must be > 0, got {width_mult}")
    return max(divisor, int(channels * width_mult + divisor / 2) // divisor * divisor)


def darknet_conv(in_ch: int, out_ch: int, kernel: int, stride: int = 1) -> nn.Sequential:
    """Darknet's ``[convolutional] batch_normalize=1 activation=leaky``, pad = kernel // 2.

    (B, in_ch, H, W) -> (B, out_ch, ceil(H / stride), ceil(W / stride)).
    """
    return conv_bn_act(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, act=leaky_relu)


class DarknetResidual(nn.Module):
    """1x1 conv to ``channels // 2``, 3x3 conv back to ``channels``, plus the input.

    (B, C, H, W) -> (B, C, H, W). Darknet's shortcut is linear: no activation after the sum.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        hidden = channels // 2
        self.conv = nn.Sequential(darknet_conv(channels, hidden, 1), darknet_conv(hidden, channels, 3))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv(x)


def darknet_stage(in_ch: int, out_ch: int, blocks: int) -> nn.Sequential:
    """A 3x3 stride-2 conv from ``in_ch`` to ``out_ch`` then ``blocks`` residual blocks.

    (B, in_ch, H, W) -> (B, out_ch, ceil(H / 2), ceil(W / 2)).
    """
    return nn.Sequential(darknet_conv(in_ch, out_ch, 3, stride=2), *[DarknetResidual(out_ch) for _ in range(blocks)])


class Darknet53Backbone(Backbone):
    """Darknet-53 without its classifier (avgpool + connected layer); see the module docstring.

    ``width_mult`` scales every layer's channels (``scale_channels``); ``blocks`` gives the
    residual blocks per stage (the paper's 1, 2, 8, 8, 4 by default; smaller tuples give a
    lighter network with the same strides, for CPU experiments).
    forward: (B, 3, H, W) -> [(B, 256w, H/8, W/8), (B, 512w, H/16, W/16), (B, 1024w, H/32, W/32)].
    """

    def __init__(self, width_mult: float = 1.0, blocks: Sequence[int] = STAGE_BLOCKS) -> None:
        super().__init__()
        if len(blocks) != len(STAGE_BLOCKS) or any(n < 0 for n in blocks):
            raise ValueError(
                f"blocks must give {len(STAGE_BLOCKS)} non-negative counts (one per stage), got {list(blocks)}"
            )
        self.width_mult = width_mult
        channels = [scale_channels(STEM_CHANNELS * 2**k, width_mult) for k in range(len(STAGE_BLOCKS) + 1)]
        layers: list[nn.Module] = [darknet_conv(3, channels[0], 3)]
        for k, n in enumerate(blocks):
            layers.append(darknet_stage(channels[k], channels[k + 1], n))
        self.features = nn.Sequential(*layers)
        self.out_channels = [channels[i] for i in OUTPUT_INDICES]
        self.strides = [2**i for i in OUTPUT_INDICES]  # stage k halves the resolution k times
        init_conv_bn(self, mode="fan_in", leaky_slope=LEAKY_SLOPE)

    def forward(self, x: Tensor) -> list[Tensor]:
        """(B, 3, H, W) -> the stride 8, 16, 32 maps, finest first."""
        outputs: list[Tensor] = []
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in OUTPUT_INDICES:
                outputs.append(x)
        return outputs

    def load_torchvision_weights(self, source: StateDictSource) -> None:
        """torchvision has no Darknet-53: ImageNet weights come from Darknet's own files."""
        raise BackboneWeightsError(
            "Darknet53Backbone has no torchvision counterpart; train from scratch or load a state_dict "
            "saved from this class with load_state_dict"
        )
