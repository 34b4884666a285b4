"""Training-step time of the demo model: bf16 autocast against fp32 (issue 3), the EMA update
as a share of the step, and the data loader's images/s with 0, 1 and 2 workers against the
step's images/s (issue 4). All measured in this one run.

    .venv/bin/python benchmarks/train_step.py [--config configs/demo_shapes.yaml] [--steps 4]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from onestage.build import build_datasets, build_detector
from onestage.config import load_config
from onestage.data.base import collate
from onestage.engine.ema import ModelEMA
from onestage.engine.optim import build_optimizer
from onestage.engine.precision import autocast_context

ROOT = Path(__file__).resolve().parents[1]


def step_time(cfg, detector, batch, amp: bool, channels_last: bool, steps: int) -> float:
    precision = cfg.precision.model_copy(update={"amp": amp})
    model = detector.model
    model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    images = batch["images"].contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    optimizer = build_optimizer(model, cfg.optim)
    device = torch.device("cpu")
    times = []
    for i in range(steps + 1):
        t = time.perf_counter()
        with autocast_context(precision, device):
            outputs = model(images)
        loss = detector.criterion(outputs, batch["boxes"], batch["labels"])["total"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i:  # the first step warms up the allocator and oneDNN kernels
            times.append(time.perf_counter() - t)
    return statistics.median(times)


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


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default=str(ROOT / "configs" / "demo_shapes.yaml"))
    p.add_argument("--steps", type=int, default=4)
    args = p.parse_args()
    cfg = load_config(args.config, ["data.train.num_images=256", "data.val.num_images=8"])
    train_ds, *_ = build_datasets(cfg)
    train_ds.seed = 0
    detector = build_detector(cfg, train_ds.class_names)
    bs = cfg.train.batch_size
    batch = collate([train_ds[i] for i in range(bs)])

    t_bf16 = step_time(cfg, detector, batch, amp=True, channels_last=True, steps=args.steps)
    t_fp32 = step_time(cfg, detector, batch, amp=False, channels_last=True, steps=args.steps)
    t_fp32_plain = step_time(cfg, detector, batch, amp=False, channels_last=False, steps=args.steps)
    ema = ModelEMA(detector.model, 0.999)
    t0 = time.perf_counter()
    for s in range(20):
        ema.update(detector.model, s)
    t_ema = (time.perf_counter() - t0) / 20

    print(f"{cfg.model.arch} {cfg.model.backbone} x{cfg.model.width_mult} at {cfg.model.input_size}, batch {bs}, "
          f"{torch.get_num_threads()} threads")
    print(f"train step, bf16 autocast + channels_last  {t_bf16:7.3f} s  ({bs / t_bf16:6.1f} img/s)")
    print(f"train step, fp32 + channels_last           {t_fp32:7.3f} s  ({bs / t_fp32:6.1f} img/s)  = {t_fp32 / t_bf16:.2f}x the bf16 step")
    print(f"train step, fp32 contiguous                {t_fp32_plain:7.3f} s  ({bs / t_fp32_plain:6.1f} img/s)  = {t_fp32_plain / t_bf16:.2f}x the bf16 step")
    print(f"EMA update                                 {t_ema * 1000:7.1f} ms = {100 * t_ema / t_bf16:.2f}% of the bf16 step")
    step_rate = bs / t_bf16
    for workers in (0, 1, 2):
        rate = loader_rate(train_ds, bs, workers, batches=4)
        print(f"data loader, {workers} workers ({cfg.data.augment.preset} augmentation)  {rate:7.1f} img/s = {rate / step_rate:.1f}x the bf16 step's img/s")


if __name__ == "__main__":
    main()
