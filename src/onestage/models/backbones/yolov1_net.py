"""The 24 convolutional layers of YOLOv1 (Redmon et al., "You Only Look Once", CVPR 2016).

Section 2.1 and Figure 3 of the paper ("Network Design"), at input 448:

    conv 7x7x64 s2, maxpool 2x2 s2                         448 -> 224 -> 112
    conv 3x3x192,   maxpool 2x2 s2                         112 -> 56
    conv 1x1x128, 3x3x256, 1x1x256, 3x3x512, maxpool       56 -> 28
    {conv 1x1x256, 3x3x512} x 4, 1x1x512, 3x3x1024, maxpool  28 -> 14
    {conv 1x1x512, 3x3x1024} x 2, 3x3x1024, 3x3x1024 s2     14 -> 7
    conv 3x3x1024, 3x3x1024                                7

1 + 1 + 4 + 10 + 6 + 2 = 24 convolutions, total stride 64, one output map of 1024 channels
(7x7 at 448). Every convolution is followed by a leaky ReLU with slope 0.1 (section 2.2:
"phi(x) = x if x > 0, 0.1x otherwise"); 'same' padding (k // 2) as Darknet's config.

BatchNorm (``batch_norm=True``, the default) is *not* in the YOLOv1 paper: there, the first
20 layers were pretrained on ImageNet for about a week before detection training. onestage
has no such Darknet checkpoint and trains this network from scratch, where a 24-layer plain
leaky-ReLU stack without normalization trains poorly; BatchNorm after every conv is what
YOLOv2 added for that reason (Redmon and Farhadi 2017, section 2: "+2% mAP", "we can remove
dropout"). ``batch_norm=False`` gives the paper's convs with bias.
"""

from __future__ import annotations

from torch import Tensor, nn

from onestage.models.backbones.base import Backbone, BackboneWeightsError, StateDictSource, init_conv_bn
from onestage.models.layers import conv_bn_act

LEAKY_SLOPE = 0.1  # YOLOv1 section 2.2
ConvSpec = tuple[int, int, int]  # (kernel, out_channels, stride)

# Figure 3: (kernel, out channels, stride) per conv, "M" = 2x2 max-pool with stride 2.
YOLOV1_CONFIG: tuple[ConvSpec | str, ...] = (
    (7, 64, 2), "M",
    (3, 192, 1), "M",
    (1, 128, 1), (3, 256, 1), (1, 256, 1), (3, 512, 1), "M",
    *((1, 256, 1), (3, 512, 1)) * 4, (1, 512, 1), (3, 1024, 1), "M",
    *((1, 512, 1), (3, 1024, 1)) * 2, (3, 1024, 1), (3, 1024, 2),
    (3, 1024, 1), (3, 1024, 1),
)  # fmt: skip
YOLOV1_OUT_CHANNELS = 1024
YOLOV1_STRIDE = 64


def leaky_relu(inplace: bool = True) -> nn.LeakyReLU:
    """The paper's activation: leaky ReLU with slope 0.1 (section 2.2)."""
    return nn.LeakyReLU(LEAKY_SLOPE, inplace=inplace)


def yolov1_conv(in_ch: int, spec: ConvSpec, batch_norm: bool) -> nn.Sequential:
    """One Figure-3 conv with 'same' padding: conv -> [BN] -> leaky ReLU 0.1."""
    kernel, out_ch, stride = spec
    if batch_norm:
        return conv_bn_act(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, act=leaky_relu)
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2), leaky_relu())


class YOLOv1PaperBackbone(Backbone):
    """YOLOv1's 24 conv layers (Figure 3): (B, 3, H, W) -> [(B, 1024, H/64, W/64)].

    ``out_channels == [1024]``, ``strides == [64]``; at input 448 the map is 7x7, the S = 7
    grid of the paper. ``features`` is a flat ``nn.Sequential`` of conv blocks and pools.
    """

    def __init__(self, batch_norm: bool = True) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = 3
        for item in YOLOV1_CONFIG:
            if isinstance(item, str):
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers.append(yolov1_conv(in_ch, item, batch_norm))
                in_ch = item[1]
        self.features = nn.Sequential(*layers)
        self.out_channels = [YOLOV1_OUT_CHANNELS]
        self.strides = [YOLOV1_STRIDE]
        init_conv_bn(self, leaky_slope=LEAKY_SLOPE)

    def forward(self, x: Tensor) -> list[Tensor]:
        return [self.features(x)]

    def load_torchvision_weights(self, source: StateDictSource) -> None:
        """torchvision has no YOLOv1 network; its weights cannot load here."""
        raise BackboneWeightsError(
            "YOLOv1PaperBackbone has no torchvision counterpart (the paper's ImageNet weights are a "
            "Darknet file); train it from scratch or load a full onestage checkpoint"
        )
