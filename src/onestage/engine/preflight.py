"""Checks before a run starts: its folder, its checkpoint, its batch size.

A new run never reuses a folder silently, a resumed run is the run it claims to be, and a
batch the model cannot train on is refused before the first step.

- ``new_run_dir``: a run named by ``train.name`` refuses a folder that already holds a run
  (a ``config.yaml``, ``last.pt``, ``best.pt`` or ``metrics.csv`` in it) unless the user asks
  to overwrite it (``onestage train --overwrite``: the old run's files are deleted first, so
  no stale ``best.pt`` of the old run survives beside the new one). An unnamed run gets
  ``<config stem>-<time>``, with ``-2``, ``-3``... appended when two runs start within the
  same second, never a shared folder.
- ``check_resume``: ``--resume RUN_DIR`` compares the ``config.yaml`` of the folder with the
  config stored in its ``last.pt`` and refuses a disagreement (an edited ``config.yaml``, or
  a ``last.pt`` copied in from another run), naming the keys that differ.
- ``check_trainable_batch``: a batch the model cannot train on (BatchNorm in training mode
  with one value per channel) is refused before the first step, with the setting to change.
"""

from __future__ import annotations

import functools
import shutil
import time
from pathlib import Path
from typing import Any

import yaml
from torch import Tensor, nn

from onestage.config import ConfigError
from onestage.engine.checkpoint import CheckpointError, load_checkpoint
from onestage.models.layers import probe

RUN_FILES = ("config.yaml", "last.pt", "best.pt", "metrics.csv")


def holds_run(folder: Path) -> bool:
    """Whether ``folder`` holds the files of a training run."""
    return folder.is_dir() and any((folder / name).exists() for name in RUN_FILES)


def new_run_dir(out_dir: Path, name: str | None, default_stem: str, *, overwrite: bool = False) -> Path:
    """Create and return the folder of a new run (module docstring)."""
    out_dir = Path(out_dir)
    if name:
        run_dir = out_dir / name
        if holds_run(run_dir):
            if not overwrite:
                raise ConfigError(
                    f"train.name: {run_dir} already holds a run; continue it with `onestage train --resume "
                    f"{run_dir}`, choose another train.name, or pass --overwrite to replace it"
                )
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        return run_dir
    stem = f"{default_stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    for k in range(1, 1000):
        run_dir = out_dir / (stem if k == 1 else f"{stem}-{k}")
        try:
            run_dir.mkdir(parents=True, exist_ok=False)  # atomic: two runs never get one folder
            return run_dir
        except FileExistsError:
            continue
    raise ConfigError(f"train.out_dir: {out_dir} has 999 runs named {stem}*; set train.name")


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested mappings."""
    if isinstance(a, dict) and isinstance(b, dict):
        keys = sorted(set(a) | set(b), key=str)
        return [d for k in keys for d in _differences(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [prefix.rstrip(".")]


def check_resume(run_dir: Path) -> None:
    """Refuse to resume ``run_dir`` when its config.yaml and last.pt disagree (module docstring)."""
    run_dir = Path(run_dir)
    config_file, ckpt_file = run_dir / "config.yaml", run_dir / "last.pt"
    if not config_file.is_file():
        raise ConfigError(f"--resume {run_dir}: no config.yaml in it (not a run folder)")
    if not ckpt_file.is_file():
        raise CheckpointError(f"--resume {run_dir}: no last.pt in it (the run never saved a checkpoint)")
    # mmap: only the config string is read here, not the (possibly large) tensors.
    stored = load_checkpoint(ckpt_file, mmap=True).get("config")
    if not isinstance(stored, str):
        raise CheckpointError(f"{ckpt_file}: holds no config; it was not written by `onestage train`")
    try:
        folder_cfg = yaml.safe_load(config_file.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{config_file}: not valid YAML: {exc}") from exc
    differ = _differences(folder_cfg, yaml.safe_load(stored))
    if differ:
        shown = ", ".join(differ[:8]) + (f" and {len(differ) - 8} more" if len(differ) > 8 else "")
        raise ConfigError(
            f"--resume {run_dir}: config.yaml and last.pt disagree on {shown}; a resumed run must go on with "
            "the config its checkpoint was trained with (restore config.yaml, or start a new run from the weights)"
        )


def _record_single_values(found: list[str], name: str, module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
    x = inputs[0]
    if x.dim() >= 2 and x.numel() // x.shape[1] <= 1:  # values per channel with a batch of one
        found.append(name)


def check_trainable_batch(
    model: nn.Module, batch_size: int, world_size: int = 1, *, input_size: int, sync_bn: bool = False
) -> None:
    """Raise ``ConfigError`` when a training batch of ``batch_size`` images per process would
    give some BatchNorm layer one value per channel (its variance is undefined: PyTorch stops
    with "Expected more than 1 value per channel when training" at the first step).

    The batch statistics of a BatchNorm cover batch x height x width values (x world_size
    with SyncBatchNorm); a batch of two or more is always enough, and with one image only
    the layers fed 1x1 maps (SSD's last extra layers, a fully connected head) fail: they are
    found by one probe forward (eval mode, no gradient, statistics untouched).
    """
    images = batch_size * (world_size if sync_bn else 1)
    if images >= 2:
        return
    norms = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    found: list[str] = []
    hooks = [m.register_forward_pre_hook(functools.partial(_record_single_values, found, n)) for n, m in norms]
    try:
        probe(model, input_size)
    finally:
        for h in hooks:
            h.remove()
    if found:
        shown = ", ".join(found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
        raise ConfigError(
            f"train.batch_size: {images} image per BatchNorm batch is too few to train this model: BatchNorm "
            f"layer(s) {shown} would see 1 value per channel (batch x height x width), whose variance is "
            "undefined; use train.batch_size >= 2 (per process), or dist.sync_bn: true with several processes"
        )

