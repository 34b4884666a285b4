"""The training loop (seed 002): one loop, readable top to bottom.

``train`` = ``_set_up`` (data, model, the precision chosen by measurement, optimizer,
schedule, scaler, EMA, a resumed state, the budget planner) then, epoch by epoch,
``_train_epoch`` (steps: ``_forward_backward``, ``_optimizer_step``, ``_after_step``) and
``_end_of_epoch`` (validation, checkpoints, the stop decision; every stop goes through ``_stop``).

Per step: batch -> forward under autocast -> assignment + loss (fp32 where forced) ->
scaled backward -> unscale, clip -> optimizer step (skipped on non-finite gradients) ->
EMA update -> LR for the next step. Per epoch: validation mAP with the EMA weights, last and
best checkpoints, metrics.csv. SIGTERM / Ctrl-C: the current step finishes, a resumable
checkpoint is written, and the run exits with a message saying how to resume.

Several processes (torchrun; ``engine/distributed.py``): the same loop on every rank, the
model wrapped in DDP for the training forward only. Each rank takes its share of the same
epoch permutation (``EpochSampler``) with ``train.batch_size`` images per step; the SSD loss
divides by the positives of the global batch; loss values are averaged over ranks before
the non-finite check, so all ranks skip the same steps; a SIGTERM or the time budget
(``engine/budget.py``: the whole run, rank 0's clock) is agreed on once per step; validation is sharded and its metric broadcast. Rank 0 alone writes
files and prints. A failed collective (a dead or stuck rank) raises ``TrainingError``.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

import onestage
from onestage.build import build_datasets, build_detector
from onestage.families import Detector
from onestage.config import Config, dump_config, load_config
from onestage.data.base import DetectionDataset, collate
from onestage.data.mosaic import mosaic_closed
from onestage.engine import distributed as dist
from onestage.engine.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from onestage.engine.budget import BudgetPlanner
from onestage.engine.calibrate import PrecisionDecision, mode_key, resolve_precision
from onestage.engine.ema import ModelEMA
from onestage.engine.evaluate import evaluate
from onestage.engine.optim import build_optimizer, clip_grad
from onestage.engine.preflight import check_resume, check_trainable_batch, new_run_dir
from onestage.engine.precision import LossScaler, autocast_context
from onestage.engine.schedule import LRScheduler
from onestage.engine.signals import (
    TerminationRequested,
    handle_termination,
    raise_on_termination,
    termination_requested,
)


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. too many non-finite losses in a row)."""


