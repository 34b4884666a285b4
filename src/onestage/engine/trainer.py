"""The training loop (seed 002): one loop, readable top to bottom.

Per step: batch -> forward under autocast -> assignment + loss (fp32 where forced) ->
scaled backward -> unscale, clip -> optimizer step (skipped on non-finite gradients) ->
EMA update -> LR for the next step. Per epoch: validation mAP with the EMA weights, last and
best checkpoints, metrics.csv. SIGTERM / Ctrl-C: the current step finishes, a resumable
checkpoint is written, and the run exits with a message saying how to resume.

Several processes (torchrun; ``engine/distributed.py``): the same loop on every rank, the
model wrapped in DDP for the training forward only. Each rank takes its share of the same
epoch permutation (``EpochSampler``) with ``train.batch_size`` images per step; the SSD loss
divides by the positives of the global batch; loss values are averaged over ranks before
the non-finite check, so all ranks skip the same steps; a SIGTERM or the time budget is
agreed on once per step; validation is sharded and its metric broadcast. Rank 0 alone writes
files and prints. A failed collective (a dead or stuck rank) raises ``TrainingError``.
"""

from __future__ import annotations

import contextlib
import csv
import functools
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
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

import onestage
from onestage.build import Detector, build_datasets, build_detector
from onestage.config import Config, dump_config, load_config
from onestage.data.base import DetectionDataset, collate
from onestage.data.mosaic import mosaic_closed
from onestage.engine import distributed as dist
from onestage.engine.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
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


