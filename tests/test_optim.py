"""Optimizers (engine/optim.py): decay groups, optimizer options, gradient clipping."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from onestage.config import OptimConfig
from onestage.engine.optim import build_optimizer, clip_grad, param_groups


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)  # weight (4,3,3,3) decays; bias does not
        self.bn = nn.BatchNorm2d(4)  # weight, bias: no decay
        self.fc = nn.Linear(4, 2)  # weight (2,4) decays; bias does not
        self.ln = nn.LayerNorm(2)  # weight, bias: no decay
        self.gn = nn.GroupNorm(1, 2)  # weight, bias: no decay
        self.shared = self.fc  # the same module twice: its parameters counted once
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)  # not trainable: in no group


def _ids(ts: list[torch.Tensor]) -> set[int]:
    return {id(t) for t in ts}


def test_norm_and_bias_params_get_no_decay() -> None:
    m = Tiny()
    decay, no_decay = param_groups(m, 1e-4)
    assert decay["weight_decay"] == 1e-4 and no_decay["weight_decay"] == 0.0
    assert _ids(decay["params"]) == _ids([m.conv.weight, m.fc.weight])
    expected = [m.conv.bias, m.bn.weight, m.bn.bias, m.fc.bias, m.ln.weight, m.ln.bias, m.gn.weight, m.gn.bias]
    assert _ids(no_decay["params"]) == _ids(expected)
    assert (len(decay["params"]), len(no_decay["params"])) == (2, 8)


def test_no_trainable_parameters_is_an_error() -> None:
    m = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="Linear has no trainable parameters"):
        param_groups(m, 1e-4)


def test_sgd_options_arrive() -> None:
    opt = build_optimizer(Tiny(), OptimConfig(name="sgd", lr=0.02, momentum=0.8, nesterov=True, weight_decay=1e-3))
    assert isinstance(opt, torch.optim.SGD)
    assert [g["nesterov"] for g in opt.param_groups] == [True, True]
    assert [g["momentum"] for g in opt.param_groups] == [0.8, 0.8]
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-3, 0.0]
    assert [g["lr"] for g in opt.param_groups] == [0.02, 0.02]
    with pytest.raises(ValueError, match="optim.nesterov"):
        build_optimizer(Tiny(), OptimConfig(name="sgd", momentum=0.0, nesterov=True))


def test_adamw_options_arrive() -> None:
    opt = build_optimizer(Tiny(), OptimConfig(name="adamw", lr=1e-3, betas=(0.8, 0.95), weight_decay=0.05))
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["betas"] for g in opt.param_groups] == [(0.8, 0.95), (0.8, 0.95)]
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]


def test_decay_applies_only_to_the_decay_group() -> None:
    m = Tiny()
    with torch.no_grad():
        for p in m.parameters():
            p.fill_(2.0)
    opt = build_optimizer(m, OptimConfig(name="sgd", lr=1.0, momentum=0.0, weight_decay=0.25))
    for p in m.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    opt.step()
    # SGD with zero gradients: w <- w - lr * wd * w = 2 * (1 - 0.25) = 1.5 for decayed weights only
    assert m.conv.weight.unique().tolist() == [1.5]
    assert m.fc.weight.unique().tolist() == [1.5]
    assert m.bn.weight.unique().tolist() == [2.0] and m.fc.bias.unique().tolist() == [2.0]


def _with_grads(*grads: list[float]) -> list[nn.Parameter]:
    params = [nn.Parameter(torch.zeros(len(g))) for g in grads]
    for p, g in zip(params, grads):
        p.grad = torch.tensor(g)
    return params


def test_clip_grad_returns_norm_and_clips() -> None:
    params = _with_grads([3.0, 0.0], [4.0])
    assert clip_grad(params, None) == pytest.approx(5.0)
    assert params[0].grad.tolist() == [3.0, 0.0]  # not clipped without max_norm
    assert clip_grad(params, 1.0) == pytest.approx(5.0)  # the norm before clipping
    assert params[0].grad.tolist() == pytest.approx([0.6, 0.0], abs=1e-6)
    assert params[1].grad.tolist() == pytest.approx([0.8], abs=1e-6)
    assert clip_grad(params, 10.0) == pytest.approx(1.0, abs=1e-6)  # below max_norm: untouched
    assert params[1].grad.tolist() == pytest.approx([0.8], abs=1e-6)


def test_clip_grad_nonfinite_and_empty() -> None:
    params = _with_grads([float("inf"), 1.0], [2.0])
    assert math.isinf(clip_grad(params, 1.0))
    assert params[1].grad.tolist() == [2.0]  # left as is for the step's inf check
    assert clip_grad([nn.Parameter(torch.zeros(2))], 1.0) == 0.0