class EpochSampler(Sampler[int]):
    """A permutation per epoch drawn from (seed, epoch), started at ``start`` samples in.

    Deterministic and stateless, so a run resumed in the middle of an epoch sees exactly the
    samples the interrupted run would have seen next.

    Under DDP (rank r of W processes) every rank draws the same permutation, cut to a multiple
    of W, and takes its positions r, r + W, r + 2W, ... With a per-process batch B, step k of
    rank r holds positions kWB + r + Wj (j < B), so the union over ranks of step k is the
    positions [kWB, (k+1)WB): exactly the batch that one process with batch WB takes at step
    k (the single-process image i of that batch is rank i mod W's image i // W). Every rank
    gets the same number of samples, so no rank waits for a step the others never take.
    ``start`` counts positions of the whole permutation (a multiple of W when resuming).
    """

    def __init__(self, size: int, seed: int, shuffle: bool = True, rank: int = 0, world_size: int = 1) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"EpochSampler: rank {rank} is not in [0, {world_size})")
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch, self.start = 0, 0

    @property
    def shard_size(self) -> int:
        """Samples each rank gets in a whole epoch (the dataset size in one process)."""
        return self.size // self.world_size

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = list(range(self.size))
        usable = self.shard_size * self.world_size
        return iter(order[self.start + self.rank : usable : self.world_size])

    def __len__(self) -> int:
        return len(range(self.start + self.rank, self.shard_size * self.world_size, self.world_size))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class MetricsLog:
    """metrics.csv: one row per logged step and per epoch; columns grow as new keys appear.

    Rewritten whole (atomically) on each flush, so the file is always a valid CSV. With
    ``write=False`` (ranks other than 0) rows are kept (they go into checkpoints) but never written.
    """

    def __init__(self, path: Path, rows: list[dict[str, Any]] | None = None, write: bool = True) -> None:
        self.path = path
        self.rows: list[dict[str, Any]] = rows or []
        self.write = write
        self.tensorboard = _tensorboard_writer(path.parent / "tensorboard") if write else None

    def log(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if self.tensorboard is not None:
            prefix = "train" if row.get("kind") == "step" else "val"
            for key, value in row.items():
                if key not in ("kind", "step", "epoch") and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(f"{prefix}/{key}", value, global_step=int(row["step"]))
            self.tensorboard.flush()

    def flush(self) -> None:
        if not self.write:
            return
        columns: list[str] = []
        for row in self.rows:
            columns += [k for k in row if k not in columns]
        tmp = self.path.with_suffix(".csv.tmp")
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(self.rows)
        os.replace(tmp, self.path)


def _tensorboard_writer(log_dir: Path):
    """TensorBoard events next to metrics.csv when the tensorboard package is installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional: metrics.csv and the PNG plots always exist
        return None
    return SummaryWriter(str(log_dir))


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch
    batch_in_epoch: int = 0  # batches of the current epoch already consumed
    best_value: float = -math.inf
    nonfinite_in_row: int = 0
    nonfinite_total: int = 0
    elapsed: float = 0.0  # training seconds before this process (time budget)
    mosaic_closed: bool = False  # data.augment.close_mosaic reached (decided at epoch starts)
    history: list[dict[str, Any]] = field(default_factory=list)


def make_run_dir(cfg: Config, config_path: str | Path | None, overwrite: bool = False) -> Path:
    """A new run's folder; an existing ``train.name`` run is refused unless ``overwrite`` (engine/preflight.py)."""
    return new_run_dir(cfg.train.out_dir, cfg.train.name, Path(config_path).stem if config_path else "run",
                       overwrite=overwrite)


def _loader(dataset: DetectionDataset, sampler: EpochSampler, cfg: Config) -> DataLoader:
    return DataLoader(
        dataset, batch_size=cfg.train.batch_size, sampler=sampler, num_workers=cfg.data.num_workers,
        collate_fn=collate, drop_last=sampler.shard_size >= cfg.train.batch_size,
        persistent_workers=False,  # new workers each epoch pick up dataset.epoch
        worker_init_fn=_worker_init if cfg.data.num_workers > 0 else None,
    )


def _worker_init(worker_id: int) -> None:
    """Data-loader workers: one OpenCV thread each, so that they do not fight the training
    threads for the cores. (Randomness needs nothing here: every sample is seeded by
    (seed, epoch, index) in ``DetectionDataset``, whichever worker draws it.)"""
    import cv2

    cv2.setNumThreads(1)


@dataclass
class Run:
    """Everything one training run holds, built once by ``_set_up`` (the loop's working set)."""

    cfg: Config
    run_dir: Path
    device: torch.device
    world: int
    main: bool
    progress: bool
    train_ds: DetectionDataset
    val_ds: DetectionDataset
    detector: Detector
    model: nn.Module  # the bare model (evaluation, EMA, checkpoints)
    ddp_model: nn.Module  # the training forward (DDP-wrapped under torchrun)
    sampler: EpochSampler
    loader: DataLoader
    optimizer: torch.optim.Optimizer
    scheduler: LRScheduler
    scaler: LossScaler
    ema: ModelEMA | None
    state: TrainState
    metrics: MetricsLog
    budget: BudgetPlanner | None
    train_mosaic: Any  # the training set's mosaic, switched off by close_mosaic
    start_time: float = field(default_factory=time.perf_counter)

    @property
    def batches_per_epoch(self) -> int:
        return len(self.loader)

    def say(self, message: str) -> None:  # console messages: rank 0 only
        if self.main:
            tqdm.write(message)

    def warn(self, message: str) -> None:
        if self.main:
            print(message, file=sys.stderr)

    def elapsed(self) -> float:
        return time.perf_counter() - self.start_time

    def save(self, name: str) -> None:
        """Write ``name`` (last.pt / best.pt) atomically; rank 0 only."""
        if not self.main:
            return
        self.state.history = self.metrics.rows
        self.state.elapsed = self.elapsed()
        save_checkpoint(self.run_dir / name, _checkpoint_state(self))

    def validate(self) -> dict[str, float]:
        """Validation metrics with the EMA weights (when used); the training weights come back."""
        ema, cfg = self.ema, self.cfg
        swap = ema.swap_into(self.model) if (ema is not None and cfg.ema.use_for_eval) else contextlib.nullcontext()
        # One process: a signal interrupts validation at once. Several: validation is a collective,
        # so a signal only sets the flag, which the ranks agree on at the next step.
        interruptible = raise_on_termination() if self.world == 1 else contextlib.nullcontext()
        with interruptible, swap:
            result, _ = evaluate(self.detector, self.val_ds, cfg, self.device, progress=self.progress)
        return result.metrics


def _checkpoint_state(run: Run) -> dict[str, Any]:
    state = run.state
    return {
        "version": onestage.__version__,
        "config": dump_config(run.cfg),
        "class_names": run.detector.class_names,
        "model": run.model.state_dict(),
        "ema": run.ema.state_dict() if run.ema is not None else None,
        "optimizer": run.optimizer.state_dict(),
        "scaler": run.scaler.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "rng": rng_state(),
        "step": state.step,
        "epoch": state.epoch,
        "batch_in_epoch": state.batch_in_epoch,
        "best_metric": run.cfg.train.best_metric,
        "best_value": state.best_value,
        "nonfinite_total": state.nonfinite_total,
        "elapsed": state.elapsed,
        "mosaic_closed": state.mosaic_closed,
        "history": state.history,
        "world_size": run.world,  # a mid-epoch position means nothing for another count
    }


def train(
    cfg: Config,
    run_dir: Path,
    resume: bool = False,
    progress: bool = True,
    max_steps: int | None = None,
    device: torch.device | None = None,
) -> dict[str, Any]:
    """Train ``cfg`` in ``run_dir`` (resuming from ``run_dir/last.pt`` when ``resume``).

    ``max_steps`` stops early after that many optimizer steps in total (smoke tests and the
    resume test), leaving a resumable checkpoint. Returns a summary dict; with a time budget,
    ``budget_left_s`` is what is left of it for the final evaluation.

    Under torch.distributed (``distributed.init_distributed`` called first, as ``onestage
    train`` does under torchrun) every rank calls this with the same arguments; see the
    module docstring. A failed collective raises ``TrainingError`` naming the rank.
    """
    with dist.collective_failures_as(TrainingError):
        run = _set_up(cfg, run_dir, resume, progress, device)
        run.model.train()
        with handle_termination():
            stop_reason = None
            while stop_reason is None:
                if run.budget is None and run.state.epoch >= cfg.train.epochs:
                    stop_reason = "finished"
                    break
                stop_reason = _end_of_epoch(run, _train_epoch(run, max_steps), max_steps)
        run.metrics.flush()
        return _summary(run, stop_reason)


# ----------------------------------------------------------------------------- set-up
def _set_up(cfg: Config, run_dir: Path, resume: bool, progress: bool, device: torch.device | None) -> Run:
    """Data, model, optimizer, schedule, scaler, EMA and state (restored when resuming)."""
    clock_start = time.perf_counter()  # the time budget counts the set-up too
    rank, world, main = dist.rank(), dist.world_size(), dist.is_main()
    device = device or dist.device()
    # Per-rank seeds (rank 0 uses cfg.seed, as a single process does); the weights still start
    # equal everywhere, as DDP copies rank 0's to the others. Augmentation does not use these:
    # each sample is seeded by (seed, epoch, index), whichever rank draws it.
    seed_everything(cfg.seed + rank)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "version.txt").write_text(f"onestage {onestage.__version__}\ntorch {torch.__version__}\n")

    train_ds, val_ds, train_spec, val_spec = build_datasets(cfg)
    for spec, split in ((train_spec, "train"), (val_spec, "val")):
        if len(spec.problems) and main:
            print(f"[data] {split}: {spec.problems.summary()}", file=sys.stderr)
    train_ds.seed = cfg.seed
    detector = build_detector(
        cfg, train_ds.class_names, positives_normalizer=dist.positives_across_ranks if world > 1 else None
    )
    model = detector.model.to(device)
    check_trainable_batch(
        model, min(cfg.train.batch_size, len(train_ds) // world), world, input_size=cfg.model.input_size,
        sync_bn=cfg.dist.sync_bn,
    )
    # Measured on rank 0 alone, so before SyncBatchNorm (whose forward is a collective) goes in.
    decision = _choose_precision(cfg, model, device, run_dir, main)
    cfg = cfg.model_copy(update={"precision": decision.apply(cfg.precision)})  # concrete from here on
    if cfg.dist.sync_bn and world > 1:
        detector.model = model = dist.convert_sync_batchnorm(model, device)
    if cfg.precision.channels_last:
        model = model.to(memory_format=torch.channels_last)
    detector.criterion.to(device)
    # DDP copies rank 0's weights to every rank here: before the EMA takes its first copy.
    ddp_model = dist.wrap_ddp(model, device)  # the training forward only; `model` stays the bare one
    if main:
        (run_dir / "config.yaml").write_text(dump_config(cfg))

    sampler = EpochSampler(len(train_ds), cfg.seed, rank=rank, world_size=world)
    loader = _loader(train_ds, sampler, cfg)
    steps_per_epoch = max(1, len(loader) // cfg.train.accumulate)
    # Linear scaling rule (Goyal et al. 2017, section 2.1) when asked: the global batch is
    # `world` times the per-process one, so is the learning rate.
    lr_factor = world if cfg.dist.scale_lr else 1
    schedule_cfg = cfg.schedule.model_copy(update={"min_lr": cfg.schedule.min_lr * lr_factor})
    optimizer = build_optimizer(model, cfg.optim)
    total_steps = cfg.train.epochs * steps_per_epoch
    if cfg.train.time_budget:
        # A placeholder until the first steps measure the pace (re-planned every step; a resumed
        # run restores its own); long enough that the warmup is not mistaken for the whole run.
        total_steps = max(total_steps, 10 * cfg.schedule.warmup_steps + 1)
    scheduler = LRScheduler(optimizer, schedule_cfg, cfg.optim.lr * lr_factor, total_steps)
    ema = ModelEMA.from_config(model, cfg.ema) if cfg.ema.enabled else None
    run = Run(
        cfg=cfg, run_dir=run_dir, device=device, world=world, main=main, progress=progress and main,
        train_ds=train_ds, val_ds=val_ds, detector=detector, model=model,
        ddp_model=ddp_model,
        sampler=sampler, loader=loader, optimizer=optimizer, scheduler=scheduler,
        scaler=LossScaler(cfg.precision, device), ema=ema, state=TrainState(),
        metrics=MetricsLog(run_dir / "metrics.csv", write=main), budget=None, train_mosaic=train_ds.mosaic,
        start_time=clock_start,
    )
    if resume:
        _restore(run, rank)
        run.start_time -= run.state.elapsed  # time_s and the summary count the whole run
    if cfg.train.time_budget:
        val_batches = math.ceil(len(val_ds) / (cfg.train.batch_size * world))
        run.budget = BudgetPlanner(
            cfg.train.time_budget * 60, val_batches, steps_per_epoch * cfg.train.eval_every,
            val_share=cfg.train.val_budget_share,
            elapsed_before=run.elapsed(),  # the set-up counts, and a resumed run's earlier time
            # A fresh calibration's step time; a cached one may come from a busier (or idler) day.
            step_estimate=None if decision.cached else decision.timings.get(mode_key(decision.dtype, decision.channels_last)),
        )
    return run


def _choose_precision(cfg: Config, model: nn.Module, device: torch.device, run_dir: Path, main: bool) -> PrecisionDecision:
    """The precision of this run (``precision.amp: auto`` measured, ``engine/calibrate.py``),
    decided once by rank 0 for every rank, printed with its reason and written to precision.json."""
    shape = (cfg.train.batch_size, 3, cfg.model.input_size, cfg.model.input_size)
    decision = resolve_precision(cfg.precision, model, shape, device, train=True) if main else None
    decision = dist.broadcast_object(decision)
    if main:
        print(f"[{decision.reason}]", file=sys.stderr)
        if decision.warning:
            print(f"[warn] {decision.warning}", file=sys.stderr)
        (run_dir / "precision.json").write_text(json.dumps(decision.to_json(), indent=2))
    return decision


def _restore(run: Run, rank: int) -> None:
    """Resume from ``run_dir/last.pt``: weights, EMA, optimizer, scaler, schedule, RNG, position."""
    # Every rank loads the same file (the run folder must be shared, or copied to every machine).
    path = run.run_dir / "last.pt"
    ckpt = load_checkpoint(path, map_location=run.device)
    saved_world = int(ckpt.get("world_size", 1))
    if saved_world != run.world:
        # Steps per epoch, the position inside the epoch and the planned schedule length all
        # count global batches of the saved size: they mean something else with another count.
        raise TrainingError(
            f"{path} was written by a run of {saved_world} process(es); resume it with "
            f"{saved_world} (this run has {run.world}), or start a new run from its weights"
        )
    run.model.load_state_dict(ckpt["model"])
    if run.ema is not None and ckpt["ema"] is not None:
        run.ema.load_state_dict(ckpt["ema"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.scaler.load_state_dict(ckpt["scaler"])
    run.scheduler.load_state_dict(ckpt["scheduler"])
    run.state = TrainState(
        step=ckpt["step"], epoch=ckpt["epoch"], batch_in_epoch=ckpt["batch_in_epoch"],
        best_value=ckpt["best_value"], nonfinite_total=ckpt["nonfinite_total"],
        elapsed=ckpt["elapsed"], history=list(ckpt["history"]),
        mosaic_closed=bool(ckpt.get("mosaic_closed", False)),
    )
    run.metrics.rows = list(run.state.history)
    set_rng_state(ckpt["rng"])  # rank 0's generators
    if rank > 0:  # the other ranks draw their own streams again, reproducibly
        seed_everything(int(np.random.SeedSequence([run.cfg.seed, rank, run.state.step]).generate_state(1)[0]))
    run.warn(f"[resume] {path}: step {run.state.step}, epoch {run.state.epoch + 1}")


# ----------------------------------------------------------------------------- one epoch
def _start_epoch(run: Run) -> None:
    """Mosaic on or off, the sampler's position (mid-epoch when resuming), the loss gradients cleared."""
    state, cfg = run.state, run.cfg
    run.train_ds.epoch = state.epoch
    if state.batch_in_epoch == 0 and not state.mosaic_closed:
        # Decided at epoch starts only (and kept in the checkpoint): a time-budget run
        # re-plans its length every step, and a resumed epoch must see what it saw.
        state.mosaic_closed = mosaic_closed(state.step, run.scheduler.total_steps, cfg.data.augment.close_mosaic)
        if state.mosaic_closed and run.train_mosaic is not None:
            run.say(f"step {state.step}: mosaic off for the rest of training (data.augment.close_mosaic)")
    run.train_ds.mosaic = None if state.mosaic_closed else run.train_mosaic
    run.sampler.set_epoch(state.epoch, start=state.batch_in_epoch * cfg.train.batch_size * run.world)
    run.optimizer.zero_grad(set_to_none=True)


def _train_epoch(run: Run, max_steps: int | None) -> str | None:
    """Train the rest of the current epoch. Returns why it ended early ("terminated",
    "max_steps", "time_budget") or None when every batch was seen."""
    state, cfg = run.state, run.cfg
    if run.budget is not None and run.budget.step_times and not run.budget.next_step_fits():
        return "time_budget"  # the measured pace says the epoch's first step would not fit
    _start_epoch(run)
    bar = tqdm(
        total=run.batches_per_epoch, initial=state.batch_in_epoch, disable=not run.progress, dynamic_ncols=True,
        desc=f"epoch {state.epoch + 1}" + (f"/{cfg.train.epochs}" if run.budget is None else ""),
    )
    reason = None
    last_step_end: float | None = None  # the data loading between steps counts toward the pace
    for batch in run.loader:
        t0 = time.perf_counter()
        ends_cycle = (state.batch_in_epoch + 1) % cfg.train.accumulate == 0
        loss_values = _forward_backward(run, batch, ends_cycle)
        state.batch_in_epoch += 1
        bar.update(1)
        if loss_values is None or not ends_cycle:
            continue
        lr, grad_norm = _optimizer_step(run)
        now = time.perf_counter()
        step_time = now - (last_step_end if last_step_end is not None else t0)
        last_step_end = now
        reason = _after_step(run, step_time, max_steps)
        images_per_s = batch["images"].shape[0] * run.world / (now - t0)
        bar.set_postfix(
            {k[5:]: f"{v:.3f}" for k, v in loss_values.items()} | {"lr": f"{lr:.2e}", "img/s": f"{images_per_s:.1f}"},
            refresh=False,
        )
        if state.step % cfg.train.log_every == 0 or state.step == 1:
            run.metrics.log(
                {"kind": "step", "step": state.step, "epoch": state.epoch + 1, **loss_values, "lr": lr,
                 "grad_norm": grad_norm, "skipped_steps": run.scaler.skipped_steps,
                 "nonfinite_steps": state.nonfinite_total, "images_per_s": images_per_s, "time_s": run.elapsed()}
            )
            run.metrics.flush()  # a small file: rewriting it keeps it readable at any moment
        if reason is not None:
            break
    bar.close()
    return reason


def _forward_backward(run: Run, batch: dict[str, Tensor], ends_cycle: bool) -> dict[str, float] | None:
    """Forward under autocast, the loss, the scaled backward. Returns the loss values averaged
    over ranks, or None when the loss was not finite (the batch is skipped and counted)."""
    cfg, state, device = run.cfg, run.state, run.device
    run.scheduler.step(state.step)
    images = batch["images"].to(device, non_blocking=True)
    if cfg.precision.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    boxes, labels = batch["boxes"].to(device), batch["labels"].to(device)
    with dist.no_sync(run.ddp_model, skip_sync=not ends_cycle):
        with autocast_context(cfg.precision, device):
            outputs = run.ddp_model(images)
        losses = run.detector.criterion(outputs, boxes, labels)  # fp32 where forced (inside)
        # Averaged over ranks (the global batch's loss), and the same verdict on every rank.
        loss_values = {f"loss_{k}": v for k, v in dist.mean_over_ranks(
            {k: v for k, v in losses.items() if k != "num_pos"}).items()}
        if not math.isfinite(loss_values["loss_total"]):
            state.nonfinite_in_row += 1
            state.nonfinite_total += 1
            run.optimizer.zero_grad(set_to_none=True)
            run.say(f"[warn] step {state.step}: non-finite loss ({loss_values['loss_total']}), step skipped")
            if state.nonfinite_in_row >= cfg.train.max_nonfinite_steps:
                raise TrainingError(
                    f"{state.nonfinite_in_row} non-finite losses in a row (train.max_nonfinite_steps); "
                    "lower optim.lr, check the data with `onestage data check`, or disable precision.amp"
                )
            return None
        state.nonfinite_in_row = 0
        run.scaler.scale(losses["total"] / cfg.train.accumulate).backward()
    return loss_values


def _optimizer_step(run: Run) -> tuple[float, float]:
    """Unscale, clip, step (skipped on non-finite gradients), EMA. Returns (lr, gradient norm)."""
    run.scaler.unscale_(run.optimizer)
    grad_norm = clip_grad(run.model.parameters(), run.cfg.train.grad_clip)
    applied = run.scaler.step(run.optimizer)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    dist.broadcast_buffers(run.model)  # BatchNorm statistics: rank 0's everywhere (EMA, eval, checkpoint)
    if run.ema is not None and applied:
        run.ema.update(run.model, run.state.step)
    run.state.step += 1
    return run.scheduler.last_lr, grad_norm


def _after_step(run: Run, step_time: float, max_steps: int | None) -> str | None:
    """Re-plan the schedule over the budget and decide whether to stop after this step."""
    out_of_time, planned = False, 0
    if run.budget is not None:
        run.budget.record_step(step_time)
        planned = run.budget.planned_total_steps(run.state.step)
        out_of_time = not run.budget.next_step_fits()
    # A signal seen by any rank stops all; rank 0's clock rules the budget and the schedule.
    stop_now, (out_of_time_f, planned_f) = dist.agree(termination_requested(), [out_of_time, planned])
    if run.budget is not None:
        run.scheduler.set_total_steps(int(planned_f))
    if stop_now:
        return "terminated"
    if max_steps is not None and run.state.step >= max_steps:
        return "max_steps"
    return "time_budget" if out_of_time_f > 0 else None


# ----------------------------------------------------------------------------- end of an epoch
def _end_of_epoch(run: Run, reason: str | None, max_steps: int | None) -> str | None:
    """Validation, checkpoints and the stop decision after an epoch (or a part of one).

    Returns the run's stop reason, or None to go on with the next epoch.
    """
    state, cfg = run.state, run.cfg
    epoch_done = state.batch_in_epoch >= run.batches_per_epoch
    if reason is None and run.budget is not None and not run.budget.next_step_fits():
        reason = "time_budget"  # the epoch's last step used up the time
    terminate, _ = dist.agree(reason == "terminated" or termination_requested())
    if terminate:
        return _stop(run, "terminated", f"\n[stopped] checkpoint written; resume with: onestage train --resume {run.run_dir}")
    if reason == "max_steps" and not epoch_done:
        return _stop(run, "max_steps")
    last = (run.budget is None and state.epoch + 1 >= cfg.train.epochs) or reason == "time_budget"
    if _validation_due(run, last):
        try:
            values = _validate_and_log(run)
        except TerminationRequested:
            # The epoch's steps are done; a resumed run starts with this validation.
            return _stop(run, "terminated", f"\n[stopped] during validation; resume with: onestage train --resume {run.run_dir}")
        state.epoch, state.batch_in_epoch = state.epoch + 1, 0
        if values[cfg.train.best_metric] > state.best_value:  # the same metric on every rank (broadcast)
            state.best_value = values[cfg.train.best_metric]
            run.save("best.pt")
    else:
        state.epoch, state.batch_in_epoch = state.epoch + 1, 0
    if reason == "time_budget":
        return _stop(run, "time_budget", run.budget.stop_message(state.step, cfg.schedule.warmup_steps))
    if reason == "max_steps":
        return _stop(run, "max_steps")
    run.save("last.pt")
    run.metrics.flush()
    return None


def _validation_due(run: Run, last: bool) -> bool:
    """Every ``train.eval_every`` epochs and at the end; with a budget, only while validation
    stays within its share of the time (``BudgetPlanner.should_validate``), and always at the end."""
    if last:
        return True
    if (run.state.epoch + 1) % run.cfg.train.eval_every != 0:
        return False
    if run.budget is None:
        return True
    _, (due,) = dist.agree(False, [run.budget.should_validate()])
    return due > 0


def _validate_and_log(run: Run) -> dict[str, float]:
    t0 = time.perf_counter()
    values = run.validate()
    if run.budget is not None:
        run.budget.record_validation(time.perf_counter() - t0)
    state, key = run.state, run.cfg.train.best_metric
    run.metrics.log({"kind": "epoch", "step": state.step, "epoch": state.epoch + 1, **values, "time_s": run.elapsed()})
    if key not in values:
        raise TrainingError(f"train.best_metric: {key!r} is not computed; available: {sorted(values)}")
    run.say(f"epoch {state.epoch + 1}: " + ", ".join(f"{k}={v:.4f}" for k, v in values.items() if k.startswith(("voc", "coco"))))
    return values


def _stop(run: Run, reason: str, message: str | None = None) -> str:
    """The one way a run stops early or on time: a resumable last.pt, metrics flushed, a message."""
    run.save("last.pt")
    run.metrics.flush()
    if message:
        run.warn(message)
    return reason


def _summary(run: Run, stop_reason: str) -> dict[str, Any]:
    state, cfg = run.state, run.cfg
    summary = {
        "run_dir": str(run.run_dir),
        "steps": state.step,
        "epochs": state.epoch,
        "best_metric": cfg.train.best_metric,
        "best_value": state.best_value,
        "stop_reason": stop_reason,
        "skipped_steps": run.scaler.skipped_steps,
        "nonfinite_steps": state.nonfinite_total,
        "seconds": run.elapsed(),
        "images_seen": state.step * cfg.train.batch_size * cfg.train.accumulate * run.world,
        "world_size": run.world,
    }
    if run.budget is not None:
        summary["budget_left_s"] = run.budget.budget_s - run.budget.elapsed()
    return summary


def load_run_config(run_dir: Path) -> Config:
    """The resolved config a run was started with (for ``--resume``), checked against its last.pt."""
    check_resume(run_dir)
    return load_config(run_dir / "config.yaml")
