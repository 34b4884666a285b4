"""Frames/s of decoding and of decoding + prediction of a 640x480 video (issue 18: >= 15 frames/s
with the demo model on 2 CPU cores).

    PYTHONPATH=src .venv/bin/python benchmarks/video_speed.py [--frames 150] [--batch 16]

Writes a 640x480 moving-shapes video, then times, side by side in one run: decoding alone
(PyAV), decoding + the demo model (configs/demo_shapes.yaml: MobileNetV2-SSDLite width 0.5 at
input 256, the config's precision settings) + post-processing, and the whole
``predict_video`` (also drawing and H.264-encoding the annotated video). The model has
random weights (no checkpoint ships with the project); with trained weights the score
threshold leaves fewer boxes, so post-processing and drawing only get cheaper.
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from onestage.build import build_detector, build_transform
from onestage.config import load_config
from onestage.data.moving_shapes import render_video
from onestage.data.shapes import SHAPE_CLASSES
from onestage.engine.precision import autocast_context
from onestage.video import predict_video, read_video_frames, write_video

ROOT = Path(__file__).resolve().parents[1]


class _Prediction:
    def __init__(self, boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray):
        self.boxes, self.scores, self.labels = boxes, scores, labels


def demo_predict_fn(threshold: float):
    """predict(list of RGB frames) -> predictions in frame pixels, with the demo model.

    The stand-in for ``onestage.api.load_detector(ckpt).predict`` (same contract)."""
    cfg = load_config(ROOT / "configs" / "demo_shapes.yaml")
    detector = build_detector(cfg, list(SHAPE_CLASSES))
    model = detector.model.eval()
    if cfg.precision.channels_last:
        model = model.to(memory_format=torch.channels_last)
    transform = build_transform(cfg, train=False)
    device = torch.device("cpu")
    no_boxes, no_labels = np.zeros((0, 4), np.float32), np.zeros(0, np.int64)

    @torch.no_grad()
    def predict(frames: list[np.ndarray]) -> list[_Prediction]:
        x = torch.stack([transform(f, no_boxes, no_labels)[0] for f in frames])
        if cfg.precision.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast_context(cfg.precision, device):
            dets = detector.postprocess(model(x))
        h, w = frames[0].shape[:2]
        out = []
        for d in dets:
            keep = d.scores.float() >= threshold
            boxes = transform.invert_boxes(d.boxes[keep].float().numpy(), w, h)
            out.append(_Prediction(np.asarray(boxes), d.scores[keep].float().numpy(), d.labels[keep].numpy()))
        return out

    return predict


def cpu_name() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?")
    return f"{model} ({torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()})"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--frames", type=int, default=150)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threshold", type=float, default=0.4)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        video = Path(tmp) / "clip.mp4"
        write_video(video, render_video(np.random.default_rng(0), 640, 480, args.frames).frames, fps=30)
        predict = demo_predict_fn(args.threshold)
        predict([np.zeros((480, 640, 3), np.uint8)] * 2)  # warm-up: first-call allocations

        start = time.perf_counter()
        n = sum(1 for _ in read_video_frames(video)[0])
        decode = n / (time.perf_counter() - start)

        start = time.perf_counter()
        frames, batch, n = read_video_frames(video)[0], [], 0
        for f in frames:
            batch.append(f)
            if len(batch) == args.batch:
                n += len(predict(batch))
                batch = []
        n += len(predict(batch)) if batch else 0
        decode_predict = n / (time.perf_counter() - start)

        summary = predict_video(predict, SHAPE_CLASSES, video, Path(tmp) / "out", batch_size=args.batch,
                                threshold=args.threshold, progress=False)
    print(f"CPU: {cpu_name()}; torch {torch.__version__}")
    print(f"640x480, {args.frames} frames, batch {args.batch}, demo model (random weights)")
    print(f"decode only                          {decode:7.1f} frames/s")
    print(f"decode + predict                     {decode_predict:7.1f} frames/s")
    print(f"predict_video (+ draw + encode mp4)  {summary['frames_per_second']:7.1f} frames/s")


if __name__ == "__main__":
    main()
