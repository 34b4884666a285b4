"""Training-step time of the demo model in fp32 and bf16 autocast, each with and without
channels_last, next to the choice ``precision.amp: auto`` makes on this machine (issue 15); then
the EMA update as a share of the step (issue 3) and the data loader's images/s with 0, 1 and 2
workers (issue 4). All measured side by side in this one run, with the CPU named.

    .venv/bin/python benchmarks/train_step.py [--config configs/demo_shapes.yaml] [--steps 3]

A CPU without native bf16 (AVX2 only, as most laptops and many cloud machines) can be emulated on
one with AVX512-BF16 / AMX: ATen's kernels then stop at AVX2 and oneDNN's convolutions at AVX2,
so bf16 is emulated as it is there (and the calibration cache keys on both settings):

    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 .venv/bin/python benchmarks/train_step.py

A train step here is the full one: forward under autocast, the detection loss, backward, AdamW.
Each mode runs on its own copy of the model; the first step (allocator, oneDNN kernels) is not
timed, and the modes take turns step by step (a shared machine's load falls on all alike). A mode
whose step takes SLOW_STOP_FACTOR (4) x the fastest is not timed again. ``auto`` is timed the
way a run decides (engine/calibrate.py on this batch and loss, no optimizer step, a few seconds
on an idle machine, no cache here) and its figure is the full step of the mode it chose.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch

from onestage.build import build_datasets, build_detector
from onestage.config import load_config
from onestage.data.base import collate
from onestage.engine.calibrate import SLOW_STOP_FACTOR, cpu_info, mode_key, resolve_precision
from onestage.engine.ema import ModelEMA
from onestage.engine.optim import build_optimizer

ROOT = Path(__file__).resolve().parents[1]
MODES = [(None, False), (None, True), (torch.bfloat16, False), (torch.bfloat16, True)]  # (autocast dtype, channels_last)


def step_times(cfg, detector, batch, steps: int) -> dict[tuple, tuple[float, int]]:
    """Per mode: (median seconds per full train step, timed steps). Each mode has its own copy of
    the model and optimizer; the modes take turns, one step per round, so that the shared
    machine's changing load falls on all of them alike. Round 0 warms up and is not counted."""
    runs = {}
    for dtype, channels_last in MODES:
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        model = copy.deepcopy(detector.model).train().to(memory_format=fmt)
        runs[(dtype, channels_last)] = (model, build_optimizer(model, cfg.optim), batch["images"].contiguous(memory_format=fmt))
    timed: dict[tuple, list[float]] = {mode: [] for mode in MODES}
    for round_ in range(steps + 1):
        fastest = min((t for ts in timed.values() for t in ts), default=float("inf"))
        for mode in MODES:
            if timed[mode] and timed[mode][-1] > SLOW_STOP_FACTOR * fastest:
                continue  # one step that slow is figure enough
            model, optimizer, images = runs[mode]
            t = time.perf_counter()
            with torch.autocast("cpu", dtype=mode[0], enabled=mode[0] is not None):
                outputs = model(images)
            loss = detector.criterion(outputs, batch["boxes"], batch["labels"])["total"]
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if round_:
                timed[mode].append(time.perf_counter() - t)
    return {mode: (statistics.median(ts), len(ts)) for mode, ts in timed.items()}


def loader_rate(dataset, batch_size: int, workers: int, batches: int) -> float:
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                                         collate_fn=collate)
    it = iter(loader)
    next(it)  # workers start up
    t = time.perf_counter()
    n = 0
    for _ in range(batches):
        n += len(next(it)["indices"])
    return n / (time.perf_counter() - t)


def _label(dtype: torch.dtype | None, channels_last: bool) -> str:
    return ("bf16 autocast" if dtype is not None else "fp32") + (" + channels_last" if channels_last else "")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default=str(ROOT / "configs" / "demo_shapes.yaml"))
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--no-loader", action="store_true", help="skip the EMA and data loader figures")
    args = p.parse_args()
    cfg = load_config(args.config, ["data.train.num_images=256", "data.val.num_images=8"])
    train_ds, *_ = build_datasets(cfg)
    train_ds.seed = 0
    detector = build_detector(cfg, train_ds.class_names)
    bs, size = cfg.train.batch_size, cfg.model.input_size
    batch = collate([train_ds[i] for i in range(bs)])

    cpu = cpu_info()
    print(f"CPU: {cpu.model}; torch.backends.cpu.get_cpu_capability() = {cpu.capability}; {cpu.describe()}; "
          f"{cpu.threads} thread(s); torch {torch.__version__}")
    print(f"{cfg.model.arch} {cfg.model.backbone} x{cfg.model.width_mult} at {size}, batch {bs}: "
          f"train step = forward + loss + backward + AdamW, median of up to {args.steps} steps")
    measured = step_times(cfg, detector, batch, args.steps)
    times = {mode_key(*mode): t for mode, (t, _) in measured.items()}
    for mode, (t, n) in measured.items():
        note = "" if n == args.steps else f"  ({n} of {args.steps} steps: a step took over {SLOW_STOP_FACTOR:.0f}x the fastest)"
        print(f"  {_label(*mode):<30} {t:7.3f} s  {bs / t:6.1f} img/s  = {t / times['fp32']:5.2f}x fp32's time{note}")

    start = time.perf_counter()
    decision = resolve_precision(
        cfg.precision, detector.model, (bs, 3, size, size), torch.device("cpu"), train=True, cache=False,
        images=batch["images"], loss_fn=lambda out: detector.criterion(out, batch["boxes"], batch["labels"])["total"],
    )
    calibration_s = time.perf_counter() - start
    chosen = times[mode_key(decision.dtype, decision.channels_last)]
    old_default = times["bf16+channels_last"]  # precision.amp: true, channels_last: true before issue 15
    print(f"  {'auto -> ' + _label(decision.dtype, decision.channels_last):<30} {chosen:7.3f} s  {bs / chosen:6.1f} img/s  "
          f"= {old_default / chosen:.2f}x the old default's speed (amp true, channels_last true)")
    print(f"  auto's calibration took {calibration_s:.1f} s (once per machine, model and batch shape; cached): {decision.reason}")
    print("  its timings (forward + loss + backward, no optimizer step): "
          + ", ".join(f"{k} {t:.3f} s" for k, t in decision.timings.items()))
    if args.no_loader:
        return

    ema = ModelEMA(detector.model, 0.999)
    t0 = time.perf_counter()
    for s in range(20):
        ema.update(detector.model, s)
    t_ema = (time.perf_counter() - t0) / 20
    print(f"EMA update {t_ema * 1000:7.1f} ms = {100 * t_ema / chosen:.2f}% of auto's step")
    step_rate = bs / chosen
    for workers in (0, 1, 2):
        rate = loader_rate(train_ds, bs, workers, batches=4)
        print(f"data loader, {workers} workers ({cfg.data.augment.preset} augmentation)  {rate:7.1f} img/s "
              f"= {rate / step_rate:.1f}x auto's step img/s")


if __name__ == "__main__":
    main()
