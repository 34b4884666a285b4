"""Learn the raccoon photographs from scratch in 20 minutes of CPU (issue 9).

    .venv/bin/python benchmarks/raccoon_budget.py [--minutes 20] [key=value overrides]

Trains configs/raccoon_ssdlite.yaml on the 160 images of data/train_labels.csv within the
time budget, then prints the VOC AP@0.5 (area metric) of the final weights on the 40 images
of data/test_labels.csv, the number of images seen and the training images/s. The test split
is evaluated once, at the end: it chooses nothing.

    .venv/bin/python benchmarks/raccoon_budget.py --holdout 0.2 [overrides]

is how settings are chosen instead: it splits the *training* images (by file name, with a
fixed seed) into a tuning-train and a tuning-validation part, writes both lists into the run
folder, trains on the first and scores the second. The test split is not read at all.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import platform
import time
from pathlib import Path

import torch

from onestage.config import load_config
from onestage.engine.trainer import train

ROOT = Path(__file__).resolve().parents[1]
DATASET = ROOT.parent / "shared" / "datasets" / "raccoon"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--minutes", type=float, default=20.0)
    p.add_argument("--out", type=Path, default=ROOT / "runs")
    p.add_argument("--holdout", type=float, default=None,
                   help="score a held-out fraction of the training images instead of the test split")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    name = f"raccoon-{'tune-' if args.holdout else ''}{time.strftime('%Y%m%d-%H%M%S')}"
    overrides = [f"train.time_budget={args.minutes}", f"train.out_dir={args.out}", f"train.name={name}"]
    config = ROOT / "configs" / "raccoon_ssdlite.yaml"
    cfg = load_config(config, [*overrides, *args.overrides])
    run_dir = Path(cfg.train.out_dir) / str(cfg.train.name)  # a user override may rename it
    if args.holdout:
        train_csv, val_csv = split_training_images(DATASET / "data" / "train_labels.csv", args.holdout, run_dir)
        split = [f"data.train.split={train_csv}", f"data.val.split={val_csv}"]
        cfg = load_config(config, [*overrides, *split, *args.overrides])
    summary = train(cfg, run_dir, progress=False)
    history = [r for r in summary_rows(run_dir) if r["kind"] == "epoch"]
    ap = float(history[-1]["voc_ap50_area"])
    result = {
        ("voc_ap50_area_holdout" if args.holdout else "voc_ap50_area_test"): ap,
        "images_seen": summary["images_seen"],
        "train_images_per_s": summary["images_seen"] / summary["seconds"],
        "minutes": summary["seconds"] / 60,
        "steps": summary["steps"],
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "run_dir": str(run_dir),
    }
    print(json.dumps(result, indent=2))


def split_training_images(labels_csv: Path, fraction: float, out_dir: Path, seed: int = 0) -> tuple[Path, Path]:
    """Split a LabelImg CSV by image (all rows of an image stay together) into two CSVs in out_dir.

    A fixed seed and sorted file names make the split the same on every machine.
    """
    if not 0.0 < fraction < 1.0:
        raise SystemExit(f"--holdout must be in (0, 1), got {fraction}")
    with labels_csv.open(newline="") as f:
        reader = csv.DictReader(f)
        fields, rows = reader.fieldnames, list(reader)
    names = sorted({r["filename"] for r in rows})
    held = set(random.Random(seed).sample(names, max(1, round(fraction * len(names)))))
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = out_dir / "tune_train.csv", out_dir / "tune_val.csv"
    for path, keep in zip(paths, (lambda n: n not in held, lambda n: n in held)):
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(r for r in rows if keep(r["filename"]))
    print(f"[holdout] {len(names) - len(held)} tuning-train images, {len(held)} held out: {paths[0]}, {paths[1]}")
    return paths


def summary_rows(run_dir: Path) -> list[dict[str, str]]:
    import csv

    with (run_dir / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


if __name__ == "__main__":
    main()
