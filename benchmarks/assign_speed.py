"""``onestage assign`` over 200 training images, per family: seconds for the assignment alone
(padded batches, no drawing), measured side by side in one run. The issue's bar: under a
minute on 2 cores for 200 images. Prints the CPU it ran on.

    PYTHONPATH=src python benchmarks/assign_speed.py [--num 200]
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import time
from pathlib import Path

import torch

from onestage.config import load_config
from onestage.explore import explore_split, load_source

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ["configs/demo_shapes.yaml", "configs/compare/yolov3_shapes.yaml", "configs/compare/yolov1_shapes.yaml",
           "configs/ssd300_vgg16_voc.yaml"]


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown CPU"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--num", type=int, default=200)
    args = p.parse_args()
    print(f"CPU: {cpu_name()}, capability {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads")
    print(f"{'config':<40}{'candidates':>11}{'objects':>9}{'load s':>8}{'assign s':>10}{'per image ms':>14}")
    for config in CONFIGS:
        cfg = load_config(ROOT / config, [f"data.train.num_images={args.num}"] if "shapes" in config else [])
        t0 = time.perf_counter()
        source = load_source(cfg, "train")
        # load s: reading the split and building the detector; assign s: the eval transform of each
        # image, the padded batches' assignment and the counting (what `assign --num N` adds)
        t1 = time.perf_counter()
        n = min(args.num, len(source.dataset))
        result = explore_split(source, range(n), None, progress=False, verbose=False)
        t2 = time.perf_counter()
        print(f"{config:<40}{result['candidates']:>11}{result['summary']['objects']:>9}{t1 - t0:>8.1f}{t2 - t1:>10.2f}"
              f"{1000 * (t2 - t1) / n:>14.1f}")


if __name__ == "__main__":
    main()
