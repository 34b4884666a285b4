"""Learn the raccoon photographs from scratch in 20 minutes of CPU (issue 9).

    .venv/bin/python benchmarks/raccoon_budget.py [--minutes 20] [key=value overrides]

Trains configs/raccoon_ssdlite.yaml on the 160 images of data/train_labels.csv within the
time budget, then prints the VOC AP@0.5 (area metric) of the final weights on the 40 images
of data/test_labels.csv, the number of images seen and the training images/s. The test split
is evaluated once, at the end: it chooses nothing.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from onestage.config import load_config
from onestage.engine.trainer import train

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--minutes", type=float, default=20.0)
    p.add_argument("--out", type=Path, default=ROOT / "runs")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    cfg = load_config(ROOT / "configs" / "raccoon_ssdlite.yaml",
                      [f"train.time_budget={args.minutes}", f"train.out_dir={args.out}",
                       f"train.name=raccoon-{time.strftime('%Y%m%d-%H%M%S')}", *args.overrides])
    run_dir = Path(cfg.train.out_dir) / str(cfg.train.name)
    summary = train(cfg, run_dir, progress=False)
    history = [r for r in summary_rows(run_dir) if r["kind"] == "epoch"]
    ap = float(history[-1]["voc_ap50_area"])
    result = {
        "voc_ap50_area_test": ap,
        "images_seen": summary["images_seen"],
        "train_images_per_s": summary["images_seen"] / summary["seconds"],
        "minutes": summary["seconds"] / 60,
        "steps": summary["steps"],
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "run_dir": str(run_dir),
    }
    print(json.dumps(result, indent=2))


def summary_rows(run_dir: Path) -> list[dict[str, str]]:
    import csv

    with (run_dir / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


if __name__ == "__main__":
    main()
