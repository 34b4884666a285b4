"""SSD and SSDLite: extra feature layers, the multibox head, and the detector module.

Contracts (docs/contracts.md):
- ``SSDExtras(x (B, C, H, W)) -> list[Tensor]``: one map per extra layer, each coarser.
- ``SSDHead(features: list[(B, C_i, H_i, W_i)]) -> {"cls": (B, P, K) logits, "loc": (B, P, 4)}``
  with K = number of classes including background (index 0) and
  P = sum_i H_i * W_i * A_i. Prior order: map by map, row-major over cells (i * W + j),
  the A_i boxes of a cell together; the same order as ``onestage.priors``.
- ``SSD(images (B, 3, H, W)) -> {"cls", "loc"}``: raw outputs, identical in train and eval
  mode; priors, decoding and NMS live elsewhere (DESIGN.md section 2).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from onestage.models.backbones.base import Backbone
from onestage.models.backbones.mobilenet_v2 import MobileNetV2Backbone
from onestage.models.backbones.vgg16 import VGG16Backbone
from onestage.models.layers import ActFactory, conv_bn_act, depthwise_separable, probe

# Reference SSD300 layout (SSD paper, Fig. 2; ssd.pytorch ``extras``): conv8_2 .. conv11_2.
VGG16_EXTRA_CHANNELS: tuple[int, ...] = (512, 256, 256, 256)
VGG16_EXTRA_STRIDES_PADDINGS: tuple[tuple[int, int], ...] = ((2, 1), (2, 1), (1, 0), (1, 0))  # 19->10->5->3->1
MOBILENET_V2_EXTRA_STRIDES_PADDINGS: tuple[tuple[int, int], ...] = ((2, 1), (2, 1), (1, 0))  # 10->5->3->1
SSD300_ANCHORS_PER_LOCATION: tuple[int, ...] = (4, 6, 6, 6, 4, 4)  # DESIGN.md section 3: 8732 priors
BACKGROUND_PRIOR = 0.99
CLS_WEIGHT_STD = 0.01  # RetinaNet section 4.1


class SSDExtras(nn.Module):
    """Extra feature layers after the backbone's last map (SSD paper, section 2.1).

    Each layer: a 1x1 conv to ``c // 2`` channels, then a 3x3 conv to ``c`` channels with the
    given (stride, padding); map size H -> (H + 2 padding - 3) // stride + 1. With
    ``depthwise`` the 3x3 conv is depthwise-separable (SSDLite, MobileNetV2 paper section
    6.2). ``batch_norm=False`` gives the reference VGG SSD300 extras (conv with bias + ReLU,
    no BatchNorm); otherwise conv (no bias) + BN + ``act``.

    forward: (B, in_channels, H, W) -> [(B, channels[0], H1, W1), (B, channels[1], H2, W2), ...].
    """

    def __init__(
        self,
        in_channels: int,
        channels: Sequence[int],
        strides_paddings: Sequence[tuple[int, int]],
        depthwise: bool = False,
        batch_norm: bool = True,
        act: ActFactory = nn.ReLU6,
    ) -> None:
        super().__init__()
        if len(channels) != len(strides_paddings):
            raise ValueError(
                f"one (stride, padding) per extra layer: got {len(channels)} channels and "
                f"{len(strides_paddings)} strides_paddings"
            )
        if depthwise and not batch_norm:
            raise ValueError("depthwise extras always use BatchNorm (SSDLite); set batch_norm=True")
        for c in channels:
            if c < 2 or c % 2:
                raise ValueError(f"extra layer channels must be even and >= 2 (1x1 conv reduces to c/2), got {c}")
        layers: list[nn.Module] = []
        in_ch = in_channels
        for c, (stride, padding) in zip(channels, strides_paddings):
            layers.append(_extra_layer(in_ch, c, stride, padding, depthwise, batch_norm, act))
            in_ch = c
        self.layers = nn.ModuleList(layers)
        self.out_channels = list(channels)
        _init_convs(self)

    def forward(self, x: Tensor) -> list[Tensor]:
        outputs: list[Tensor] = []
        for layer in self.layers:
            x = layer(x)
            outputs.append(x)
        return outputs


def _extra_layer(
    in_ch: int, out_ch: int, stride: int, padding: int, depthwise: bool, batch_norm: bool, act: ActFactory
) -> nn.Sequential:
    mid = out_ch // 2
    if depthwise:
        return nn.Sequential(conv_bn_act(in_ch, mid, 1, act=act), depthwise_separable(mid, out_ch, stride, padding))
    if batch_norm:
        return nn.Sequential(
            conv_bn_act(in_ch, mid, 1, act=act), conv_bn_act(mid, out_ch, 3, stride=stride, padding=padding, act=act)
        )
    return nn.Sequential(
        nn.Conv2d(in_ch, mid, 1),
        act(inplace=True),
        nn.Conv2d(mid, out_ch, 3, stride=stride, padding=padding),
        act(inplace=True),
    )


def extra_strides_paddings(map_size: int, num_layers: int) -> list[tuple[int, int]]:
    """(stride, padding) per extra layer for a square ``map_size`` input map: halve with
    s2 p1 (H -> ceil(H / 2)), except that a 3x3 map goes to 1x1 with s1 p0 as the reference
    SSD300's last layer. At 300 this is 10 -> 5 -> 3 -> 1; at 256, 8 -> 4 -> 2 -> 1."""
    plan = []
    size = map_size
    for _ in range(num_layers):
        if size == 3:
            plan.append((1, 0))
            size = 1
        else:
            plan.append((2, 1))
            size = (size + 1) // 2
    return plan


