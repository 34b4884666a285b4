"""Optimizers and gradient clipping (seed 002: "AdamW / SGD"; DESIGN.md section 3).

Weight decay is applied to weight matrices and convolution kernels only. Normalization
layers' scale/shift and all biases are left undecayed: decaying them pulls BatchNorm's
gamma towards 0 and biases towards a value that has no regularizing meaning (Goyal et al.,
"Accurate, Large Minibatch SGD", 2017, section 5.1; timm's ``param_groups_weight_decay``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from onestage.config import OptimConfig

# Every normalization layer PyTorch ships (BatchNorm*, SyncBatchNorm and InstanceNorm* derive from _NormBase).
_NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two groups: ``decay`` (>= 2-d weights outside norm layers) and ``no_decay`` (the rest).

    Only trainable parameters (``requires_grad``) are included, each once even when shared.
    Both groups are always returned (possibly empty) so that optimizer state indices are
    stable across runs; ``name`` is kept in the group for logging.
    """
    decay: list[Tensor] = []
    no_decay: list[Tensor] = []
    seen: set[int] = set()
    for module in model.modules():
        is_norm = isinstance(module, _NORM_TYPES)
        for p in module.parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            # ndim <= 1: every bias, norm scale/shift, and learned scalars.
            (no_decay if is_norm or p.ndim <= 1 else decay).append(p)
    if not seen:
        raise ValueError(f"{type(model).__name__} has no trainable parameters to optimize")
    return [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """SGD (momentum, optional Nesterov) or AdamW over ``param_groups(model, cfg.weight_decay)``.

    The lr set here is ``cfg.lr``; the scheduler overwrites it every step.
    """
    groups = param_groups(model, cfg.weight_decay)
    if cfg.name == "sgd":
        if cfg.nesterov and cfg.momentum <= 0:
            raise ValueError(f"optim.nesterov: true needs optim.momentum > 0, got {cfg.momentum}")
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)
    raise ValueError(f"optim.name: unknown optimizer {cfg.name!r}; known: sgd, adamw")


def clip_grad(parameters: Iterable[Tensor], max_norm: float | None) -> float:
    """Total L2 norm of all gradients (for logging), clipping them to ``max_norm`` when given.

    Same math as ``torch.nn.utils.clip_grad_norm_`` (scale by max_norm / (norm + 1e-6) when
    larger), with fused multi-tensor kernels. A non-finite norm leaves the gradients
    untouched: scaling by 0 would turn inf into nan and finite gradients into zeros, hiding
    the problem; ``LossScaler.step`` then skips the step.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return 0.0
    norms = torch._foreach_norm(grads)
    total = torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))
    total_f = float(total)
    if max_norm is not None and math.isfinite(total_f) and total_f > max_norm:
        torch._foreach_mul_(grads, max_norm / (total_f + 1e-6))
    return total_f
