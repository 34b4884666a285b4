"""MobileNetV2 feature extractor with torchvision's module tree and state_dict keys.

Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks" (CVPR 2018),
Table 2; layout, rounding and initialisation as torchvision's ``models/mobilenetv2.py`` so
that torchvision's ImageNet ``mobilenet_v2`` weights load key for key:
``features.0`` stem conv, ``features.1..17`` inverted residual blocks (``.conv``),
``features.18`` the 1x1 conv to 1280 channels.

Outputs for SSD (three maps, finest first), at input 300 and width 1.0:
- output of ``features[6]``:  32 ch, stride 8,  38x38
- output of ``features[13]``: 96 ch, stride 16, 19x19
- output of ``features[18]``: 1280 ch, stride 32, 10x10
"""

from __future__ import annotations

from torch import Tensor, nn

from onestage.models.backbones.base import Backbone, init_conv_bn
from onestage.models.layers import conv_bn_act

# (t expansion, c output channels, n repeats, s stride of the first repeat): paper, Table 2.
INVERTED_RESIDUAL_SETTING: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
STEM_CHANNELS = 32
LAST_CHANNELS = 1280
# Indices into ``features`` whose outputs are returned, and their strides.
OUTPUT_INDICES: tuple[int, ...] = (6, 13, 18)
OUTPUT_STRIDES: tuple[int, ...] = (8, 16, 32)
EXPANSION_TAPS: tuple[int, ...] = (7, 14)  # blocks whose 1x1 expansion output is tapped (stride 8, 16)


def make_divisible(value: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round a channel count to a multiple of ``divisor`` as torchvision's ``_make_divisible``.

    Round to nearest, never below ``min_value`` (default ``divisor``), and never more than
    10% below ``value`` (from the TensorFlow MobileNet reference, ``slim/nets/mobilenet``).
    """
    if min_value is None:
        min_value = divisor
    new_value = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if new_value < 0.9 * value:
        new_value += divisor
    return new_value


class InvertedResidual(nn.Module):
    """Expand 1x1 (ReLU6) -> depthwise 3x3 (ReLU6) -> project 1x1 (linear), residual if shapes allow.

    Paper section 3.3 and Table 1. (B, inp, H, W) -> (B, oup, H/stride, W/stride). Keys as
    torchvision: ``conv.0`` expand (absent when t = 1), then dw, then the project conv and BN.
    """

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        hidden = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(conv_bn_act(inp, hidden, 1))
        layers += [
            conv_bn_act(hidden, hidden, 3, stride=stride, padding=1, groups=hidden),
            nn.Conv2d(hidden, oup, 1, bias=False),
            nn.BatchNorm2d(oup),
        ]
        self.conv = nn.Sequential(*layers)
        self.out_channels = oup

    def forward(self, x: Tensor) -> Tensor:
        if self.use_res_connect:
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2Backbone(Backbone):
    """MobileNetV2 ``features`` (torchvision layout) returning the stride 8, 16, 32 maps.

    ``width_mult`` scales every layer's channels, rounded by ``make_divisible``; the last
    conv keeps 1280 channels for width_mult <= 1 (paper, section 5.1: "we do not apply the
    width multiplier to the last convolutional layer" for multipliers below one).
    """

    def __init__(self, width_mult: float = 1.0, taps: str = "blocks") -> None:
        super().__init__()
        if width_mult <= 0:
            raise ValueError(f"width_mult must be > 0, got {width_mult}")
        if taps not in ("blocks", "expansion"):
            raise ValueError(f"taps must be 'blocks' or 'expansion', got {taps!r}")
        self.width_mult = width_mult
        # "expansion": the stride-8 and stride-16 maps are the 1x1 expansion outputs of the
        # first blocks at stride 16 and 32 (features[7] and features[14]) instead of the
        # thin block outputs: as SSDLite attaches its first layer "to the expansion of layer
        # 15" (MobileNetV2 paper, section 6.2). 6x the channels at the same resolution, no
        # extra compute; at width 0.5 the stride-8 map has 96 channels instead of 16.
        self.taps = taps
        input_channel = make_divisible(STEM_CHANNELS * width_mult)
        last_channel = make_divisible(LAST_CHANNELS * max(1.0, width_mult))
        layers: list[nn.Module] = [conv_bn_act(3, input_channel, 3, stride=2, padding=1)]
        for t, c, n, s in INVERTED_RESIDUAL_SETTING:
            output_channel = make_divisible(c * width_mult)
            for i in range(n):
                layers.append(InvertedResidual(input_channel, output_channel, s if i == 0 else 1, t))
                input_channel = output_channel
        layers.append(conv_bn_act(input_channel, last_channel, 1))
        self.features = nn.Sequential(*layers)
        if taps == "blocks":
            self.out_channels = [self._channels_after(i) for i in OUTPUT_INDICES]
        else:
            self.out_channels = [self._expansion_channels(i) for i in EXPANSION_TAPS] + [self._channels_after(OUTPUT_INDICES[-1])]
        self.strides = list(OUTPUT_STRIDES)
        init_conv_bn(self)  # as torchvision's MobileNetV2: He (fan_out), BatchNorm as identity

    def _channels_after(self, index: int) -> int:
        block = self.features[index]
        if isinstance(block, InvertedResidual):
            return block.out_channels
        return block[0].out_channels  # conv_bn_act: the conv is first

    def _expansion_channels(self, index: int) -> int:
        return self.features[index].conv[0][0].out_channels

    def forward(self, x: Tensor) -> list[Tensor]:
        """(B, 3, H, W) -> [(B, C8, H/8, W/8), (B, C16, H/16, W/16), (B, C32, H/32, W/32)] (ceil)."""
        outputs: list[Tensor] = []
        for index, layer in enumerate(self.features):
            if self.taps == "expansion" and index in EXPANSION_TAPS:
                expanded = layer.conv[0](x)  # the stride-2 block: no residual connection
                outputs.append(expanded)
                x = layer.conv[1:](expanded)
                continue
            x = layer(x)
            if index == OUTPUT_INDICES[-1] or (self.taps == "blocks" and index in OUTPUT_INDICES):
                outputs.append(x)
        return outputs
