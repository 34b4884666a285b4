"""Exponential moving average of a model's weights (seed 002, DESIGN.md section 3).

    ema <- d_n * ema + (1 - d_n) * model,   d_n = min(decay, (1 + n) / (10 + n))

for the n-th update (n = 0, 1, ...). The ramp (0.1, 0.18, 0.25, ...) keeps the first, still
random, weights from dominating the average (seed 002, ``src/training/ema.py``); it reaches
``decay`` = 0.999 at n = 8990. The shadow starts as a copy of the model at
construction; after n updates that copy's weight in the average is prod_i d_i =
9! n! / (n + 9)!, e.g. 2e-4 after 6 updates, so it does not matter.

What is averaged (a deliberate choice): every floating-point tensor of ``model.state_dict()``,
i.e. the parameters AND the floating buffers such as BatchNorm's ``running_mean`` /
``running_var``, exactly as timm's ``ModelEmaV2`` and Ultralytics' ``ModelEMA`` do. The
running statistics then describe the averaged weights rather than the last ones; copying
them instead would pair the EMA weights with the statistics of a different network.
Integer buffers (``num_batches_tracked``) cannot be averaged and are copied.

Pass the bare model (``ddp.module``, the original module of a compiled model): the shadow is
keyed by ``state_dict`` names.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from onestage.config import EMAConfig


class ModelEMA:
    """Shadow copy of a model's floating parameters and buffers, updated by ``update``."""

    def __init__(self, model: nn.Module, decay: float = 0.999, start_step: int = 0, update_every: int = 1) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema.decay must be in [0, 1), got {decay}")
        if start_step < 0:
            raise ValueError(f"ema.start_step must be >= 0, got {start_step}")
        if update_every < 1:
            raise ValueError(f"ema.update_every must be >= 1, got {update_every}")
        self.decay = decay
        self.start_step = start_step
        self.update_every = update_every
        self.num_updates = 0
        with torch.no_grad():
            state = model.state_dict()
            self.shadow: dict[str, Tensor] = {k: v.detach().clone() for k, v in state.items() if isinstance(v, Tensor)}
        self._float_keys = [k for k, v in self.shadow.items() if v.is_floating_point()]
        self._other_keys = [k for k, v in self.shadow.items() if not v.is_floating_point()]

    @classmethod
    def from_config(cls, model: nn.Module, cfg: EMAConfig) -> ModelEMA:
        """Build from ``ema:`` of the experiment file (``enabled``/``use_for_eval`` are the trainer's)."""
        return cls(model, decay=cfg.decay, start_step=cfg.start_step, update_every=cfg.update_every)

    def decay_for(self, n: int) -> float:
        """Decay used for the update after ``n`` updates: min(decay, (1 + n) / (10 + n))."""
        return min(self.decay, (1.0 + n) / (10.0 + n))

    def should_update(self, step: int) -> bool:
        """Updates happen at start_step, start_step + update_every, ... (global optimizer steps)."""
        return step >= self.start_step and (step - self.start_step) % self.update_every == 0

    def _model_tensors(self, model: nn.Module) -> dict[str, Tensor]:
        state = model.state_dict()
        missing = [k for k in self.shadow if k not in state]
        if missing:
            raise KeyError(
                f"ModelEMA: the model lacks {len(missing)} tensors the EMA tracks (first: {missing[:3]}); "
                "pass the same bare model (not a DDP/compiled wrapper) that the EMA was built from"
            )
        return state

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> bool:
        """Fold the model's current weights into the average; False when this step is skipped."""
        if not self.should_update(step):
            return False
        state = self._model_tensors(model)
        d = self.decay_for(self.num_updates)
        shadow_f = [self.shadow[k] for k in self._float_keys]
        model_f = [state[k].detach().to(self.shadow[k].dtype) for k in self._float_keys]
        # ema = d * ema + (1 - d) * model, two fused multi-tensor kernels for the whole model.
        torch._foreach_mul_(shadow_f, d)
        torch._foreach_add_(shadow_f, model_f, alpha=1.0 - d)
        if self._other_keys:
            torch._foreach_copy_([self.shadow[k] for k in self._other_keys], [state[k] for k in self._other_keys])
        self.num_updates += 1
        return True

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite the model's weights with the EMA weights (e.g. before exporting)."""
        state = self._model_tensors(model)
        keys = list(self.shadow)
        torch._foreach_copy_([state[k] for k in keys], [self.shadow[k] for k in keys])

    @contextmanager
    def swap_into(self, model: nn.Module) -> Iterator[nn.Module]:
        """Evaluate with EMA weights: copy them in, yield, ALWAYS copy the training weights back.

        The restore runs in ``finally``, so an exception or a ``TerminationRequested`` raised
        by a SIGTERM during evaluation (see ``signals.raise_on_termination``) leaves the model
        holding its training weights. Costs one extra copy of the weights while inside.
        """
        state = self._model_tensors(model)
        keys = list(self.shadow)
        targets = [state[k] for k in keys]
        with torch.no_grad():
            backup = [t.detach().clone() for t in targets]
        try:
            with torch.no_grad():
                torch._foreach_copy_(targets, [self.shadow[k] for k in keys])
            yield model
        finally:
            with torch.no_grad():
                torch._foreach_copy_(targets, backup)

    def state_dict(self) -> dict[str, Any]:
        """Shadow tensors (loadable into the model with ``load_state_dict``) and the update count."""
        return {"shadow": dict(self.shadow), "num_updates": self.num_updates}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        shadow = state["shadow"]
        missing = sorted(set(self.shadow) - set(shadow))
        unexpected = sorted(set(shadow) - set(self.shadow))
        if missing or unexpected:
            raise KeyError(f"ModelEMA.load_state_dict: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
        for k, v in self.shadow.items():
            if shadow[k].shape != v.shape:
                raise ValueError(f"ModelEMA.load_state_dict: {k} has shape {tuple(shadow[k].shape)}, expected {tuple(v.shape)}")
            v.copy_(shadow[k])
        self.num_updates = int(state["num_updates"])
