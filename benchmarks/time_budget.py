"""Does `train.time_budget` hold for the whole run? (issue 15)

    .venv/bin/python benchmarks/time_budget.py [--config configs/raccoon_ssdlite.yaml] [--minutes 5] [overrides]

Runs `onestage train CONFIG train.time_budget=MINUTES` as a user would (a fresh process: set-up,
training, validation, the final evaluation, plots and drawings) and prints the wall time of the
whole command against the budget, the ratio, and where the time went (from metrics.csv and the
run's precision.json). The issue's target: within 5% of the budget (5.25 minutes for 5).
The CPU (model name and torch's capability) is printed with the figures.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cpu_name() -> str:
    import torch

    from onestage.engine.calibrate import cpu_info

    info = cpu_info()
    return f"{info.describe()} (torch capability {torch.backends.cpu.get_cpu_capability()})"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default=str(ROOT / "configs" / "raccoon_ssdlite.yaml"))
    p.add_argument("--minutes", type=float, default=5.0)
    p.add_argument("--out", type=Path, default=ROOT / "runs")
    args, overrides = p.parse_known_args()
    name = f"time_budget_{int(time.time())}"
    cmd = [sys.executable, "-m", "onestage", "train", args.config, f"train.time_budget={args.minutes}",
           f"train.out_dir={args.out}", f"train.name={name}", "--no-progress", *overrides]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - t0
    run = args.out / name
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    precision = json.loads((run / "precision.json").read_text())
    budget = args.minutes * 60
    print(f"\nCPU: {cpu_name()}")
    print(f"precision: {precision['reason']}")
    print(f"budget {budget:.0f} s; wall time of the whole command {wall:.1f} s = {wall / budget:.3f} x the budget "
          f"(target <= 1.05)")
    print(f"training loop ended at {metrics['seconds']:.1f} s of the run ({metrics['steps']} steps, "
          f"{metrics.get('budget_left_s', float('nan')):.1f} s left for the final evaluation); "
          f"{metrics['best_metric']} = {metrics.get(metrics['best_metric'], float('nan')):.4f}")


if __name__ == "__main__":
    main()
