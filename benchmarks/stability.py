"""Is YOLOv1 (98 candidates) less stable on video than SSD and YOLOv3? (seed 000, issue 18)

    PYTHONPATH=src .venv/bin/python benchmarks/stability.py [--minutes 3] [--size 128] [--backbone tiny]
        [--videos 4] [--frames 50] [--models ssdlite yolov3 yolov1]

Trains the SSDLite, YOLOv3 and YOLOv1 heads on the same backbone (default the small ``tiny``
CPU backbone of configs/yolov1_shapes.yaml, 4x cheaper per step than MobileNetV2 width 0.5:
``--backbone mobilenet_v2``), the same input size and the same time budget, each with its own shapes
config's recipe otherwise (configs/demo_shapes.yaml, yolov3_shapes.yaml, yolov1_shapes.yaml:
optimizer, augmentation preset), on the built-in shapes *images*. Then scores each on the
same held-out generated *videos* (``onestage data make-video``, a seed no training image
uses): VOC mAP@0.5 on every frame and the stability error (Zhang & Wang 2016) averaged over
score thresholds 0.1..0.9 and at the display threshold. Prints one table (and the CPU).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from pathlib import Path

import torch

from onestage.build import build_detector, build_eval_dataset, read_dataset
from onestage.config import load_config
from onestage.data.moving_shapes import write_moving_shapes
from onestage.engine.checkpoint import load_checkpoint
from onestage.engine.evaluate import evaluate
from onestage.engine.trainer import train

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"ssdlite": "demo_shapes.yaml", "yolov3": "yolov3_shapes.yaml", "yolov1": "yolov1_shapes.yaml"}
BACKBONES = {"tiny": ["model.backbone=tiny"],
             "mobilenet_v2": ["model.backbone=mobilenet_v2", "model.width_mult=0.5", "model.mobilenet_taps=expansion"]}
YOLOV3_ANCHOR_SIZE = 320  # configs/yolov3_shapes.yaml's anchors are pixels at input 320


def cpu_name() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?")
    return f"{model} ({torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()})"


def model_overrides(name: str, backbone: str, size: int, minutes: float, out: Path) -> list[str]:
    base, extra = CONFIGS[name], BACKBONES[backbone]
    over = [f"model.input_size={size}", f"train.time_budget={minutes}", f"train.out_dir={out}",
            f"train.name={name}", "data.val.num_images=32", "train.eval_every=1000",
            # equal terms for a short budget: the same short warmup, 1000 distinct training images
            "schedule.warmup_steps=10", "data.train.num_images=1000", *extra]
    if name == "yolov3":
        cfg = load_config(ROOT / "configs" / base)
        k = size / YOLOV3_ANCHOR_SIZE
        sizes = [[[round(w * k), round(h * k)] for w, h in scale] for scale in cfg.model.anchors.sizes]
        over.append(f"model.anchors.sizes={json.dumps(sizes)}")
    return over


def score_on_videos(name: str, backbone: str, size: int, run_dir: Path, videos: Path) -> dict:
    cfg = load_config(ROOT / "configs" / CONFIGS[name], model_overrides(name, backbone, size, 1, run_dir.parent)
                      + [f"data.val={{format: mot, root: {videos}}}"])
    ckpt = load_checkpoint(run_dir / "last.pt")
    class_names = list(ckpt["class_names"])
    detector = build_detector(cfg, class_names)
    state = ckpt["ema"]["shadow"] if ckpt.get("ema") is not None and cfg.ema.use_for_eval else ckpt["model"]
    detector.model.load_state_dict(state)
    spec = read_dataset(cfg.data.val, cfg, class_names=class_names)
    dataset = build_eval_dataset(cfg, spec, class_names)
    start = time.perf_counter()
    result, _ = evaluate(detector, dataset, cfg, torch.device("cpu"), progress=False)
    m = result.metrics
    t = result.stability.tracks  # per track at the fixed threshold
    return {
        "model": name, "candidates": sum(r.candidates for r in detector.layout),
        "map50": m["voc_ap50"], **{k: v for k, v in m.items() if k.startswith("stability_")},
        "found_fixed": float(t.detected.sum() / max(t.length.sum(), 1)),  # objects detected at the threshold
        "frames": len(dataset), "eval_s": time.perf_counter() - start,
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--minutes", type=float, default=3.0, help="training budget per model")
    p.add_argument("--size", type=int, default=128, help="input size of every model")
    p.add_argument("--backbone", default="tiny", choices=list(BACKBONES), help="the backbone of every model")
    p.add_argument("--videos", type=int, default=4)
    p.add_argument("--frames", type=int, default=50)
    p.add_argument("--video-seed", type=int, default=1000)
    p.add_argument("--models", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "stability")
    p.add_argument("--skip-training", action="store_true", help="score the runs already in --out")
    args = p.parse_args()
    videos = args.out / "videos"
    if not (videos / "classes.txt").is_file():
        write_moving_shapes(videos, args.videos, args.frames, seed=args.video_seed)
    rows = []
    for name in args.models:
        run_dir = args.out / name
        if not args.skip_training:
            cfg = load_config(ROOT / "configs" / CONFIGS[name],
                              model_overrides(name, args.backbone, args.size, args.minutes, args.out))
            summary = train(cfg, run_dir, progress=False)
            print(f"[{name}] trained {summary.get('images_seen')} images in {summary.get('seconds', 0) / 60:.1f} min",
                  flush=True)
        rows.append(score_on_videos(name, args.backbone, args.size, run_dir, videos))
        print(json.dumps(rows[-1]), flush=True)
    print(f"\nCPU: {cpu_name()}; python {platform.python_version()}, torch {torch.__version__}")
    print(f"{args.videos} held-out videos x {args.frames} frames (320x240, seed {args.video_seed}); "
          f"{args.backbone} backbone, input {args.size}, {args.minutes:g} min of training per model on shapes images")
    head = (f"{'model':<8} {'cand.':>6} {'mAP50':>6} | averaged over 0.1..0.9: {'E_F':>6} {'E_C':>6} {'E_R':>6} "
            f"{'Phi':>6} | at {rows[0]['stability_threshold']:g}: {'found':>6} {'E_F':>6} {'E_C':>6} {'E_R':>6} {'Phi':>6}")
    print(head)
    for r in rows:
        avg = " ".join(f"{r['stability_' + k]:6.3f}" for k in ("fragment", "center", "scale_ratio", "total"))
        fix = " ".join(f"{r['stability_' + k + '_fixed']:6.3f}" for k in ("fragment", "center", "scale_ratio", "total"))
        print(f"{r['model']:<8} {r['candidates']:>6} {r['map50']:6.3f} | {'':>23}{avg} | {'':>6}{r['found_fixed']:6.3f} {fix}")


if __name__ == "__main__":
    main()