def mobilenet_v2_ssd_extras(
    in_ch: int, channels: Sequence[int] = (512, 256, 256), depthwise: bool = False, map_size: int | None = None
) -> SSDExtras:
    """MobileNetV2-SSD / SSDLite extras: 10 -> 5 (s2 p1) -> 3 (s2 p1) -> 1 (s1 p0) at input 300.

    ``map_size``: the backbone's last map side for another input size; the layers then
    follow ``extra_strides_paddings`` (e.g. 8 -> 4 -> 2 -> 1 at 256).
    BN + ReLU6 as the rest of MobileNetV2; depthwise-separable 3x3 convs for SSDLite.
    """
    if map_size is not None:
        return SSDExtras(in_ch, channels, extra_strides_paddings(map_size, len(channels)), depthwise=depthwise)
    if len(channels) != len(MOBILENET_V2_EXTRA_STRIDES_PADDINGS):
        raise ValueError(
            f"the MobileNetV2-SSD extras have {len(MOBILENET_V2_EXTRA_STRIDES_PADDINGS)} layers "
            f"(10 -> 5 -> 3 -> 1 at input 300), got {len(channels)} channels {list(channels)}; "
            "build SSDExtras directly for another layout"
        )
    return SSDExtras(in_ch, channels, MOBILENET_V2_EXTRA_STRIDES_PADDINGS, depthwise=depthwise)


def vgg16_ssd_extras(in_ch: int = 1024) -> SSDExtras:
    """Reference SSD300 extras conv8_2 .. conv11_2: 19 -> 10 -> 5 -> 3 -> 1 at input 300.

    As the SSD paper (Fig. 2) and ssd.pytorch: 1x1 then 3x3 convs with bias and ReLU, no BN.
    """
    return SSDExtras(
        in_ch, VGG16_EXTRA_CHANNELS, VGG16_EXTRA_STRIDES_PADDINGS, depthwise=False, batch_norm=False, act=nn.ReLU
    )