def _checkpoint_state(
    cfg: Config, detector: Detector, optimizer, scaler, scheduler, ema, state: TrainState, elapsed: float
) -> dict[str, Any]:
    return {
        "version": onestage.__version__,
        "config": dump_config(cfg),
        "class_names": detector.class_names,
        "model": detector.model.state_dict(),
        "ema": ema.state_dict() if ema is not None else None,
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "scheduler": {"total_steps": scheduler.total_steps},
        "rng": rng_state(),
        "step": state.step,
        "epoch": state.epoch,
        "batch_in_epoch": state.batch_in_epoch,
        "best_metric": cfg.train.best_metric,
        "best_value": state.best_value,
        "nonfinite_total": state.nonfinite_total,
        "elapsed": elapsed,
        "mosaic_closed": state.mosaic_closed,
        "history": state.history,
        "world_size": dist.world_size(),  # a mid-epoch position means nothing for another count
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
    resume test), leaving a resumable checkpoint. Returns a summary dict.

    Under torch.distributed (``distributed.init_distributed`` called first, as ``onestage
    train`` does under torchrun) every rank calls this with the same arguments; see the
    module docstring. A failed collective raises ``TrainingError`` naming the rank.
    """
    with dist.collective_failures_as(TrainingError):
        return _train(cfg, run_dir, resume, progress, max_steps, device)


def _train(
    cfg: Config,
    run_dir: Path,
    resume: bool,
    progress: bool,
    max_steps: int | None,
    device: torch.device | None,
) -> dict[str, Any]:
    rank, world, main = dist.rank(), dist.world_size(), dist.is_main()
    device = device or dist.device()
    # Per-rank seeds (rank 0 uses cfg.seed, as a single process does); the weights still start
    # equal everywhere, as DDP copies rank 0's to the others. Augmentation does not use these:
    # each sample is seeded by (seed, epoch, index), whichever rank draws it.
    seed_everything(cfg.seed + rank)
    progress = progress and main
    say = dist.main_only(tqdm.write)  # console messages: rank 0 only
    warn = dist.main_only(functools.partial(print, file=sys.stderr))
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_config(cfg))
        (run_dir / "version.txt").write_text(f"onestage {onestage.__version__}\ntorch {torch.__version__}\n")

    train_ds, val_ds, train_spec, val_spec = build_datasets(cfg)
    for spec, split in ((train_spec, "train"), (val_spec, "val")):
        if len(spec.problems):
            warn(f"[data] {split}: {spec.problems.summary()}")
    train_ds.seed = cfg.seed
    train_mosaic = train_ds.mosaic  # switched off for the last part of training by close_mosaic
    detector = build_detector(
        cfg, train_ds.class_names, positives_normalizer=dist.positives_across_ranks if world > 1 else None
    )
    if cfg.dist.sync_bn and world > 1:
        detector.model = dist.convert_sync_batchnorm(detector.model, device)
    model = detector.model.to(device)
    if cfg.precision.channels_last:
        model = model.to(memory_format=torch.channels_last)
    detector.criterion.to(device)
    ddp_model = dist.wrap_ddp(model, device)  # the training forward only; `model` stays the bare one

    sampler = EpochSampler(len(train_ds), cfg.seed, rank=rank, world_size=world)
    loader = _loader(train_ds, sampler, cfg)
    check_trainable_batch(model, min(cfg.train.batch_size, sampler.shard_size), world, input_size=cfg.model.input_size, sync_bn=cfg.dist.sync_bn)
    batches_per_epoch = len(loader)
    steps_per_epoch = max(1, batches_per_epoch // cfg.train.accumulate)
    total_steps = cfg.train.epochs * steps_per_epoch
    budget_s = cfg.train.time_budget * 60 if cfg.train.time_budget else None
    if budget_s is not None:
        # A placeholder until the first steps measure the pace (the schedule is re-planned
        # every step); long enough that the warmup is not mistaken for the whole run.
        total_steps = max(total_steps, 10 * cfg.schedule.warmup_steps + 1)

    # Linear scaling rule (Goyal et al. 2017, section 2.1) when asked: the global batch is
    # `world` times the per-process one, so is the learning rate.
    lr_factor = world if cfg.dist.scale_lr else 1
    schedule_cfg = cfg.schedule
    if lr_factor != 1:
        schedule_cfg = cfg.schedule.model_copy(update={"min_lr": cfg.schedule.min_lr * lr_factor})
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = LRScheduler(optimizer, schedule_cfg, cfg.optim.lr * lr_factor, total_steps)
    scaler = LossScaler(cfg.precision, device)
    ema = ModelEMA(model, cfg.ema.decay, cfg.ema.start_step, cfg.ema.update_every) if cfg.ema.enabled else None
    state = TrainState()

    if resume:
        # Every rank loads the same file (the run folder must be shared, or copied to every machine).
        ckpt = load_checkpoint(run_dir / "last.pt", map_location=device)
        saved_world = int(ckpt.get("world_size", 1))
        if saved_world != world:
            # Steps per epoch, the position inside the epoch and the planned schedule length all
            # count global batches of the saved size: they mean something else with another count.
            raise TrainingError(
                f"{run_dir / 'last.pt'} was written by a run of {saved_world} process(es); resume it with "
                f"{saved_world} (this run has {world}), or start a new run from its weights"
            )
        model.load_state_dict(ckpt["model"])
        if ema is not None and ckpt["ema"] is not None:
            ema.load_state_dict(ckpt["ema"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        scheduler.set_total_steps(int(ckpt["scheduler"]["total_steps"]))
        state = TrainState(
            step=ckpt["step"], epoch=ckpt["epoch"], batch_in_epoch=ckpt["batch_in_epoch"],
            best_value=ckpt["best_value"], nonfinite_total=ckpt["nonfinite_total"],
            elapsed=ckpt["elapsed"], history=list(ckpt["history"]),
            mosaic_closed=bool(ckpt.get("mosaic_closed", False)),
        )
        set_rng_state(ckpt["rng"])  # rank 0's generators
        if rank > 0:  # the other ranks draw their own streams again, reproducibly
            seed_everything(int(np.random.SeedSequence([cfg.seed, rank, state.step]).generate_state(1)[0]))
        warn(f"[resume] {run_dir / 'last.pt'}: step {state.step}, epoch {state.epoch + 1}")

    metrics = MetricsLog(run_dir / "metrics.csv", list(state.history), write=main)
    start_time = time.perf_counter() - state.elapsed
    step_times: list[float] = []
    final_eval_reserve = 0.0
    stop_reason = "finished"

    @dist.main_only
    def save(name: str) -> None:
        state.history = metrics.rows
        save_checkpoint(
            run_dir / name,
            _checkpoint_state(cfg, detector, optimizer, scaler, scheduler, ema, state, time.perf_counter() - start_time),
        )

    def validate() -> dict[str, float]:
        ctx = ema.swap_into(model) if (ema is not None and cfg.ema.use_for_eval) else contextlib.nullcontext()
        # One process: a signal interrupts validation at once. Several: validation is a collective,
        # so a signal only sets the flag, which the ranks agree on at the next step.
        interruptible = raise_on_termination() if world == 1 else contextlib.nullcontext()
        with interruptible, ctx:
            result, _ = evaluate(detector, val_ds, cfg, device, progress=progress)
        return result.metrics

    model.train()
    with handle_termination():
        while True:
            epoch = state.epoch
            if budget_s is None and epoch >= cfg.train.epochs:
                break
            train_ds.epoch = epoch
            if state.batch_in_epoch == 0 and not state.mosaic_closed:
                # Decided at epoch starts only (and kept in the checkpoint): a time-budget run
                # re-plans its length every step, and a resumed epoch must see what it saw.
                state.mosaic_closed = mosaic_closed(state.step, scheduler.total_steps, cfg.data.augment.close_mosaic)
                if state.mosaic_closed and train_mosaic is not None:
                    say(f"step {state.step}: mosaic off for the rest of training (data.augment.close_mosaic)")
            train_ds.mosaic = None if state.mosaic_closed else train_mosaic
            sampler.set_epoch(epoch, start=state.batch_in_epoch * cfg.train.batch_size * world)
            bar = tqdm(
                total=batches_per_epoch, initial=state.batch_in_epoch, disable=not progress, dynamic_ncols=True,
                desc=f"epoch {epoch + 1}" + (f"/{cfg.train.epochs}" if budget_s is None else ""),
            )
            optimizer.zero_grad(set_to_none=True)
            stop_now = False
            last_step_end: float | None = None  # the data loading between steps counts toward the pace
            for batch in loader:
                t0 = time.perf_counter()
                lr = scheduler.step(state.step)
                images = batch["images"].to(device, non_blocking=True)
                if cfg.precision.channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                boxes, labels = batch["boxes"].to(device), batch["labels"].to(device)
                ends_cycle = (state.batch_in_epoch + 1) % cfg.train.accumulate == 0

                with dist.no_sync(ddp_model, skip_sync=not ends_cycle):
                    with autocast_context(cfg.precision, device):
                        outputs = ddp_model(images)
                    losses = detector.criterion(outputs, boxes, labels)  # fp32 where forced (inside)
                    total = losses["total"]
                    # Averaged over ranks (the global batch's loss), and the same verdict on every rank.
                    loss_values = {f"loss_{k}": v for k, v in dist.mean_over_ranks(
                        {k: v for k, v in losses.items() if k != "num_pos"}).items()}

                    if not math.isfinite(loss_values["loss_total"]):
                        state.nonfinite_in_row += 1
                        state.nonfinite_total += 1
                        optimizer.zero_grad(set_to_none=True)
                        say(f"[warn] step {state.step}: non-finite loss ({loss_values['loss_total']}), step skipped")
                        if state.nonfinite_in_row >= cfg.train.max_nonfinite_steps:
                            raise TrainingError(
                                f"{state.nonfinite_in_row} non-finite losses in a row (train.max_nonfinite_steps); "
                                "lower optim.lr, check the data with `onestage data check`, or disable precision.amp"
                            )
                        state.batch_in_epoch += 1
                        bar.update(1)
                        continue
                    state.nonfinite_in_row = 0

                    scaler.scale(total / cfg.train.accumulate).backward()
                state.batch_in_epoch += 1
                if not ends_cycle:
                    bar.update(1)
                    continue
                scaler.unscale_(optimizer)
                grad_norm = clip_grad(model.parameters(), cfg.train.grad_clip)
                applied = scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                dist.broadcast_buffers(model)  # BatchNorm statistics: rank 0's everywhere (EMA, eval, checkpoint)
                if ema is not None and applied:
                    ema.update(model, state.step)
                state.step += 1

                now = time.perf_counter()
                dt = now - t0
                step_times.append(now - (last_step_end if last_step_end is not None else t0))
                last_step_end = now
                elapsed = time.perf_counter() - start_time
                planned_steps = 0
                if budget_s is not None:
                    # Stretch the schedule over the budget: steps left at the recent pace.
                    # The median: one slow step (an epoch's first batch) must not bend the schedule.
                    pace = float(np.median(step_times[-50:]))
                    remaining = max(0.0, budget_s - elapsed - final_eval_reserve)
                    planned_steps = max(state.step + 1, state.step + int(remaining / pace))
                out_of_time = budget_s is not None and elapsed >= budget_s - final_eval_reserve
                # A signal seen by any rank stops all; rank 0's clock rules the budget and the schedule.
                stop_now, (out_of_time_f, planned_f) = dist.agree(termination_requested(), [out_of_time, planned_steps])
                out_of_time = out_of_time_f > 0
                if budget_s is not None:
                    scheduler.set_total_steps(int(planned_f))
                images_per_s = images.shape[0] * world / dt
                bar.set_postfix(
                    {k[5:]: f"{v:.3f}" for k, v in loss_values.items()} | {"lr": f"{lr:.2e}", "img/s": f"{images_per_s:.1f}"},
                    refresh=False,
                )
                bar.update(1)
                if state.step % cfg.train.log_every == 0 or state.step == 1:
                    metrics.log(
                        {"kind": "step", "step": state.step, "epoch": epoch + 1, **loss_values, "lr": lr,
                         "grad_norm": grad_norm, "skipped_steps": scaler.skipped_steps,
                         "nonfinite_steps": state.nonfinite_total, "images_per_s": images_per_s,
                         "time_s": elapsed}
                    )
                    metrics.flush()  # a small file: rewriting it keeps it readable at any moment
                if stop_now or (max_steps is not None and state.step >= max_steps) or out_of_time:
                    break
            bar.close()

            epoch_done = state.batch_in_epoch >= batches_per_epoch
            now_out_of_time = budget_s is not None and time.perf_counter() - start_time >= budget_s - final_eval_reserve
            terminate, (out_of_time_f,) = dist.agree(stop_now or termination_requested(), [now_out_of_time])
            if terminate:
                save("last.pt")
                metrics.flush()
                stop_reason = "terminated"
                warn(f"\n[stopped] checkpoint written; resume with: onestage train --resume {run_dir}")
                break
            if max_steps is not None and state.step >= max_steps and not epoch_done:
                save("last.pt")
                metrics.flush()
                stop_reason = "max_steps"
                break
            out_of_time = out_of_time_f > 0
            last_epoch = (budget_s is None and epoch + 1 >= cfg.train.epochs) or out_of_time
            if (epoch + 1) % cfg.train.eval_every == 0 or last_epoch:
                t_eval = time.perf_counter()
                try:
                    values = validate()
                except TerminationRequested:
                    # The epoch's steps are done; a resumed run starts with this validation.
                    save("last.pt")
                    metrics.flush()
                    stop_reason = "terminated"
                    warn(f"\n[stopped] during validation; resume with: onestage train --resume {run_dir}")
                    break
                final_eval_reserve = time.perf_counter() - t_eval
                metrics.log({"kind": "epoch", "step": state.step, "epoch": epoch + 1, **values,
                             "time_s": time.perf_counter() - start_time})
                key = cfg.train.best_metric
                if key not in values:
                    raise TrainingError(f"train.best_metric: {key!r} is not computed; available: {sorted(values)}")
                say(f"epoch {epoch + 1}: " + ", ".join(f"{k}={v:.4f}" for k, v in values.items() if k.startswith(("voc", "coco"))))
                state.epoch, state.batch_in_epoch = epoch + 1, 0
                if values[key] > state.best_value:  # the same metric on every rank (broadcast)
                    state.best_value = values[key]
                    save("best.pt")
            else:
                state.epoch, state.batch_in_epoch = epoch + 1, 0
            save("last.pt")
            metrics.flush()
            if out_of_time or (max_steps is not None and state.step >= max_steps):
                stop_reason = "time_budget" if out_of_time else "max_steps"
                break

    metrics.flush()
    return {
        "run_dir": str(run_dir),
        "steps": state.step,
        "epochs": state.epoch,
        "best_metric": cfg.train.best_metric,
        "best_value": state.best_value,
        "stop_reason": stop_reason,
        "skipped_steps": scaler.skipped_steps,
        "nonfinite_steps": state.nonfinite_total,
        "seconds": time.perf_counter() - start_time,
        "images_seen": state.step * cfg.train.batch_size * cfg.train.accumulate * world,
        "world_size": world,
    }


def load_run_config(run_dir: Path) -> Config:
    """The resolved config a run was started with (for ``--resume``), checked against its last.pt."""
    check_resume(run_dir)
    return load_config(run_dir / "config.yaml")
