"""Is YOLOv1 (98 candidates) less stable on video than SSD and YOLOv3? (seed 000, issue 18)

    PYTHONPATH=src .venv/bin/python benchmarks/stability.py [--minutes 12] [--videos 8] [--frames 60]
        [--runs RUN_SSDLITE RUN_YOLOV3 RUN_YOLOV1]

Trains the equal-terms configs of ``onestage compare`` (configs/compare/{ssdlite,yolov3,yolov1}_shapes.yaml:
one MobileNetV2 width 0.5 backbone, input 256, the same data, augmentation, optimizer, batch,
seed and ``--minutes`` budget; only the head differs) on the built-in shapes *images*, or takes
finished run folders (``--runs``, e.g. those ``onestage compare`` trained). Then scores each on
the same held-out generated *videos* (``onestage data make-video``, a seed no training image
uses): VOC mAP@0.5 on every frame and the stability error (Zhang & Wang 2016) averaged over
score thresholds 0.1..0.9, at the display threshold, and at equal recall (each model at the score
threshold where it detects ``--recall`` of the annotated objects). Prints the tables (and the CPU).
``onestage compare ... --video DIR`` puts the same figures in its table.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import numpy as np
import torch

from onestage.api import load_detector
from onestage.compare import evaluate_on_video, read_metrics_csv, stability_column, train_all
from onestage.data.moving_shapes import write_moving_shapes
from onestage.engine.calibrate import cpu_info
from onestage.eval.stability import ERROR_NAMES, stability_error, threshold_at_recall

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = [ROOT / "configs" / "compare" / f"{name}_shapes.yaml" for name in ("ssdlite", "yolov3", "yolov1")]



def at_recall(result, class_names: list[str], recall: float) -> dict:
    """E_F, E_C, E_R, Phi at the score threshold where the model detects ``recall`` of the objects."""
    try:
        threshold = threshold_at_recall(result.stability.matched, recall)
    except ValueError:  # never reaches that recall
        return {"threshold": float("nan"), **{k: float("nan") for k in ERROR_NAMES}}
    at = stability_error(result.stability.matched, class_names, fixed_threshold=threshold, thresholds=())
    return {"threshold": threshold, **dict(zip(ERROR_NAMES, map(float, at.fixed))),
            **{f"{k}_ci": bootstrap_ci(getattr(at.tracks, k)) for k in ("fragment", "center", "scale_ratio")}}


def bootstrap_ci(per_track: np.ndarray, draws: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% interval of the mean over tracks (tracks resampled with replacement; NaN tracks left out).
    How far one set of 39 tracks pins a figure down, not a class-mean figure."""
    values = per_track[~np.isnan(per_track)]
    if len(values) < 2:
        return (float("nan"), float("nan"))
    means = np.random.default_rng(seed).choice(values, (draws, len(values))).mean(axis=1)
    return tuple(float(x) for x in np.quantile(means, [0.025, 0.975]))


def score_run(run_dir: Path, videos: Path, recall: float) -> dict:
    """One row: the run's model (best.pt, else last.pt) on the videos."""
    ckpt = run_dir / "best.pt" if (run_dir / "best.pt").exists() else run_dir / "last.pt"
    loaded = load_detector(ckpt, device="cpu")
    result, frames = evaluate_on_video(loaded, videos)
    metrics = read_metrics_csv(run_dir / "metrics.csv")
    return {"model": run_dir.name, "arch": loaded.cfg.model.arch, "steps": metrics[-1]["step"] if metrics else "?",
            "candidates": sum(r.candidates for r in loaded.detector.layout),
            **stability_column(result, frames, str(videos)),
            "at_recall": at_recall(result, loaded.class_names, recall)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--minutes", type=float, default=12.0, help="training budget per model (whole run)")
    p.add_argument("--videos", type=int, default=8)
    p.add_argument("--frames", type=int, default=60)
    p.add_argument("--video-seed", type=int, default=1000)
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "stability")
    p.add_argument("--runs", type=Path, nargs="+", help="finished run folders to score instead of training")
    p.add_argument("--recall", type=float, default=0.5,
                   help="also compare at the score threshold where each model detects this share of the objects")
    args = p.parse_args()
    videos = args.out / "videos"
    if not (videos / "classes.txt").is_file():
        write_moving_shapes(videos, args.videos, args.frames, seed=args.video_seed)
    runs = args.runs or train_all(CONFIGS, args.out / "runs", args.minutes, None, progress=False)[0]
    rows = []
    for run_dir in runs:
        rows.append(score_run(Path(run_dir), videos, args.recall))
        print(json.dumps(rows[-1]), flush=True)
    print(f"\nCPU: {cpu_info().headline()}; python {platform.python_version()}, torch {torch.__version__}")
    print(f"{rows[0]['frames']} frames of held-out videos in {videos} (seed {args.video_seed}), "
          f"{rows[0]['tracks']} tracks")
    head = (f"{'model':<16} {'steps':>6} {'cand.':>6} {'mAP50':>6} | averaged over 0.1..0.9: {'E_F':>6} {'E_C':>6} "
            f"{'E_R':>6} {'Phi':>6} | at {rows[0]['stability_threshold']:g}: {'found':>6} {'E_F':>6} {'E_C':>6} "
            f"{'E_R':>6} {'Phi':>6}")
    print(head)
    for r in rows:
        avg = " ".join(f"{r['stability_' + k]:6.3f}" for k in ("fragment", "center", "scale_ratio", "total"))
        fix = " ".join(f"{r['stability_' + k + '_fixed']:6.3f}" for k in ("fragment", "center", "scale_ratio", "total"))
        print(f"{r['model']:<16} {r['steps']:>6} {r['candidates']:>6} {r['voc_ap50']:6.3f} | {'':>23}{avg} | "
              f"{'':>6}{r['found_fixed']:6.3f} {fix}")
    print(f"\nat equal recall: each model at the score threshold where it detects {args.recall:.0%} of the "
          "annotated objects (a fixed threshold confounds steadiness with recall: an object never detected "
          "never flickers)")
    print(f"{'model':<16} {'thresh.':>7} {'E_F':>6} {'E_C':>6} {'E_R':>6} {'Phi':>6} | mean over tracks, 95% bootstrap "
          "interval: E_F, E_C, E_R")
    for r in rows:
        a = r["at_recall"]
        ci = "  ".join(f"[{a[k + '_ci'][0]:.3f}, {a[k + '_ci'][1]:.3f}]" for k in ("fragment", "center", "scale_ratio"))
        print(f"{r['model']:<16} {a['threshold']:7.3f} " + " ".join(f"{a[k]:6.3f}" for k in ERROR_NAMES) + f" | {ci}")


if __name__ == "__main__":
    main()
