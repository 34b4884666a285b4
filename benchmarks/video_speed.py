"""Frames/s of decoding and of decoding + prediction of a 640x480 video (issue 18: >= 15 frames/s
with the demo model on 2 CPU cores).

    PYTHONPATH=src .venv/bin/python benchmarks/video_speed.py [--frames 150] [--batch 16]

Writes a 640x480 moving-shapes video, then times, side by side in one run: decoding alone
(PyAV), decoding + ``onestage.api`` prediction with the demo model (configs/demo.yaml: SSD on the
``tiny`` CPU backbone at input 192, precision chosen by the API's measurement; ``--config`` names
another, e.g. configs/demo_shapes.yaml, MobileNetV2-SSDLite width 0.5 at 256), and the whole
``predict_video`` (also drawing and H.264-encoding the annotated video). The model has
random weights (no checkpoint ships with the project); with trained weights the score
threshold leaves fewer boxes, so post-processing and drawing only get cheaper.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from onestage.api import load_detector
from onestage.build import build_detector
from onestage.config import dump_config, load_config
from onestage.data.moving_shapes import render_video
from onestage.data.shapes import SHAPE_CLASSES
from onestage.engine.calibrate import cpu_info
from onestage.engine.checkpoint import save_checkpoint
from onestage.video import predict_video, read_video_frames, write_video

ROOT = Path(__file__).resolve().parents[1]


def demo_checkpoint(path: Path, config: Path) -> Path:
    """A checkpoint of the model of ``config`` with random weights, in the format ``onestage train``
    writes, so that the API loads it as it loads a trained one."""
    cfg = load_config(config)
    detector = build_detector(cfg, list(SHAPE_CLASSES))
    return save_checkpoint(path, {"model": detector.model.state_dict(), "config": dump_config(cfg),
                                  "class_names": list(SHAPE_CLASSES)})



def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--frames", type=int, default=150)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--threshold", type=float, default=0.4)
    p.add_argument("--config", type=Path, default=ROOT / "configs" / "demo.yaml", help="the model to time")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        video = Path(tmp) / "clip.mp4"
        write_video(video, render_video(np.random.default_rng(0), 640, 480, args.frames).frames, fps=30)
        det = load_detector(demo_checkpoint(Path(tmp) / "demo.pt", args.config), batch_size=args.batch)  # precision: auto

        def predict(frames: list[np.ndarray]) -> list:
            return det.predict(frames, threshold=args.threshold, batch_size=len(frames))

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
    print(f"CPU: {cpu_info().headline()}; torch {torch.__version__}")
    print(f"640x480, {args.frames} frames, batch {args.batch}, {args.config.name} model (random weights), "
          f"precision {'bf16 autocast' if det.cfg.precision.amp else 'fp32'} (chosen by the API)")
    print(f"decode only                          {decode:7.1f} frames/s")
    print(f"decode + predict                     {decode_predict:7.1f} frames/s")
    print(f"predict_video (+ draw + encode mp4)  {summary['frames_per_second']:7.1f} frames/s")


if __name__ == "__main__":
    main()
