"""The backbone contract and loading of torchvision ImageNet weights.

A backbone is an ``nn.Module`` with
- ``out_channels: list[int]``: channels of each returned map,
- ``strides: list[int]``: input pixels per map cell, finest first,
- ``forward(x (B, 3, H, W)) -> list[Tensor]``: one (B, out_channels[i], H_i, W_i) map per stride.

Our backbones keep torchvision's module tree under ``self.features`` so that the
``state_dict`` of a torchvision ImageNet model (``mobilenet_v2``, ``vgg16``) loads into them
directly; torchvision itself is not a dependency (DESIGN.md section 4).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

StateDictSource = Mapping[str, Tensor] | str | Path


class BackboneWeightsError(ValueError):
    """A weights file or state_dict that does not fit the backbone; the message says why."""


class Backbone(nn.Module):
    """Base class: the contract attributes plus torchvision weight loading.

    Subclasses set ``out_channels`` and ``strides`` and build ``self.features`` with
    torchvision's layout. Prefixes listed in ``ignored_torchvision_prefixes`` (the ImageNet
    classifier) are dropped when loading; every other key must start with ``features.``.
    """

    out_channels: list[int]
    strides: list[int]
    features: nn.Sequential
    ignored_torchvision_prefixes: tuple[str, ...] = ("classifier.",)

    def load_torchvision_weights(self, source: StateDictSource) -> None:
        """Load a torchvision ImageNet ``state_dict`` (or a file holding one) strictly.

        ``features.*`` must match ``self.features`` key for key and shape for shape;
        otherwise a ``BackboneWeightsError`` lists every missing key, unexpected key and
        shape mismatch at once.
        """
        state_dict = read_state_dict(source)
        load_prefixed_strict(self.features, state_dict, "features.", self.ignored_torchvision_prefixes)


def read_state_dict(source: StateDictSource) -> dict[str, Tensor]:
    """A state_dict given directly, or read from a file with ``torch.load(weights_only=True)``.

    ``weights_only=True``: an untrusted checkpoint file must not be able to run code.
    """
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise BackboneWeightsError(f"{path}: no such weights file")
        loaded = torch.load(path, map_location="cpu", weights_only=True)
        origin = str(path)
    else:
        loaded = source
        origin = "the given state_dict"
    if not isinstance(loaded, Mapping):
        raise BackboneWeightsError(f"{origin}: expected a state_dict (a mapping of names to tensors), got {type(loaded).__name__}")
    not_tensors = [k for k, v in loaded.items() if not isinstance(v, Tensor)]
    if not_tensors:
        raise BackboneWeightsError(
            f"{origin}: expected a state_dict of tensors, but these entries are not tensors: "
            f"{_preview(not_tensors)} (a training checkpoint? pass its model state_dict)"
        )
    return dict(loaded)


def load_prefixed_strict(
    module: nn.Module,
    state_dict: Mapping[str, Tensor],
    prefix: str,
    ignored_prefixes: tuple[str, ...] = (),
) -> None:
    """Load the ``prefix``-ed entries of ``state_dict`` into ``module``, strictly.

    Entries under ``ignored_prefixes`` are dropped; any other entry outside ``prefix`` is
    unexpected. BatchNorm ``num_batches_tracked`` may be absent (checkpoints saved before
    PyTorch 0.4.1 lack it; ``BatchNorm._load_from_state_dict`` fills it in).
    """
    own = module.state_dict()
    given: dict[str, Tensor] = {}
    unexpected: list[str] = []
    for key, value in state_dict.items():
        if key.startswith(prefix):
            given[key[len(prefix) :]] = value
        elif not key.startswith(ignored_prefixes):
            unexpected.append(key)
    missing = [prefix + k for k in own if k not in given and not k.endswith("num_batches_tracked")]
    unexpected += [prefix + k for k in given if k not in own]
    mismatched = [
        f"{prefix}{k}: file {tuple(v.shape)}, model {tuple(own[k].shape)}"
        for k, v in given.items()
        if k in own and v.shape != own[k].shape
    ]
    if missing or unexpected or mismatched:
        lines = [f"weights do not fit {type(module).__name__} (expected torchvision's '{prefix}*' layout):"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {_preview(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {_preview(unexpected)}")
        if mismatched:
            lines.append(f"  shape mismatches ({len(mismatched)}): {_preview(mismatched)}")
        raise BackboneWeightsError("\n".join(lines))
    module.load_state_dict(given, strict=True)


def load_torchvision_weights(backbone: Backbone, state_dict_or_path: StateDictSource) -> None:
    """Load torchvision ImageNet weights into one of our backbones (see ``Backbone``)."""
    backbone.load_torchvision_weights(state_dict_or_path)


def _preview(items: list[str], limit: int = 20) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def init_conv_bn(module: nn.Module, *, mode: str = "fan_out", leaky_slope: float = 0.0) -> None:
    """He initialization for every conv of ``module`` (He et al. 2015, eq. 15: gain for a
    ReLU, or a leaky ReLU of slope ``leaky_slope``), zero conv biases, BatchNorm as identity.
    ``mode="fan_out"`` as torchvision's MobileNetV2/VGG/ResNet, ``"fan_in"`` as Darknet ports."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, a=leaky_slope, mode=mode, nonlinearity="leaky_relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
