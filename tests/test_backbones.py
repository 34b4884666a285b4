"""Backbones: torchvision key layout, parameter counts, weight loading, output shapes.

The reference key lists are written here independently from torchvision's published
definitions (``torchvision/models/mobilenetv2.py``, ``torchvision/models/vgg.py``) so that a
mistake in our module tree cannot hide behind the same mistake in the test.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from onestage.models.backbones.base import BackboneWeightsError, load_torchvision_weights
from onestage.models.backbones.mobilenet_v2 import MobileNetV2Backbone, make_divisible
from onestage.models.backbones.vgg16 import VGG16Backbone, fc_to_conv
from onestage.models.layers import L2Norm

# ----------------------------------------------------------------- independent references

MOBILENET_V2_SETTING = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)]  # fmt: skip


def _bn(prefix: str, ch: int) -> list[tuple[str, tuple[int, ...]]]:
    return [
        (f"{prefix}.weight", (ch,)),
        (f"{prefix}.bias", (ch,)),
        (f"{prefix}.running_mean", (ch,)),
        (f"{prefix}.running_var", (ch,)),
        (f"{prefix}.num_batches_tracked", ()),
    ]


def torchvision_mobilenet_v2_keys() -> list[tuple[str, tuple[int, ...]]]:
    """torchvision ``mobilenet_v2()`` (width 1.0) feature keys and shapes, in order."""
    keys = [("features.0.0.weight", (32, 3, 3, 3)), *_bn("features.0.1", 32)]
    inp, index = 32, 1
    for t, c, n, _ in MOBILENET_V2_SETTING:
        for _ in range(n):
            hidden = inp * t
            p = f"features.{index}.conv"
            if t == 1:
                keys += [(f"{p}.0.0.weight", (hidden, 1, 3, 3)), *_bn(f"{p}.0.1", hidden)]
                keys += [(f"{p}.1.weight", (c, hidden, 1, 1)), *_bn(f"{p}.2", c)]
            else:
                keys += [(f"{p}.0.0.weight", (hidden, inp, 1, 1)), *_bn(f"{p}.0.1", hidden)]
                keys += [(f"{p}.1.0.weight", (hidden, 1, 3, 3)), *_bn(f"{p}.1.1", hidden)]
                keys += [(f"{p}.2.weight", (c, hidden, 1, 1)), *_bn(f"{p}.3", c)]
            inp, index = c, index + 1
    keys += [("features.18.0.weight", (1280, 320, 1, 1)), *_bn("features.18.1", 1280)]
    return keys


VGG16_CONVS = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
VGG16_CONV_INDICES = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]


def torchvision_vgg16_feature_keys() -> list[tuple[str, tuple[int, ...]]]:
    keys = []
    in_ch = 3
    for index, out_ch in zip(VGG16_CONV_INDICES, VGG16_CONVS):
        keys += [(f"features.{index}.weight", (out_ch, in_ch, 3, 3)), (f"features.{index}.bias", (out_ch,))]
        in_ch = out_ch
    return keys


def random_state_dict(keys: list[tuple[str, tuple[int, ...]]], seed: int = 0) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, Tensor] = {}
    for name, shape in keys:
        if name.endswith("num_batches_tracked"):
            sd[name] = torch.tensor(7, dtype=torch.long)
        elif name.endswith("running_var"):
            sd[name] = torch.rand(shape, generator=g) + 0.5
        else:
            sd[name] = torch.randn(shape, generator=g) * 0.1
    return sd


def prefixed(module: nn.Module, prefix: str) -> list[tuple[str, tuple[int, ...]]]:
    return [(prefix + k, tuple(v.shape)) for k, v in module.state_dict().items()]


# ----------------------------------------------------------------- MobileNetV2


def test_mobilenet_v2_keys_and_shapes_match_torchvision() -> None:
    ours = prefixed(MobileNetV2Backbone().features, "features.")
    assert ours == torchvision_mobilenet_v2_keys()


def test_mobilenet_v2_parameter_count_matches_torchvision() -> None:
    backbone = MobileNetV2Backbone()
    classifier = nn.Linear(1280, 1000)
    total = sum(p.numel() for p in backbone.parameters()) + sum(p.numel() for p in classifier.parameters())
    assert total == 3_504_872  # torchvision mobilenet_v2(num_classes=1000)


def test_make_divisible_follows_torchvision_rounding() -> None:
    assert make_divisible(32 * 0.5) == 16
    assert make_divisible(24 * 0.5) == 16  # 12 rounds up to 16
    assert make_divisible(32 * 0.35) == 16  # 11.2 -> 8 is more than 10% below -> 16
    assert make_divisible(32 * 1.4) == 48
    assert make_divisible(1280 * 1.4) == 1792


@pytest.mark.parametrize(("width", "channels"), [(1.0, [32, 96, 1280]), (0.5, [16, 48, 1280]), (1.4, [48, 136, 1792])])
def test_mobilenet_v2_width_channels(width: float, channels: list[int]) -> None:
    backbone = MobileNetV2Backbone(width)
    assert backbone.out_channels == channels
    assert backbone.strides == [8, 16, 32]


def test_mobilenet_v2_output_shapes_at_300() -> None:
    backbone = MobileNetV2Backbone().eval()
    with torch.no_grad():
        maps = backbone(torch.randn(1, 3, 300, 300))
    assert [tuple(m.shape) for m in maps] == [(1, 32, 38, 38), (1, 96, 19, 19), (1, 1280, 10, 10)]


def _functional_mobilenet_v2(sd: dict[str, Tensor], x: Tensor) -> list[Tensor]:
    """torchvision's MobileNetV2 forward (eval mode) written from the keys, outputs 6, 13, 18."""

    def bn(x: Tensor, p: str) -> Tensor:
        return F.batch_norm(x, sd[p + ".running_mean"], sd[p + ".running_var"], sd[p + ".weight"], sd[p + ".bias"])

    def cba(x: Tensor, p: str, stride: int = 1, dw: bool = False) -> Tensor:
        w = sd[p + ".0.weight"]
        y = F.conv2d(x, w, stride=stride, padding=w.shape[-1] // 2, groups=x.shape[1] if dw else 1)
        return F.relu6(bn(y, p + ".1"))

    outputs = []
    x = cba(x, "features.0", stride=2)
    inp, index = 32, 1
    for t, c, n, s in MOBILENET_V2_SETTING:
        for i in range(n):
            stride = s if i == 0 else 1
            p = f"features.{index}.conv"
            if t == 1:
                y = cba(x, p + ".0", stride, dw=True)
                y = bn(F.conv2d(y, sd[p + ".1.weight"]), p + ".2")
            else:
                y = cba(x, p + ".0")
                y = cba(y, p + ".1", stride, dw=True)
                y = bn(F.conv2d(y, sd[p + ".2.weight"]), p + ".3")
            x = x + y if stride == 1 and inp == c else y
            if index in (6, 13):
                outputs.append(x)
            inp, index = c, index + 1
    outputs.append(cba(x, "features.18"))
    return outputs


def test_mobilenet_v2_loads_torchvision_state_dict_and_computes_torchvision_forward() -> None:
    sd = random_state_dict(torchvision_mobilenet_v2_keys())
    sd["classifier.1.weight"] = torch.randn(1000, 1280)
    sd["classifier.1.bias"] = torch.randn(1000)
    backbone = MobileNetV2Backbone()
    load_torchvision_weights(backbone, sd)
    assert torch.equal(backbone.features[0][0].weight, sd["features.0.0.weight"])
    assert torch.equal(backbone.features[17].conv[3].running_var, sd["features.17.conv.3.running_var"])
    assert backbone.features[5].conv[1][1].num_batches_tracked.item() == 7
    x = torch.randn(2, 3, 67, 67)  # odd size: checks padding and stride rounding too
    with torch.no_grad():
        ours = backbone.eval()(x)
    expected = _functional_mobilenet_v2(sd, x)
    assert len(ours) == 3
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_mobilenet_v2_loads_from_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    sd = random_state_dict(torchvision_mobilenet_v2_keys(), seed=3)
    path = tmp_path / "mobilenet_v2.pth"
    torch.save(sd, path)
    backbone = MobileNetV2Backbone()
    backbone.load_torchvision_weights(path)
    assert torch.equal(backbone.features[18][0].weight, sd["features.18.0.weight"])


def test_mobilenet_v2_accepts_checkpoints_without_num_batches_tracked() -> None:
    sd = {k: v for k, v in random_state_dict(torchvision_mobilenet_v2_keys()).items() if "num_batches_tracked" not in k}
    backbone = MobileNetV2Backbone()
    backbone.load_torchvision_weights(sd)
    assert torch.equal(backbone.features[1].conv[1].weight, sd["features.1.conv.1.weight"])


def test_mobilenet_v2_wrong_weights_give_a_clear_error() -> None:
    sd = random_state_dict(torchvision_mobilenet_v2_keys())
    sd["features.3.conv.1.0.weight"] = torch.randn(144, 1, 5, 5)  # wrong shape
    del sd["features.18.1.running_mean"]  # missing
    sd["features.19.weight"] = torch.randn(3)  # unexpected
    sd["head.weight"] = torch.randn(3)  # unexpected, outside features
    backbone = MobileNetV2Backbone()
    before = backbone.features[0][0].weight.clone()
    with pytest.raises(BackboneWeightsError) as info:
        backbone.load_torchvision_weights(sd)
    message = str(info.value)
    assert "features.3.conv.1.0.weight: file (144, 1, 5, 5), model (144, 1, 3, 3)" in message
    assert "missing keys (1): features.18.1.running_mean" in message
    assert "features.19.weight" in message and "head.weight" in message
    assert torch.equal(backbone.features[0][0].weight, before)  # nothing half-loaded


def test_width_mismatch_is_reported_as_shape_mismatch() -> None:
    sd = random_state_dict(torchvision_mobilenet_v2_keys())
    with pytest.raises(BackboneWeightsError, match="shape mismatches"):
        MobileNetV2Backbone(0.5).load_torchvision_weights(sd)


def test_weights_file_errors(tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(BackboneWeightsError, match="no such weights file"):
        MobileNetV2Backbone().load_torchvision_weights(tmp_path / "absent.pth")
    path = tmp_path / "checkpoint.pth"
    torch.save({"model": {"features.0.0.weight": torch.zeros(1)}, "step": 3}, path)
    with pytest.raises(BackboneWeightsError, match="not tensors: model, step"):
        MobileNetV2Backbone().load_torchvision_weights(path)


# ----------------------------------------------------------------- VGG16


def test_l2norm_scales_every_location_to_the_learned_norm() -> None:
    norm = L2Norm(512, scale=20.0)
    x = torch.randn(2, 512, 5, 7) * 3
    y = norm(x)
    torch.testing.assert_close(y.norm(dim=1), torch.full((2, 5, 7), 20.0))
    # direction is kept, and each channel uses its own scale
    with torch.no_grad():
        norm.weight.copy_(torch.arange(1.0, 513.0))
    y = norm(x)
    expected = x / x.norm(dim=1, keepdim=True) * torch.arange(1.0, 513.0).view(1, -1, 1, 1)
    torch.testing.assert_close(y, expected)
    y.sum().backward()
    assert norm.weight.grad is not None and norm.weight.grad.abs().sum() > 0


def test_l2norm_keeps_dtype_under_bf16() -> None:
    x = torch.randn(1, 512, 3, 3).bfloat16()
    y = L2Norm(512)(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float().norm(dim=1), torch.full((1, 3, 3), 20.0), rtol=2e-2, atol=0.0)


def test_vgg16_feature_keys_match_torchvision() -> None:
    ours = prefixed(VGG16Backbone().features, "features.")
    assert ours == torchvision_vgg16_feature_keys()


def test_vgg16_parameter_count_matches_torchvision_features() -> None:
    backbone = VGG16Backbone()
    assert sum(p.numel() for p in backbone.features.parameters()) == 14_714_688
    assert dict(backbone.named_parameters())["fc6.0.weight"].shape == (1024, 512, 3, 3)
    assert dict(backbone.named_parameters())["fc7.0.weight"].shape == (1024, 1024, 1, 1)


def test_vgg16_ssd_changes() -> None:
    features = VGG16Backbone().features
    pools = {i: m for i, m in enumerate(features) if isinstance(m, nn.MaxPool2d)}
    assert sorted(pools) == [4, 9, 16, 23, 30]
    assert pools[16].ceil_mode and not pools[4].ceil_mode
    assert (pools[30].kernel_size, pools[30].stride, pools[30].padding) == (3, 1, 1)
    fc6 = VGG16Backbone().fc6[0]
    assert fc6.dilation == (6, 6) and fc6.padding == (6, 6)


def test_vgg16_output_shapes_at_300() -> None:
    backbone = VGG16Backbone().eval()
    assert backbone.out_channels == [512, 1024] and backbone.strides == [8, 16]
    with torch.no_grad():
        maps = backbone(torch.randn(1, 3, 300, 300))
    assert [tuple(m.shape) for m in maps] == [(1, 512, 38, 38), (1, 1024, 19, 19)]
    torch.testing.assert_close(maps[0].norm(dim=1), torch.full((1, 38, 38), 20.0))


def _functional_ssd_vgg16(sd: dict[str, Tensor], fc: dict[str, Tensor], x: Tensor) -> list[Tensor]:
    """SSD's VGG16 (ssd.pytorch ``vgg()``) written from the keys."""
    index = 0
    for block, n in enumerate([2, 2, 3, 3, 3]):
        for _ in range(n):
            x = F.relu(F.conv2d(x, sd[f"features.{index}.weight"], sd[f"features.{index}.bias"], padding=1))
            index += 2
        if block == 3:
            conv4_3 = x
        if block == 2:
            x = F.max_pool2d(x, 2, 2, ceil_mode=True)
        elif block == 4:
            x = F.max_pool2d(x, 3, 1, 1)
        else:
            x = F.max_pool2d(x, 2, 2)
        index += 1
    x = F.relu(F.conv2d(x, fc["fc6.0.weight"], fc["fc6.0.bias"], padding=6, dilation=6))
    x = F.relu(F.conv2d(x, fc["fc7.0.weight"], fc["fc7.0.bias"]))
    return [conv4_3 / conv4_3.norm(dim=1, keepdim=True) * 20.0, x]


def test_vgg16_loads_torchvision_state_dict_and_converts_fc() -> None:
    sd = random_state_dict(torchvision_vgg16_feature_keys())
    # The classifier as broadcast views (no 400 MB allocation); fc6 rows encode their index.
    sd["classifier.0.weight"] = (torch.arange(4096.0)[:, None] * 1e-3).expand(4096, 25088)
    sd["classifier.0.bias"] = torch.arange(4096.0)
    sd["classifier.3.weight"] = (torch.arange(4096.0)[None, :] * 1e-3).expand(4096, 4096)
    sd["classifier.3.bias"] = -torch.arange(4096.0)
    sd["classifier.6.weight"] = torch.zeros(1000, 1).expand(1000, 4096)
    sd["classifier.6.bias"] = torch.zeros(1000)
    backbone = VGG16Backbone()
    load_torchvision_weights(backbone, sd)
    assert torch.equal(backbone.features[28].weight, sd["features.28.weight"])
    w6 = backbone.fc6[0].weight
    torch.testing.assert_close(w6[:, 0, 0, 0], torch.arange(0.0, 4096.0, 4.0) * 1e-3)
    torch.testing.assert_close(backbone.fc6[0].bias, torch.arange(0.0, 4096.0, 4.0))
    torch.testing.assert_close(backbone.fc7[0].weight[0, :, 0, 0], torch.arange(0.0, 4096.0, 4.0) * 1e-3)
    torch.testing.assert_close(backbone.fc7[0].bias, -torch.arange(0.0, 4096.0, 4.0))

    x = torch.randn(1, 3, 84, 84)  # pool3 on 21x21 -> 11x11 only with ceil mode
    fc = {k: v.detach() for k, v in backbone.state_dict().items() if k.startswith("fc")}
    with torch.no_grad():
        ours = backbone(x)
    expected = _functional_ssd_vgg16(sd, fc, x)
    assert ours[0].shape == (1, 512, 11, 11) and ours[1].shape == (1, 1024, 5, 5)
    for a, b in zip(ours, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_fc_to_conv_subsamples_inputs_and_taps() -> None:
    # Columns encode (channel, row, col) of the 512x7x7 pool5 grid: c * 49 + y * 7 + x.
    fc6 = torch.arange(25088.0)[None, :].expand(4096, 25088)
    fc7 = torch.arange(4096.0)[:, None].expand(4096, 4096)
    converted = fc_to_conv(fc6, torch.zeros(4096), fc7, torch.zeros(4096))
    w6 = converted["fc6.0.weight"]
    assert w6.shape == (1024, 512, 3, 3)
    c, y, x = 5, 2, 1
    assert w6[17, c, y, x].item() == c * 49 + (3 * y) * 7 + 3 * x
    assert converted["fc7.0.weight"].shape == (1024, 1024, 1, 1)
    assert converted["fc7.0.weight"][10, 3, 0, 0].item() == 40.0  # output row 4 * 10
    with pytest.raises(BackboneWeightsError, match="classifier.0.weight: \\(10, 10\\)"):
        fc_to_conv(torch.zeros(10, 10), torch.zeros(4096), fc7, torch.zeros(4096))


def test_vgg16_missing_feature_key_is_reported() -> None:
    sd = random_state_dict(torchvision_vgg16_feature_keys())
    del sd["features.10.bias"]
    with pytest.raises(BackboneWeightsError, match="missing keys \\(1\\): features.10.bias"):
        VGG16Backbone().load_torchvision_weights(sd)
