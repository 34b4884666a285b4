"""Matching + loss time as a share of the model's forward + backward (issue 2), and the
batched matcher against a one-image-at-a-time loop of the same code.

    .venv/bin/python benchmarks/ssd_loss_share.py [--batch 32] [--size 300] [--repeats 3]

MobileNetV2-SSD300 (8732 priors), 21 classes, bf16 autocast + channels_last as the trainer
runs it on CPU. Targets: matching + loss under 5% of forward + backward; the batched matcher
several times faster than the loop. Everything is measured in this one run, side by side.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from onestage.assign.ssd import match_ssd
from onestage.config import PrecisionConfig
from onestage.engine.precision import autocast_context
from onestage.losses.multibox import MultiboxLoss
from onestage.models.heads.ssd import mobilenet_v2_ssd
from onestage.priors import generate_priors, make_layout


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def random_targets(batch: int, most: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    counts = torch.randint(1, most + 1, (batch,), generator=g)
    xy = torch.rand(batch, most, 2, generator=g) * 0.7
    wh = torch.rand(batch, most, 2, generator=g) * 0.3 + 0.03
    boxes = torch.cat([xy, (xy + wh).clamp(max=1)], -1)
    labels = torch.randint(0, 20, (batch, most), generator=g)
    pad = torch.arange(most)[None] >= counts[:, None]
    labels[pad] = -1
    boxes[pad] = 0
    return boxes, labels


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=300)
    p.add_argument("--objects", type=int, default=8, help="most objects per image")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)

    model = mobilenet_v2_ssd(21).to(memory_format=torch.channels_last)
    sizes = model.feature_map_sizes(args.size)
    priors = generate_priors(make_layout(sizes, args.size, [[2], [2, 3], [2, 3], [2, 3], [2], [2]], s_min=0.1))
    criterion = MultiboxLoss(priors)
    precision = PrecisionConfig()
    device = torch.device("cpu")
    images = torch.randn(args.batch, 3, args.size, args.size).contiguous(memory_format=torch.channels_last)
    boxes, labels = random_targets(args.batch, args.objects, g)

    with autocast_context(precision, device):
        outputs = model(images)
    detached = {k: v.detach().float().requires_grad_() for k, v in outputs.items()}

    def fwd_bwd() -> None:
        model.zero_grad(set_to_none=True)
        with autocast_context(precision, device):
            out = model(images)
        (out["cls"].float().sum() * 0 + out["loc"].float().sum() * 0).backward()

    def loss_fwd_bwd() -> None:
        loss = criterion(detached, boxes, labels)["total"]
        loss.backward()

    def batched() -> None:
        match_ssd(boxes, labels, priors)

    def looped() -> None:
        for i in range(args.batch):
            n = int((labels[i] >= 0).sum())
            match_ssd(boxes[i : i + 1, :n], labels[i : i + 1, :n], priors)

    t_model = timed(fwd_bwd, args.repeats)
    t_loss = timed(loss_fwd_bwd, args.repeats * 3)
    t_batched = timed(batched, args.repeats * 3)
    t_loop = timed(looped, args.repeats * 3)
    print(f"MobileNetV2-SSD{args.size}, {priors.shape[0]} priors, batch {args.batch}, bf16 autocast + channels_last, "
          f"{torch.get_num_threads()} threads")
    print(f"model forward + backward        {t_model * 1000:9.1f} ms")
    print(f"matching + loss fwd + bwd       {t_loss * 1000:9.1f} ms   = {100 * t_loss / t_model:.1f}% of the model (target < 5%)")
    print(f"matcher, batched                {t_batched * 1000:9.1f} ms")
    print(f"matcher, one image at a time    {t_loop * 1000:9.1f} ms   = {t_loop / t_batched:.1f}x the batched time")


if __name__ == "__main__":
    main()
