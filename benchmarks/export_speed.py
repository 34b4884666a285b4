"""Eager PyTorch vs onnxruntime: latency at batch 1, throughput at batch 16, share of decode + NMS.

For the demo model (``configs/demo_shapes.yaml``: MobileNetV2-SSDLite, width 0.5, input 256,
3 classes) and SSD300-VGG16 (``configs/ssd300_vgg16_voc.yaml``, input 300, 20 classes), with
random weights (speed does not depend on them): each is written as a checkpoint, exported with
``onestage export --nms --dynamic-batch`` (which checks itself), and both are timed in one run
on the same network inputs:

- eager: ``load_detector(ckpt, overrides=["precision.amp=false"])``: fp32 as the exported file
  (channels_last as the checkpoint's default), ``model`` then the family's post-processor;
- onnxruntime: the exported file with NMS in the graph, CPU provider, the same thread count.

Pre-processing (the same numpy code on both paths) is left out. Decode + NMS share: eager,
the post-processor's time over the whole; onnxruntime, the file minus a graph of the bare
model (no decode, no NMS), over the file. Runs of the two paths alternate, so that a busy
machine slows both alike; the medians are printed with their ratios and the CPU.

    .venv/bin/python benchmarks/export_speed.py [--threads 2] [--runs 20] [--only demo]
"""

from __future__ import annotations

import argparse
import io
import statistics
import subprocess
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

import onestage
from onestage.build import build_detector
from onestage.config import dump_config, load_config
from onestage.engine.checkpoint import save_checkpoint
from onestage.export.onnx import export_onnx

ROOT = Path(__file__).resolve().parents[1]
SPREAD = 30.0  # scale of the classification layers' random weights (write_checkpoint)
MODELS = {
    "demo": ("demo_shapes.yaml", ["circle", "square", "triangle"]),
    "ssd300_vgg16": ("ssd300_vgg16_voc.yaml", [f"class{i}" for i in range(20)]),
}


def cpu_name() -> str:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?")
    return f"{model}, torch.backends.cpu.get_cpu_capability() = {torch.backends.cpu.get_cpu_capability()}"


def write_checkpoint(config: str, names: list[str], path: Path) -> Path:
    """Random weights, the classification layers scaled up: an untrained head scores every
    candidate below the 0.01 threshold, and NMS would then time nothing; scaled, the scores
    spread over [0, 1] and NMS works on hundreds of candidates per class, as with a trained model."""
    cfg = load_config(ROOT / "configs" / config)
    torch.manual_seed(0)
    state = build_detector(cfg, names).model.state_dict()
    for key, value in state.items():
        if "cls_predictors" in key and key.endswith("weight"):
            value.mul_(SPREAD)
    save_checkpoint(path, {"version": onestage.__version__, "config": dump_config(cfg), "class_names": names,
                           "model": state, "ema": None})
    return path


def bare_model_session(model: torch.nn.Module, size: int, threads: int) -> ort.InferenceSession:
    """The model alone (raw outputs, no decode, no NMS) through onnxruntime."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 3, size, size),), buffer, dynamo=False, opset_version=17,
                          input_names=["images"], dynamic_axes={"images": {0: "batch"}})
    return session(buffer.getvalue(), threads)


def session(model: str | bytes, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    # onnxruntime's threads spin after each run by default, taking the cores from the eager run
    # that follows; without spinning the two paths alternate fairly.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def timed(fn, x) -> float:
    start = time.perf_counter()
    fn(x)
    return time.perf_counter() - start


def measure(name: str, threads: int, runs: int, work: Path) -> dict[str, float]:
    config, names = MODELS[name]
    ckpt = write_checkpoint(config, names, work / f"{name}.pt")
    path = work / f"{name}.onnx"
    print(export_onnx(ckpt, path, nms=True, dynamic_batch=True, check_images=1).summary())
    candidates: list[int] = []
    loaded = onestage.load_detector(ckpt, device="cpu", overrides=["precision.amp=false"])
    model, post, size = loaded.detector.model, loaded.detector.postprocess, loaded.input_size
    full, bare = session(str(path), threads), bare_model_session(model, size, threads)

    def eager_model(x):
        with torch.no_grad():
            return model(torch.from_numpy(x).contiguous(memory_format=torch.channels_last))

    def eager(x):
        with torch.no_grad():
            dets = post(eager_model(x))
        candidates.append(sum(len(d) for d in dets) // len(dets))
        return dets

    def onnx_full(x):
        return full.run(None, {"images": x})

    def onnx_bare(x):
        return bare.run(None, {"images": x})

    rng = np.random.default_rng(0)
    result: dict[str, float] = {}
    for batch, count in ((1, runs), (16, max(3, runs // 5))):
        x = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
        times: dict[str, list[float]] = {k: [] for k in ("eager", "eager_model", "onnx", "onnx_model")}
        for fn in (eager, eager_model, onnx_full, onnx_bare):  # warm-up
            fn(x)
        for _ in range(count):  # alternate the paths, so load changes hit them alike
            times["eager"].append(timed(eager, x))
            times["onnx"].append(timed(onnx_full, x))
            times["eager_model"].append(timed(eager_model, x))
            times["onnx_model"].append(timed(onnx_bare, x))
        med = {k: statistics.median(v) for k, v in times.items()}
        result[f"b{batch}_eager"], result[f"b{batch}_onnx"] = med["eager"], med["onnx"]
        result[f"b{batch}_eager_post_share"] = max(0.0, med["eager"] - med["eager_model"]) / med["eager"]
        result[f"b{batch}_onnx_post_share"] = max(0.0, med["onnx"] - med["onnx_model"]) / med["onnx"]
    result["detections"] = statistics.median(candidates)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="threads for both paths (default 2)")
    parser.add_argument("--runs", type=int, default=20, help="timed runs at batch 1 (batch 16: a fifth)")
    parser.add_argument("--only", choices=sorted(MODELS), help="one model only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"CPU: {cpu_name()}; {args.threads} threads for PyTorch and onnxruntime {ort.__version__}; "
          f"torch {torch.__version__}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in [args.only] if args.only else list(MODELS):
            r = measure(name, args.threads, args.runs, Path(tmp))
            rows.append((name, r))
    print()
    print(f"{'model':<14}{'batch 1 latency ms':>26}{'ratio':>8}{'batch 16 images/s':>26}{'ratio':>8}"
          f"{'decode+NMS share b1':>24}")
    print(f"{'':<14}{'eager':>13}{'onnxrt':>13}{'ort/eag':>8}{'eager':>13}{'onnxrt':>13}{'ort/eag':>8}"
          f"{'eager':>12}{'onnxrt':>12}")
    for name, r in rows:
        print(f"{name:<14}{r['b1_eager'] * 1e3:>13.1f}{r['b1_onnx'] * 1e3:>13.1f}{r['b1_onnx'] / r['b1_eager']:>8.2f}"
              f"{16 / r['b16_eager']:>13.1f}{16 / r['b16_onnx']:>13.1f}{r['b16_eager'] / r['b16_onnx']:>8.2f}"
              f"{r['b1_eager_post_share']:>12.1%}{r['b1_onnx_post_share']:>12.1%}")
    print("latency ratio: onnxruntime / eager (below 1: onnxruntime faster; the issue's goal 0.67 for the demo); "
          "throughput ratio: onnxruntime / eager images per second")
    for name, r in rows:
        print(f"{name}: decode+NMS share at batch 16: eager {r['b16_eager_post_share']:.1%}, "
              f"onnxruntime {r['b16_onnx_post_share']:.1%}; {r['detections']:.0f} detections per image after NMS")


if __name__ == "__main__":
    main()
