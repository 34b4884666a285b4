"""SSD extras, SSD/SSDLite heads and the SSD module: prior counts, output order, init, grads."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from onestage.models.backbones.mobilenet_v2 import MobileNetV2Backbone
from onestage.models.heads.ssd import (
    SSD,
    SSDExtras,
    SSDHead,
    mobilenet_v2_ssd,
    mobilenet_v2_ssd_extras,
    vgg16_ssd300,
    vgg16_ssd_extras,
)

ANCHORS = [4, 6, 6, 6, 4, 4]
SIZES_300 = [(38, 38), (19, 19), (10, 10), (5, 5), (3, 3), (1, 1)]
COUNTS_300 = [5776, 2166, 600, 150, 36, 4]


def per_map_counts(sizes: list[tuple[int, int]], anchors: list[int]) -> list[int]:
    return [h * w * a for (h, w), a in zip(sizes, anchors)]


@pytest.fixture(scope="module")
def mobilenet_ssd() -> SSD:
    torch.manual_seed(0)
    return mobilenet_v2_ssd(num_classes=21).eval()


def test_mobilenet_v2_ssd_gives_8732_priors_at_300(mobilenet_ssd: SSD) -> None:
    sizes = mobilenet_ssd.feature_map_sizes(300)
    assert sizes == SIZES_300
    assert per_map_counts(sizes, ANCHORS) == COUNTS_300
    with torch.no_grad():
        out = mobilenet_ssd(torch.randn(1, 3, 300, 300))
    assert out["cls"].shape == (1, 8732, 21)
    assert out["loc"].shape == (1, 8732, 4)
    assert mobilenet_ssd.num_classes == 21 and mobilenet_ssd.anchors_per_location == ANCHORS


def test_vgg16_ssd300_gives_8732_priors_at_300() -> None:
    model = vgg16_ssd300(num_classes=21).eval()
    sizes = model.feature_map_sizes(300)
    assert sizes == SIZES_300
    assert per_map_counts(sizes, ANCHORS) == COUNTS_300
    with torch.no_grad():
        out = model(torch.randn(1, 3, 300, 300))
    assert out["cls"].shape == (1, 8732, 21) and out["loc"].shape == (1, 8732, 4)
    # ssd.pytorch's SSD300 for VOC (21 classes) has 26,285,486 parameters.
    assert sum(p.numel() for p in model.parameters()) == 26_285_486


def test_feature_map_sizes_restores_mode_and_leaves_bn_statistics() -> None:
    model = mobilenet_v2_ssd(num_classes=3, width_mult=0.5)
    model.train()
    running = model.backbone.features[0][1].running_mean.clone()
    assert model.feature_map_sizes(300) == SIZES_300
    assert model.training and all(m.training for m in model.modules())
    assert torch.equal(model.backbone.features[0][1].running_mean, running)
    model.eval()
    assert model.feature_map_sizes(320) == [(40, 40), (20, 20), (10, 10), (5, 5), (3, 3), (1, 1)]
    assert not model.training and not any(m.training for m in model.modules())
    model.train()
    with pytest.raises(ValueError, match="input size 200 is too small"):
        model.feature_map_sizes(200)  # 25 -> 13 -> 7 -> 4 -> 2, then a 3x3 conv without padding
    assert model.training


def test_extras_map_sizes() -> None:
    vgg_extras = vgg16_ssd_extras(1024).eval()
    with torch.no_grad():
        maps = vgg_extras(torch.randn(1, 1024, 19, 19))
    assert [tuple(m.shape[1:]) for m in maps] == [(512, 10, 10), (256, 5, 5), (256, 3, 3), (256, 1, 1)]
    # The reference SSD300 extras: conv + bias + ReLU, no BatchNorm.
    assert not any(isinstance(m, nn.BatchNorm2d) for m in vgg_extras.modules())
    assert [m.out_channels for m in vgg_extras.modules() if isinstance(m, nn.Conv2d)] == [256, 512, 128, 256, 128, 256, 128, 256]  # fmt: skip

    for depthwise in (False, True):
        extras = mobilenet_v2_ssd_extras(1280, depthwise=depthwise).eval()
        with torch.no_grad():
            maps = extras(torch.randn(1, 1280, 10, 10))
        assert [tuple(m.shape[1:]) for m in maps] == [(512, 5, 5), (256, 3, 3), (256, 1, 1)]
        assert any(isinstance(m, nn.BatchNorm2d) for m in extras.modules())
        grouped = [m for m in extras.modules() if isinstance(m, nn.Conv2d) and m.groups > 1]
        assert len(grouped) == (3 if depthwise else 0)


def test_extras_reject_inconsistent_arguments() -> None:
    with pytest.raises(ValueError, match="one \\(stride, padding\\) per extra layer"):
        SSDExtras(64, [128, 64], [(2, 1)])
    with pytest.raises(ValueError, match="even"):
        SSDExtras(64, [127], [(2, 1)])
    with pytest.raises(ValueError, match="3 layers"):
        mobilenet_v2_ssd_extras(1280, channels=[512, 256])


def test_ssdlite_builds_runs_and_is_depthwise() -> None:
    torch.manual_seed(0)
    lite = mobilenet_v2_ssd(num_classes=21, lite=True).eval()
    full = mobilenet_v2_ssd(num_classes=21)
    with torch.no_grad():
        out = lite(torch.randn(1, 3, 300, 300))
    assert out["cls"].shape == (1, 8732, 21) and out["loc"].shape == (1, 8732, 4)
    assert torch.isfinite(out["cls"]).all() and torch.isfinite(out["loc"]).all()
    for predictor in lite.head.cls_predictors:
        dw, pw = predictor[0][0], predictor[1]
        assert dw.groups == dw.in_channels == dw.out_channels and dw.kernel_size == (3, 3)
        assert pw.kernel_size == (1, 1) and pw.bias is not None
    lite_params = sum(p.numel() for p in lite.parameters())
    full_params = sum(p.numel() for p in full.parameters())
    assert lite_params < 0.5 * full_params


class Marker(nn.Module):
    """Stands in for a predictor: value at (b, c, i, j) = b * 1e6 + c * 1e4 + i * 100 + j."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels

    def forward(self, x: Tensor) -> Tensor:
        b, _, h, w = x.shape
        bb = torch.arange(b).view(-1, 1, 1, 1) * 1e6
        cc = torch.arange(self.channels).view(1, -1, 1, 1) * 1e4
        ii = torch.arange(h).view(1, 1, -1, 1) * 100
        jj = torch.arange(w).view(1, 1, 1, -1)
        return (bb + cc + ii + jj).double()


