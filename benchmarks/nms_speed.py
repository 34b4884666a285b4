"""NMS at evaluation settings: the (K x K) work trimmed to the valid entries, against the whole K.

    PYTHONPATH=src .venv/bin/python benchmarks/nms_speed.py [--batch 16] [--k 1000] [--repeats 5]

YOLOv3's evaluation post-processing sends the best K = 1000 (box, class) pairs of each image
into NMS, of which only those with score >= 0.001 take part: 0-130 per image for the trained
shapes model of benchmarks/RESULTS.md ("SSD and YOLO, measured"). Synthetic input of that
shape: B images, K boxes sorted by score, a valid prefix of 0-130 per image, 5 classes.

``onestage.postprocess.nms_keep_mask`` leaves the entries past the last valid one out. The
"whole K" column is the same call with one more valid entry at position K - 1 of one image,
which makes every (K x K) pair needed again: the cost every call had before the trim. Both
run side by side in one process; the kept masks of the shared entries are checked equal.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from onestage.engine.calibrate import cpu_info
from onestage.postprocess import nms_keep_mask



def inputs(batch: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(batch, 6, 2, generator=g)  # a few objects per image; boxes cluster around them
    which = torch.randint(0, 6, (batch, k), generator=g)
    xy = centres.gather(1, which[..., None].expand(-1, -1, 2)) + 0.03 * torch.randn(batch, k, 2, generator=g)
    wh = 0.1 + 0.1 * torch.rand(batch, k, 2, generator=g)
    boxes = torch.cat([xy - wh / 2, xy + wh / 2], -1)
    valid = torch.arange(k) < torch.randint(0, 131, (batch, 1), generator=g)
    return boxes, valid, torch.randint(0, 5, (batch, k), generator=g)


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--k", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    boxes, valid, labels = inputs(args.batch, args.k)
    whole = valid.clone()
    whole[0, -1] = True  # one valid entry at the end: the whole (K x K) is needed
    trimmed_keep = nms_keep_mask(boxes, valid, 0.45, labels=labels)
    whole_keep = nms_keep_mask(boxes, whole, 0.45, labels=labels)
    whole_keep[0, -1] = False
    assert torch.equal(trimmed_keep, whole_keep & valid), "the trimmed NMS keeps other entries"
    t_trim = median_time(lambda: nms_keep_mask(boxes, valid, 0.45, labels=labels), args.repeats)
    t_whole = median_time(lambda: nms_keep_mask(boxes, whole, 0.45, labels=labels), args.repeats)
    print(f"CPU: {cpu_info().headline()}; torch {torch.__version__}")
    print(f"{args.batch} images x {args.k} entries, {int(valid.sum(1).max())} valid at most per image "
          f"({valid.sum().item() / args.batch:.0f} on average); median of {args.repeats}")
    print(f"whole K (as before the trim)   {1000 * t_whole:8.1f} ms")
    print(f"trimmed to the valid entries   {1000 * t_trim:8.1f} ms   ({t_whole / t_trim:.0f}x faster)")


if __name__ == "__main__":
    main()
