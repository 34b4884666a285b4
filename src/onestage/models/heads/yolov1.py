"""The YOLOv1 heads (the paper's two fully connected layers, or convolutions) and the YOLOv1 detector.

Redmon et al., "You Only Look Once" (CVPR 2016), section 2.1 and Figure 3: after the
convolutional layers, a fully connected layer of 4096 units (leaky ReLU 0.1) and a final
fully connected layer with a linear activation, reshaped to S x S x (5B + C) (7x7x30 for
PASCAL VOC). Section 2.2: dropout with rate 0.5 after the first fully connected layer.

Contracts (docs/contracts.md):
- ``YOLOv1Head(features: list[(N, C_i, H_i, W_i)]) -> (N, S, S, 5B + C)`` raw, from the last
  (coarsest) map. Layout per cell: [x, y, w, h, conf] * B, then C class scores; what each
  value means (sigmoid / softmax) is ``onestage.coders.yolov1_activate``.
- ``YOLOv1ConvHead``: the same contract from convolutions (not the paper's; see its docstring).
- ``YOLOv1(images (N, 3, H, W)) -> (N, S, S, 5B + C)``: the same raw tensor in train and eval
  mode; targets, loss, decoding and NMS live elsewhere (DESIGN.md section 2).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from onestage.models.backbones.base import Backbone

LEAKY_SLOPE = 0.1  # YOLOv1 section 2.2
LAST_WEIGHT_STD = 0.01


def _check_grid(S: int, B: int, num_classes: int, hidden: int) -> None:
    if S < 1 or B < 1 or num_classes < 1 or hidden < 1:
        raise ValueError(f"S, B, num_classes and hidden must be >= 1; got S={S}, B={B}, C={num_classes}, hidden={hidden}")


def _grid_input(features: Sequence[Tensor], S: int) -> Tensor:
    """The coarsest map (N, C_in, H, W), average-pooled to (N, C_in, S, S) unless already S x S."""
    x = features[-1]
    return x if tuple(x.shape[-2:]) == (S, S) else F.adaptive_avg_pool2d(x, S)


class YOLOv1Head(nn.Module):
    """Flatten an S x S map -> Linear(hidden) -> leaky ReLU -> Dropout -> Linear(S*S*(5B + C)).

    The last backbone map is average-pooled to S x S first when it is not already S x S
    (``adaptive_avg_pool2d``; the paper's network gives 7x7 at 448 and needs none), so any
    backbone and input size give the same grid. ``hidden`` is 4096 in the paper; a small
    value (e.g. 256) keeps CPU training fast: the first layer has S*S*in_channels*hidden
    weights (205 M for the paper's 7*7*1024*4096).

    The last layer starts with small weights (N(0, 0.01)) and zero bias, so every raw output
    starts near 0: boxes at the cell centre with w = h = 0.25, confidence 0.5 and uniform
    class probabilities, instead of random extremes of the sigmoids.
    """

    def __init__(
        self,
        in_channels: int,
        S: int = 7,
        B: int = 2,
        num_classes: int = 20,
        hidden: int = 4096,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        _check_grid(S, B, num_classes, hidden)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.S, self.B, self.num_classes = S, B, num_classes
        self.values_per_cell = 5 * B + num_classes
        self.fc1 = nn.Linear(S * S * in_channels, hidden)
        self.act = nn.LeakyReLU(LEAKY_SLOPE, inplace=True)
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, S * S * self.values_per_cell)
        nn.init.kaiming_uniform_(self.fc1.weight, a=LEAKY_SLOPE, nonlinearity="leaky_relu")
        nn.init.zeros_(self.fc1.bias)
        nn.init.normal_(self.fc2.weight, std=LAST_WEIGHT_STD)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        x = _grid_input(features, self.S)  # (N, C_in, S, S)
        x = self.dropout(self.act(self.fc1(x.flatten(1))))  # (N, hidden)
        out = self.fc2(x)  # (N, S*S*(5B + C)), linear (paper: "linear activation" last)
        return out.view(-1, self.S, self.S, self.values_per_cell)  # (N, S, S, 5B + C)


class YOLOv1ConvHead(nn.Module):
    """A convolutional YOLOv1 head: the same S x S x (5B + C) output from 3x3 then 1x1 convs.

    Not the paper's head: the paper flattens the map into fully connected layers, so every
    cell's prediction has its own weights for every position of the image. With a few
    thousand training images that head memorises positions (on the shapes demo the loss
    falls while held-out mAP stays near 0.1); a conv head shares one predictor across the
    cells (each cell still sees a neighbourhood through the backbone's receptive field and
    the 3x3 conv). Targets, loss, decoding and the output layout are unchanged.

    features[-1] (N, C_in, H, W) -> adaptive average pool to S x S when needed ->
    conv3x3(C_in -> hidden) + BN + leaky ReLU -> conv1x1(hidden -> 5B + C) -> (N, S, S, 5B + C).
    """

    def __init__(self, in_channels: int, S: int = 7, B: int = 2, num_classes: int = 20, hidden: int = 256) -> None:
        super().__init__()
        _check_grid(S, B, num_classes, hidden)
        self.S, self.B, self.num_classes = S, B, num_classes
        self.values_per_cell = 5 * B + num_classes
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, hidden, 3, padding=1, bias=False),
            nn.BatchNorm2d(hidden),
            nn.LeakyReLU(LEAKY_SLOPE, inplace=True),
        )
        self.pred = nn.Conv2d(hidden, self.values_per_cell, 1)
        nn.init.kaiming_normal_(self.conv[0].weight, a=LEAKY_SLOPE, mode="fan_out", nonlinearity="leaky_relu")
        nn.init.normal_(self.pred.weight, std=LAST_WEIGHT_STD)  # raw outputs start near 0, as YOLOv1Head
        nn.init.zeros_(self.pred.bias)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        out = self.pred(self.conv(_grid_input(features, self.S)))  # (N, 5B + C, S, S)
        return out.permute(0, 2, 3, 1).contiguous()  # (N, S, S, 5B + C)


class YOLOv1(nn.Module):
    """Backbone + head: (N, 3, H, W) -> (N, S, S, 5B + C) raw outputs."""

    def __init__(self, backbone: Backbone | nn.Module, head: YOLOv1Head | YOLOv1ConvHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    @property
    def S(self) -> int:
        return self.head.S

    @property
    def B(self) -> int:
        return self.head.B

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.backbone(images))