def test_output_order_is_map_by_map_row_major_anchors_together() -> None:
    in_channels, anchors, k = [3, 5, 4], [2, 3, 1], 4
    sizes = [(3, 5), (2, 4), (1, 1)]  # not square: a transposed layout would show
    head = SSDHead(in_channels, anchors, num_classes=k)
    head.cls_predictors = nn.ModuleList(Marker(a * k) for a in anchors)
    head.loc_predictors = nn.ModuleList(Marker(a * 4) for a in anchors)
    features = [torch.zeros(2, c, h, w) for c, (h, w) in zip(in_channels, sizes)]
    out = head(features)
    total = sum(h * w * a for (h, w), a in zip(sizes, anchors))
    assert out["cls"].shape == (2, total, k) and out["loc"].shape == (2, total, 4)
    offset = 0
    for (h, w), a_count in zip(sizes, anchors):
        for b in range(2):
            for i in range(h):
                for j in range(w):
                    for a in range(a_count):
                        row = offset + (i * w + j) * a_count + a
                        for name, n in (("cls", k), ("loc", 4)):
                            got = out[name][b, row]
                            want = torch.tensor([b * 1e6 + (a * n + c) * 1e4 + i * 100 + j for c in range(n)])
                            assert torch.equal(got, want.double()), (name, b, i, j, a)
        offset += h * w * a_count


