"""VGG16 with the SSD300 changes, keeping torchvision's ``vgg16().features`` keys.

Liu et al., "SSD: Single Shot MultiBox Detector" (ECCV 2016), section 3 ("Base network")
and the reference implementations (Caffe SSD, ssd.pytorch, torchvision's ``ssd300_vgg16``):
- ``features``: torchvision's VGG16 layout (configuration "D"): 3x3 convs with bias at
  indices 0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28, ReLUs between them, max-pools
  at 4, 9, 16, 23, 30;
- pool3 (index 16) uses ``ceil_mode=True`` so that 75 -> 38 at input 300 (Caffe rounds up);
- pool5 (index 30) becomes 3x3, stride 1, padding 1 (keeps 19x19);
- fc6 / fc7 become convolutions: fc6 a 3x3 conv with dilation 6 (the "atrous" algorithm)
  and 1024 channels, fc7 a 1x1 conv with 1024 channels;
- conv4_3 (after the ReLU at index 22) goes through ``L2Norm(512, scale=20)``.

Outputs (finest first), at input 300: conv4_3 normalized (512 ch, stride 8, 38x38) and
fc7 (1024 ch, stride 16, 19x19).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from onestage.models.backbones.base import (
    Backbone,
    BackboneWeightsError,
    StateDictSource,
    init_conv_bn,
    load_prefixed_strict,
    read_state_dict,
)
from onestage.models.layers import L2Norm

# torchvision's VGG configuration "D" (VGG16): channels of each 3x3 conv, "M" = max-pool.
VGG16_CONFIG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M",
)  # fmt: skip
CONV4_3_RELU_INDEX = 22  # features[22] is the ReLU after conv4_3
POOL3_INDEX = 16
POOL5_INDEX = 30
FC_CHANNELS = 1024


def vgg16_ssd_features() -> nn.Sequential:
    """torchvision's ``vgg16().features`` with SSD's pool3 (ceil mode) and pool5 (3x3 s1)."""
    layers: list[nn.Module] = []
    in_ch = 3
    for item in VGG16_CONFIG:
        if item == "M":
            index = len(layers)
            if index == POOL3_INDEX:
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True))
            elif index == POOL5_INDEX:
                layers.append(nn.MaxPool2d(kernel_size=3, stride=1, padding=1))
            else:
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            assert isinstance(item, int)
            layers += [nn.Conv2d(in_ch, item, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            in_ch = item
    return nn.Sequential(*layers)


class VGG16Backbone(Backbone):
    """SSD300's VGG16: conv4_3 (L2-normalized) and fc7, with torchvision feature keys.

    fc6 and fc7 live in ``self.fc6`` / ``self.fc7`` (outside ``features``), so a torchvision
    ``vgg16`` state_dict loads into ``features`` strictly; its classifier can initialise
    fc6/fc7 by subsampling (see ``load_torchvision_weights``).
    """

    def __init__(self) -> None:
        super().__init__()
        self.features = vgg16_ssd_features()
        self.l2norm = L2Norm(512, scale=20.0)
        # SSD section 3: fc6 as a 3x3 conv dilated by 6 (padding 6 keeps 19x19), fc7 as 1x1.
        self.fc6 = nn.Sequential(
            nn.Conv2d(512, FC_CHANNELS, kernel_size=3, padding=6, dilation=6), nn.ReLU(inplace=True)
        )
        self.fc7 = nn.Sequential(nn.Conv2d(FC_CHANNELS, FC_CHANNELS, kernel_size=1), nn.ReLU(inplace=True))
        self.out_channels = [512, FC_CHANNELS]
        self.strides = [8, 16]
        init_conv_bn(self)  # as torchvision's VGG: He (fan_out, ReLU), zero biases

    def forward(self, x: Tensor) -> list[Tensor]:
        """(B, 3, H, W) -> [(B, 512, H8, W8) conv4_3 normalized, (B, 1024, H16, W16) fc7]."""
        x = self.features[: CONV4_3_RELU_INDEX + 1](x)
        conv4_3 = self.l2norm(x)
        x = self.features[CONV4_3_RELU_INDEX + 1 :](x)
        x = self.fc7(self.fc6(x))
        return [conv4_3, x]

    def load_torchvision_weights(self, source: StateDictSource, convert_fc: bool = True) -> None:
        """Load torchvision ``vgg16`` ImageNet weights: ``features.*`` strictly.

        With ``convert_fc`` and when the classifier's fc6/fc7 (``classifier.0``,
        ``classifier.3``) are present, fc6/fc7 are initialised from them by subsampling, as
        the SSD paper does (section 3: "subsample parameters from fc6 and fc7"); otherwise
        they keep their random initialisation. The rest of the classifier is dropped.
        """
        state_dict = read_state_dict(source)
        load_prefixed_strict(self.features, state_dict, "features.", self.ignored_torchvision_prefixes)
        if convert_fc and "classifier.0.weight" in state_dict and "classifier.3.weight" in state_dict:
            converted = fc_to_conv(
                state_dict["classifier.0.weight"],
                state_dict["classifier.0.bias"],
                state_dict["classifier.3.weight"],
                state_dict["classifier.3.bias"],
            )
            with torch.no_grad():
                for name, value in converted.items():
                    self.get_parameter(name).copy_(value)


def fc_to_conv(fc6_weight: Tensor, fc6_bias: Tensor, fc7_weight: Tensor, fc7_bias: Tensor) -> dict[str, Tensor]:
    """Subsample VGG16's fully connected fc6/fc7 into SSD's conv fc6 (3x3, dil. 6) / fc7 (1x1).

    fc6 (4096, 512*7*7) is viewed as a (4096, 512, 7, 7) conv; every 4th output filter and
    every 3rd tap in each spatial direction (rows/cols 0, 3, 6) are kept: (1024, 512, 3, 3).
    fc7 (4096, 4096) keeps every 4th output and input: (1024, 1024, 1, 1). Same decimation
    as the Caffe SSD's ``VGG_ILSVRC_16_layers_fc_reduced`` model (reproduced in
    sgrvinod's a-PyTorch-Tutorial-to-Object-Detection, ``model.py``, ``decimate``).
    """
    expected = {
        "classifier.0.weight": (fc6_weight, (4096, 512 * 7 * 7)),
        "classifier.0.bias": (fc6_bias, (4096,)),
        "classifier.3.weight": (fc7_weight, (4096, 4096)),
        "classifier.3.bias": (fc7_bias, (4096,)),
    }
    wrong = [f"{k}: {tuple(v.shape)}, expected {shape}" for k, (v, shape) in expected.items() if tuple(v.shape) != shape]
    if wrong:
        raise BackboneWeightsError("cannot convert fc6/fc7, shape mismatches: " + ", ".join(wrong))
    return {
        "fc6.0.weight": fc6_weight.view(4096, 512, 7, 7)[::4, :, ::3, ::3].clone(),  # (1024, 512, 3, 3)
        "fc6.0.bias": fc6_bias[::4].clone(),  # (1024,)
        "fc7.0.weight": fc7_weight[::4, ::4].reshape(FC_CHANNELS, FC_CHANNELS, 1, 1).clone(),  # (1024, 1024, 1, 1)
        "fc7.0.bias": fc7_bias[::4].clone(),  # (1024,)
    }