class SSDHead(nn.Module):
    """Multibox predictors: per map one conv for class logits and one for box offsets.

    SSD paper, section 2.1 ("Convolutional predictors for detection"): a 3x3 conv gives
    A * K class scores and A * 4 offsets per cell. SSDLite (MobileNetV2 paper, section 6.2)
    replaces it by a depthwise 3x3 + BN + ReLU6 and a pointwise 1x1 (with bias, no BN).

    ``num_classes`` counts the background (index 0): K = C + 1.

    Init: xavier-uniform conv weights and zero biases (ssd.pytorch, torchvision SSD), except
    the last class conv, which starts near "background everywhere": weights N(0, 0.01) and
    a bias that makes the softmax give the background ``background_prior`` (0.99) when the
    weights' contribution is zero. Nearly every prior is background, so a uniform start
    (1/K each) gives a large, noisy background loss in the first steps; a prior probability
    init removes it (RetinaNet, Lin et al. 2017, section 4.1 "Initialization": sigma 0.01
    and, for a sigmoid, b = -log((1 - pi) / pi); here for a softmax:
    b_background = log(pi (K - 1) / (1 - pi)), the other classes 0). The small weights
    keep the logit noise (std about 0.5 on unit-variance features) from undoing the bias.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        anchors_per_location: Sequence[int],
        num_classes: int,
        depthwise: bool = False,
        background_prior: float = BACKGROUND_PRIOR,
    ) -> None:
        super().__init__()
        if len(in_channels) != len(anchors_per_location):
            raise ValueError(
                f"one anchor count per feature map: got {len(in_channels)} maps (in_channels "
                f"{list(in_channels)}) and anchors_per_location {list(anchors_per_location)}"
            )
        if num_classes < 2:
            raise ValueError(f"num_classes counts the background and must be >= 2, got {num_classes}")
        if not 0 < background_prior < 1:
            raise ValueError(f"background_prior must be in (0, 1), got {background_prior}")
        self.num_classes = num_classes
        self.anchors_per_location = list(anchors_per_location)
        self.cls_predictors = nn.ModuleList(
            _predictor(c, a * num_classes, depthwise) for c, a in zip(in_channels, anchors_per_location)
        )
        self.loc_predictors = nn.ModuleList(
            _predictor(c, a * 4, depthwise) for c, a in zip(in_channels, anchors_per_location)
        )
        _init_convs(self)
        background_bias = math.log(background_prior * (num_classes - 1) / (1 - background_prior))
        with torch.no_grad():
            for predictor in self.cls_predictors:
                last = _last_conv(predictor)
                nn.init.normal_(last.weight, std=CLS_WEIGHT_STD)
                # channel a * K + k holds class k of anchor a: background is k = 0.
                last.bias.view(-1, num_classes)[:, 0].fill_(background_bias)

    def forward(self, features: Sequence[Tensor]) -> dict[str, Tensor]:
        """[(B, C_i, H_i, W_i)] -> {"cls": (B, P, K), "loc": (B, P, 4)}."""
        if len(features) != len(self.cls_predictors):
            raise ValueError(f"SSDHead expects {len(self.cls_predictors)} feature maps, got {len(features)}")
        cls = [flatten_predictions(p(f), self.num_classes) for p, f in zip(self.cls_predictors, features)]
        loc = [flatten_predictions(p(f), 4) for p, f in zip(self.loc_predictors, features)]
        return {"cls": torch.cat(cls, dim=1), "loc": torch.cat(loc, dim=1)}


def flatten_predictions(pred: Tensor, values_per_anchor: int) -> Tensor:
    """(B, A * K, H, W) -> (B, H * W * A, K): row-major over cells, the anchors of a cell together.

    Channel a * K + k at cell (i, j) goes to row (i * W + j) * A + a, column k.
    """
    b, _, h, w = pred.shape
    return pred.permute(0, 2, 3, 1).reshape(b, -1, values_per_anchor)  # (B, H, W, A*K) -> (B, H*W*A, K)


def _predictor(in_ch: int, out_ch: int, depthwise: bool) -> nn.Sequential:
    if depthwise:
        return nn.Sequential(conv_bn_act(in_ch, in_ch, 3, padding=1, groups=in_ch), nn.Conv2d(in_ch, out_ch, 1))
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 3, padding=1))


def _last_conv(predictor: nn.Sequential) -> nn.Conv2d:
    last = predictor[-1]
    assert isinstance(last, nn.Conv2d) and last.bias is not None
    return last


def _init_convs(module: nn.Module) -> None:
    # Xavier-uniform weights, zero biases, BN as identity: ssd.pytorch's ``weights_init``.
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class SSD(nn.Module):
    """Backbone maps + extra maps -> multibox head. Raw outputs only.

    forward: images (B, 3, H, W) normalized -> {"cls": (B, P, K) logits, "loc": (B, P, 4)
    encoded offsets (SSD variances, see ``onestage.coders``)}. All backbone maps are used,
    then the extras computed from the last one.
    """

    def __init__(self, backbone: Backbone, extras: SSDExtras, head: SSDHead) -> None:
        super().__init__()
        maps = len(backbone.out_channels) + len(extras.out_channels)
        if maps != len(head.cls_predictors):
            raise ValueError(
                f"backbone ({len(backbone.out_channels)} maps) + extras ({len(extras.out_channels)}) "
                f"give {maps} maps but the head has {len(head.cls_predictors)} predictors"
            )
        self.backbone = backbone
        self.extras = extras
        self.head = head

    @property
    def num_classes(self) -> int:
        """Classes scored by the head, background included (K = C + 1)."""
        return self.head.num_classes

    @property
    def anchors_per_location(self) -> list[int]:
        return list(self.head.anchors_per_location)

    def feature_maps(self, images: Tensor) -> list[Tensor]:
        """(B, 3, H, W) -> every map the head reads, finest first."""
        maps = self.backbone(images)
        return maps + self.extras(maps[-1])

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        return self.head(self.feature_maps(images))

    def feature_map_sizes(self, input_size: int) -> list[tuple[int, int]]:
        """(H_i, W_i) of every head input for a square ``input_size`` input, by a dummy forward.

        Runs in eval mode (BatchNorm must not update its running statistics) under
        ``torch.no_grad`` and restores the previous mode. An input too small for the layers
        (a 3x3 conv without padding on a 1x1 map) is a ``ValueError`` naming the size.
        """
        try:
            maps = probe(self, input_size, self.feature_maps)
        except RuntimeError as exc:
            raise ValueError(f"input size {input_size} is too small for this SSD's layers: {exc}") from exc
        return [(m.shape[-2], m.shape[-1]) for m in maps]


def mobilenet_v2_ssd(
    num_classes: int,
    width_mult: float = 1.0,
    lite: bool = False,
    anchors_per_location: Sequence[int] = SSD300_ANCHORS_PER_LOCATION,
    extra_channels: Sequence[int] = (512, 256, 256),
) -> SSD:
    """MobileNetV2-SSD (``lite=False``) or MobileNetV2-SSDLite (``lite=True``).

    ``num_classes`` includes the background. Six maps at input 300: 38, 19, 10 (backbone)
    and 5, 3, 1 (extras).
    """
    backbone = MobileNetV2Backbone(width_mult)
    extras = mobilenet_v2_ssd_extras(backbone.out_channels[-1], extra_channels, depthwise=lite)
    head = SSDHead(backbone.out_channels + extras.out_channels, anchors_per_location, num_classes, depthwise=lite)
    return SSD(backbone, extras, head)


def vgg16_ssd300(num_classes: int, anchors_per_location: Sequence[int] = SSD300_ANCHORS_PER_LOCATION) -> SSD:
    """The reference SSD300 (VGG16): maps 38, 19, 10, 5, 3, 1; ``num_classes`` includes background."""
    backbone = VGG16Backbone()
    extras = vgg16_ssd_extras(backbone.out_channels[-1])
    head = SSDHead(backbone.out_channels + extras.out_channels, anchors_per_location, num_classes)
    return SSD(backbone, extras, head)