def test_output_order_through_real_convs() -> None:
    # Zero weights and bias[c] = c: every cell holds its channel index; anchor a, class k -> a*K + k.
    head = SSDHead([8], [3], num_classes=5)
    with torch.no_grad():
        for conv in (head.cls_predictors[0][0], head.loc_predictors[0][0]):
            conv.weight.zero_()
            conv.bias.copy_(torch.arange(conv.out_channels, dtype=torch.float32))
    out = head([torch.randn(1, 8, 2, 3)])
    cls = out["cls"].view(1, 2 * 3, 3, 5)
    assert torch.equal(cls[0, 4], torch.arange(15.0).view(3, 5))
    assert torch.equal(out["loc"][0, 3 * 3 + 2], torch.tensor([8.0, 9.0, 10.0, 11.0]))


def test_class_bias_gives_background_probability_099() -> None:
    for depthwise in (False, True):
        head = SSDHead([16, 32], [4, 6], num_classes=21, depthwise=depthwise).eval()
        with torch.no_grad():
            out = head([torch.zeros(1, 16, 4, 4), torch.zeros(1, 32, 2, 2)])
        probs = out["cls"].softmax(-1)
        torch.testing.assert_close(probs[..., 0], torch.full((1, 4 * 16 + 6 * 4), 0.99))
        torch.testing.assert_close(probs[..., 1:], torch.full((1, 88, 20), 0.01 / 20))
        assert torch.all(out["loc"] == 0)
    head = SSDHead([16], [4], num_classes=21)
    bias = head.cls_predictors[0][0].bias.view(4, 21)
    assert torch.allclose(bias[:, 0], torch.full((4,), math.log(0.99 * 20 / 0.01)))
    assert torch.all(bias[:, 1:] == 0)


def test_background_probability_stays_high_on_real_features(mobilenet_ssd: SSD) -> None:
    torch.manual_seed(1)
    with torch.no_grad():
        probs = mobilenet_ssd(torch.randn(1, 3, 300, 300))["cls"].softmax(-1)[..., 0]
    assert probs.mean() > 0.98
    assert probs.min() > 0.5


def test_head_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="one anchor count per feature map"):
        SSDHead([16, 32], [4], num_classes=21)
    with pytest.raises(ValueError, match="counts the background"):
        SSDHead([16], [4], num_classes=1)
    head = SSDHead([16, 32], [4, 4], num_classes=3)
    with pytest.raises(ValueError, match="expects 2 feature maps, got 1"):
        head([torch.zeros(1, 16, 2, 2)])
    backbone = MobileNetV2Backbone(0.5)
    extras = mobilenet_v2_ssd_extras(backbone.out_channels[-1])
    with pytest.raises(ValueError, match="give 6 maps but the head has 2 predictors"):
        SSD(backbone, extras, head)


def test_backward_reaches_every_parameter() -> None:
    torch.manual_seed(0)
    model = mobilenet_v2_ssd(num_classes=4, width_mult=0.5, lite=True).train()
    out = model(torch.randn(2, 3, 260, 260))  # the smallest size the extras accept (9 -> 5 -> 3 -> 1)
    (out["cls"].logsumexp(-1).mean() + out["loc"].pow(2).mean()).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    assert model.backbone.features[0][0].weight.grad.abs().sum() > 0
    assert model.head.loc_predictors[5][1].weight.grad.abs().sum() > 0


def test_channels_last_matches_contiguous(mobilenet_ssd: SSD) -> None:
    x = torch.randn(1, 3, 300, 300)
    with torch.no_grad():
        expected = mobilenet_ssd(x)
        model_cl = mobilenet_v2_ssd(num_classes=21).eval()
        model_cl.load_state_dict(mobilenet_ssd.state_dict())
        model_cl = model_cl.to(memory_format=torch.channels_last)
        got = model_cl(x.contiguous(memory_format=torch.channels_last))
    for key in ("cls", "loc"):
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-5)


def test_width_half_builds() -> None:
    model = mobilenet_v2_ssd(num_classes=21, width_mult=0.5).eval()
    assert model.backbone.out_channels == [16, 48, 1280]
    with torch.no_grad():
        out = model(torch.randn(1, 3, 300, 300))
    assert out["cls"].shape == (1, 8732, 21)
