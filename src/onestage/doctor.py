"""``onestage doctor [CONFIG]``: what to know about this machine before training (issue 15).

Without a config: torch's version and build, the CPU (model, capability, native bf16 or not),
threads, CUDA devices and their bf16 / fp16 support. With a config: the model's step time and
images/s in each precision and memory format on a batch of the config's training data (its
batch and input size), training (forward + loss + backward) and evaluation (forward), and the
choice ``precision.amp: auto`` makes.
On the CPU the measurement refreshes the calibration cache that runs read.
"""

from __future__ import annotations

from typing import Any

import torch

from onestage.config import Config
from onestage.engine.calibrate import (
    DEFAULT_TIME_LIMIT,
    SLOW_STOP_FACTOR,
    DeviceKind,
    LossFn,
    Mode,
    PrecisionCache,
    calibration_modes,
    cpu_info,
    decide_precision,
    device_kind,
    measure_precision_modes,
    mode_key,
    resolve_precision,
)


def _cuda_devices() -> list[dict[str, Any]]:
    devices = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        with torch.cuda.device(i):
            bf16 = torch.cuda.is_bf16_supported()
        devices.append({
            "index": i, "name": props.name, "compute_capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1), "bf16": bf16,
            # fp16 runs on every CUDA GPU; tensor cores (where it pays) from compute capability 7.0.
            "fp16_tensor_cores": props.major >= 7,
        })
    return devices


def machine_report() -> dict[str, Any]:
    return {
        "torch": torch.__version__,
        "build": f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU only",
        "cpu": cpu_info().to_json(),
        "threads": torch.get_num_threads(),
        "cuda_devices": _cuda_devices() if torch.cuda.is_available() else [],
        "cache": str(PrecisionCache().path),
    }


def _gpu_modes(kind: DeviceKind) -> list[Mode]:
    dtypes = [None, torch.float16] + ([torch.bfloat16] if kind.bf16 else [])
    return [(d, cl) for d in dtypes for cl in (True, False)]


def _measure(cfg: Config, model: torch.nn.Module, images: torch.Tensor, loss_fn: LossFn | None,
             device: torch.device, *, time_limit: float, cache: bool) -> dict[str, Any]:
    """Timings of every mode, the config's own decision and the one ``auto`` makes.
    ``loss_fn`` None: evaluation (forward only), else a training step (forward + loss + backward)."""
    train = loss_fn is not None
    shape = tuple(images.shape)
    kind = device_kind(device)
    modes = _gpu_modes(kind) if kind.type == "cuda" else calibration_modes(cfg.precision, kind)
    if kind.type == "cpu":
        configured = resolve_precision(cfg.precision, model, shape, device, train=train, cache=cache, refresh=True,
                                       time_limit=time_limit, images=images, loss_fn=loss_fn)
        timings = configured.timings
    else:  # nothing to calibrate on a GPU, but the figures are worth seeing
        timings = measure_precision_modes(model, shape, device, train=train, modes=modes, time_limit=time_limit,
                                          images=images, loss_fn=loss_fn)
        configured = decide_precision(cfg.precision, kind, timings)
    auto = decide_precision(cfg.precision.model_copy(update={"amp": "auto", "channels_last": "auto"}), kind, timings)
    return {
        "modes": {k: {"seconds_per_step": t, "images_per_second": shape[0] / t} for k, t in timings.items()},
        # dropped after one step of their dtype took SLOW_STOP_FACTOR x the fastest
        "skipped": [mode_key(*m) for m in modes if mode_key(*m) not in timings],
        "auto": auto.to_json(),
        "configured": configured.to_json(),
    }


def config_report(
    cfg: Config, device: torch.device, *, time_limit: float = DEFAULT_TIME_LIMIT, cache: bool = True
) -> dict[str, Any]:
    """Time the config's model on a batch of its training data at its batch size, a training step
    (forward + loss + backward) and an evaluation forward, in every precision and memory format."""
    from onestage.build import build_datasets, build_detector
    from onestage.data.base import collate

    train_ds, *_ = build_datasets(cfg)
    train_ds.seed = cfg.seed
    detector = build_detector(cfg, train_ds.class_names)
    detector.criterion.to(device)
    batch_size = cfg.train.batch_size
    batch = collate([train_ds[i % len(train_ds)] for i in range(batch_size)])  # (B, 3, S, S) augmented
    boxes, labels = batch["boxes"].to(device), batch["labels"].to(device)

    def loss_fn(outputs: Any) -> torch.Tensor:
        return detector.criterion(outputs, boxes, labels)["total"]

    args = {"time_limit": time_limit, "cache": cache}
    return {
        "model": f"{cfg.model.arch} {cfg.model.backbone} x{cfg.model.width_mult} at {cfg.model.input_size}",
        "batch_shape": list(batch["images"].shape),
        "device": str(device),
        "precision": {"amp": cfg.precision.amp, "channels_last": cfg.precision.channels_last},
        "train": _measure(cfg, detector.model, batch["images"], loss_fn, device, **args),
        "eval": _measure(cfg, detector.model, batch["images"], None, device, **args),
    }


def format_report(machine: dict[str, Any], config: dict[str, Any] | None) -> str:
    cpu = machine["cpu"]
    lines = [
        f"torch {machine['torch']} ({machine['build']}), {machine['threads']} thread{'' if machine['threads'] == 1 else 's'}",
        f"CPU: {cpu['model']}",
        f"  capability {cpu['capability']}, flags: {' '.join(cpu['flags']) or 'none of avx2/avx512f/avx512_bf16/amx_bf16'}",
        f"  {cpu['description']}" + ("" if cpu["native_bf16"] else ": bf16 autocast is emulated, usually much slower"),
    ]
    for d in machine["cuda_devices"]:
        lines.append(f"CUDA {d['index']}: {d['name']} (compute {d['compute_capability']}, {d['memory_gib']} GiB), "
                     f"bf16 {'yes' if d['bf16'] else 'no'}, fp16 tensor cores {'yes' if d['fp16_tensor_cores'] else 'no'}")
    if not machine["cuda_devices"]:
        lines.append("CUDA: no device")
    lines.append(f"calibration cache: {machine['cache']}")
    if config is None:
        return "\n".join(lines)
    b = config["batch_shape"]
    lines.append(f"\n{config['model']}, batch {b[0]} ({'x'.join(map(str, b))}) on {config['device']}")
    for part, title in (("train", "training step (forward + loss + backward)"), ("eval", "evaluation (forward, no grad)")):
        result = config[part]
        lines.append(f"  {title:<42} s/step  images/s")
        for key, m in result["modes"].items():
            lines.append(f"    {key:<40} {m['seconds_per_step']:7.3f}  {m['images_per_second']:8.1f}")
        for key in result["skipped"]:
            lines.append(f"    {key:<40} not measured: a step of its dtype took over {SLOW_STOP_FACTOR:.0f}x the fastest")
        lines.append(f"    auto: {result['auto']['reason']}")
        p = config["precision"]
        if (p["amp"], p["channels_last"]) != ("auto", "auto"):
            amp, layout = (str(v).lower() for v in (p["amp"], p["channels_last"]))
            lines.append(f"    this config (amp={amp}, channels_last={layout}): {result['configured']['reason']}")
        if result["configured"]["warning"]:
            lines.append(f"    warning: {result['configured']['warning']}")
    return "\n".join(lines)
