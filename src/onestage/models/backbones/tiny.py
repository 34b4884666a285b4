"""A small conv-BN-ReLU backbone for CPU training and fast tests, shared by every head.

Not a published network: a plain stack of stages, each halving the resolution with a
3x3 stride-2 conv followed by ``blocks_per_stage`` 3x3 stride-1 convs, all conv (no bias)
-> BatchNorm -> activation (``onestage.models.layers.conv_bn_act``). Stage ``k`` (0-based)
has stride ``2 ** (k + 1)``; the last ``num_outputs`` stages are returned, finest first.

With the defaults (channels 16, 32, 64, 128, 256; three outputs) at input 112:
- stage 2: 64 ch,  stride 8,  14x14
- stage 3: 128 ch, stride 16, 7x7
- stage 4: 256 ch, stride 32, 4x4
(a 3x3 stride-2 conv with padding 1 maps H to ceil(H / 2)).
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from onestage.models.backbones.base import Backbone, BackboneWeightsError, StateDictSource, init_conv_bn
from onestage.models.layers import ActFactory, conv_bn_act


class TinyBackbone(Backbone):
    """``len(channels)`` stride-2 stages; returns the last ``num_outputs`` maps, finest first.

    forward: (B, 3, H, W) -> [(B, channels[k], ceil(H / 2**(k+1)), ...) for the last
    ``num_outputs`` stages k]. ``out_channels`` and ``strides`` describe those maps.
    """

    def __init__(
        self,
        channels: Sequence[int] = (16, 32, 64, 128, 256),
        num_outputs: int = 3,
        blocks_per_stage: int = 1,
        act: ActFactory = nn.ReLU,
    ) -> None:
        super().__init__()
        if not channels or any(c < 1 for c in channels):
            raise ValueError(f"channels must be a non-empty list of positive ints, got {list(channels)}")
        if not 1 <= num_outputs <= len(channels):
            raise ValueError(f"num_outputs must be in [1, {len(channels)}] (one per stage at most), got {num_outputs}")
        if blocks_per_stage < 0:
            raise ValueError(f"blocks_per_stage must be >= 0, got {blocks_per_stage}")
        stages: list[nn.Module] = []
        in_ch = 3
        for c in channels:
            layers = [conv_bn_act(in_ch, c, 3, stride=2, padding=1, act=act)]
            layers += [conv_bn_act(c, c, 3, stride=1, padding=1, act=act) for _ in range(blocks_per_stage)]
            stages.append(nn.Sequential(*layers))
            in_ch = c
        self.features = nn.Sequential(*stages)
        self.first_output = len(channels) - num_outputs
        self.out_channels = [int(c) for c in channels[self.first_output :]]
        self.strides = [2 ** (k + 1) for k in range(self.first_output, len(channels))]
        init_conv_bn(self)  # He (fan_out, ReLU) as torchvision's ResNet/VGG

    def forward(self, x: Tensor) -> list[Tensor]:
        outputs: list[Tensor] = []
        for k, stage in enumerate(self.features):
            x = stage(x)
            if k >= self.first_output:
                outputs.append(x)
        return outputs

    def load_torchvision_weights(self, source: StateDictSource) -> None:
        """There is no torchvision counterpart: the tiny backbone always trains from scratch."""
        raise BackboneWeightsError("TinyBackbone has no torchvision counterpart; train it from scratch (no backbone weights)")
