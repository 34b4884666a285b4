"""Precision chosen by measurement (issue 15): ``precision.amp: auto`` and ``channels_last: auto``.

bf16 autocast is about twice as fast as fp32 on a CPU with native bf16 (AVX512-BF16 / AMX) and
about ten times SLOWER on one without (AVX2: every bf16 op is emulated and converted). Which one
a machine is cannot be read off reliably (hypervisors hide flags, ``ATEN_CPU_CAPABILITY`` and
``ONEDNN_MAX_CPU_ISA`` cap what torch uses), so on the CPU the choice is made by timing a few
steps of the actual model at the run's batch shape in each mode, once per machine, model and
shape (cached). On CUDA autocast is always the faster choice: bf16 where the GPU supports it
(no loss scaling), else fp16 with the loss scaler; no measurement.

Pieces, each usable alone:
- ``cpu_info`` / ``device_kind``: what the machine is (model name, capability, native bf16).
- ``decide_precision``: PURE; device kind + requested config + timings -> ``PrecisionDecision``.
- ``measure_precision_modes``: seconds per step in each mode, on a deep copy of the model.
- ``PrecisionCache``: one JSON file per machine, keyed by CPU, torch, model and batch shape.
- ``resolve_precision``: the one entry point (trainer, evaluation, predict, doctor).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import platform
import statistics
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Protocol

import torch
from torch import Tensor, nn

from onestage.config import PrecisionConfig

AMP_MIN_SPEEDUP = 1.1  # auto leaves fp32 only for a clear gain: bf16 changes numerics, timings are noisy
LAYOUT_MIN_SPEEDUP = 1.1  # auto leaves channels_last (the tuned default) only for a clear gain
SLOW_WARNING_RATIO = 1.5  # an explicit choice measured this much slower than the alternative warns
# One step this many times the fastest comparable one ends that dtype's measurement: it will not be
# chosen (auto needs 1.1x faster) and is warned about if forced (1.5x); AVX2 bf16 is 7-13x.
SLOW_STOP_FACTOR = 4.0
DEFAULT_TIME_LIMIT = 6.0  # seconds for the whole calibration; at least one warmup and one timed step per mode
DEFAULT_MAX_STEPS = 3  # timed steps per mode at most (after one warmup step each)
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
# oneDNN ISA caps (ONEDNN_MAX_CPU_ISA) below AVX512_CORE_BF16: bf16 convolutions are emulated.
_ONEDNN_ISA_WITHOUT_BF16 = {"SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI"}
_DTYPE_SHORT = {torch.float16: "fp16", torch.bfloat16: "bf16"}
_DTYPE_CONFIG = {torch.float16: "float16", torch.bfloat16: "bfloat16"}

Mode = tuple[Optional[torch.dtype], bool]  # (autocast dtype, None = fp32; channels_last)


# ----------------------------------------------------------------------------- the machine
@dataclass(frozen=True)
class CpuInfo:
    model: str  # "Intel(R) Xeon(R) Processor" (lscpu's model name)
    capability: str  # torch.backends.cpu.get_cpu_capability(): "AVX2", "AVX512", "DEFAULT", ...
    flags: tuple[str, ...]  # those of CPU_FLAGS the CPU reports
    threads: int  # torch.get_num_threads()
    onednn_max_isa: str | None  # $ONEDNN_MAX_CPU_ISA when set (caps oneDNN's kernels)

    @property
    def hardware_bf16(self) -> bool:
        return any(f in self.flags for f in NATIVE_BF16_FLAGS)

    @property
    def native_bf16(self) -> bool:
        """bf16 instructions present AND torch allowed to use them (not capped by the env vars)."""
        capped = not self.capability.upper().startswith("AVX512") or (
            self.onednn_max_isa is not None and self.onednn_max_isa.upper() in _ONEDNN_ISA_WITHOUT_BF16
        )
        return self.hardware_bf16 and not capped

    def describe(self) -> str:
        """``AVX2 CPU without native bf16`` / ``AVX512 CPU with native bf16 (avx512_bf16, amx_bf16)``."""
        hw = [f for f in self.flags if f in NATIVE_BF16_FLAGS]
        if self.native_bf16:
            return f"{self.capability} CPU with native bf16 ({', '.join(hw)})"
        text = f"{self.capability} CPU without native bf16"
        if hw:  # e.g. ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 on an AMX machine
            text += f" (torch capped below the hardware's {', '.join(hw)})"
        return text

    def headline(self) -> str:
        """The line a benchmark prints with its figures: model name, threads and what the CPU does
        with bf16, e.g. ``Intel(R) Xeon(R) Processor (2 threads, AVX512 CPU with native bf16 (...))``."""
        return f"{self.model} ({self.threads} threads, {self.describe()})"

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "native_bf16": self.native_bf16, "description": self.describe()}


def _cpuinfo_field(name: str) -> str | None:
    """The first ``name : value`` line of /proc/cpuinfo (Linux), or None elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == name:
            return value.strip()
    return None


def cpu_info() -> CpuInfo:
    model = _cpuinfo_field("model name") or platform.processor() or platform.machine() or "unknown CPU"
    flags = set((_cpuinfo_field("flags") or "").split())
    return CpuInfo(
        model=model,
        capability=torch.backends.cpu.get_cpu_capability(),
        flags=tuple(f for f in CPU_FLAGS if f in flags),
        threads=torch.get_num_threads(),
        onednn_max_isa=os.environ.get("ONEDNN_MAX_CPU_ISA") or None,
    )


@dataclass(frozen=True)
class DeviceKind:
    """What the decision needs to know about the device (built by ``device_kind``, or by hand in tests)."""

    type: str  # "cpu" | "cuda" | another torch device type
    bf16: bool  # CUDA: torch.cuda.is_bf16_supported(); CPU: native bf16 kernels (CpuInfo.native_bf16)
    description: str  # for messages: "AVX2 CPU without native bf16", "CUDA device NVIDIA H200"


def device_kind(device: torch.device) -> DeviceKind:
    if device.type == "cpu":
        info = cpu_info()
        return DeviceKind("cpu", info.native_bf16, info.describe())
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return DeviceKind("cuda", torch.cuda.is_bf16_supported(), f"CUDA device {name}")
    return DeviceKind(device.type, False, f"{device.type} device")


def static_amp_guess(device: torch.device) -> bool:
    """``amp: auto`` before (or without) a calibration: on where it is known to pay off.

    CUDA: yes. CPU: only with native bf16 kernels. ``resolve_precision`` replaces this guess
    with a measurement; it only serves code that uses an unresolved config.
    """
    if device.type == "cuda":
        return True
    return device.type == "cpu" and cpu_info().native_bf16


# ----------------------------------------------------------------------------- the decision
def mode_key(dtype: torch.dtype | None, channels_last: bool) -> str:
    """``fp32``, ``bf16``, ``fp16``, each with ``+channels_last`` or not: the timings' keys."""
    name = "fp32" if dtype is None else _DTYPE_SHORT[dtype]
    return f"{name}+channels_last" if channels_last else name


def amp_dtype(cfg: PrecisionConfig, kind: DeviceKind) -> torch.dtype:
    """The autocast dtype when AMP is on: ``precision.dtype`` if set, else bf16 on CPU and on a
    bf16-capable GPU, fp16 (with loss scaling) on other GPUs."""
    if cfg.dtype == "float16":
        return torch.float16
    if cfg.dtype == "bfloat16":
        return torch.bfloat16
    if kind.type == "cuda" and not kind.bf16:
        return torch.float16
    return torch.bfloat16


def calibration_modes(cfg: PrecisionConfig, kind: DeviceKind) -> list[Mode]:
    """The modes to time, fp32 first (the baseline the slow-stop rule compares against)."""
    dtype = amp_dtype(cfg, kind)
    return [(None, True), (None, False), (dtype, True), (dtype, False)]


@dataclass(frozen=True)
class PrecisionDecision:
    amp: bool
    dtype: torch.dtype | None  # the autocast dtype; None when amp is off
    channels_last: bool
    reason: str  # "precision: fp32, channels_last (bf16 measured 9.8x slower: AVX2 CPU without native bf16)"
    warning: str | None  # set when an explicit choice was measured > SLOW_WARNING_RATIO x slower
    timings: dict[str, float]  # seconds per step by mode_key; empty when nothing was measured
    measured: bool  # the decision rests on timings (fresh or cached)
    cached: bool = False  # the timings came from the cache file
    device: str = ""  # DeviceKind.description

    @property
    def loss_scaling(self) -> bool:
        return self.dtype == torch.float16

    def apply(self, cfg: PrecisionConfig) -> PrecisionConfig:
        """``cfg`` made concrete: amp and channels_last booleans, dtype set where amp is on."""
        update: dict[str, Any] = {"amp": self.amp, "channels_last": self.channels_last}
        if self.dtype is not None:
            update["dtype"] = _DTYPE_CONFIG[self.dtype]
        return cfg.model_copy(update=update)

    def to_json(self) -> dict[str, Any]:
        return {
            "amp": self.amp,
            "dtype": None if self.dtype is None else _DTYPE_CONFIG[self.dtype],
            "channels_last": self.channels_last,
            "loss_scaling": self.loss_scaling,
            "reason": self.reason,
            "warning": self.warning,
            "timings": dict(self.timings),
            "measured": self.measured,
            "cached": self.cached,
            "device": self.device,
        }


def _mode_label(dtype: torch.dtype | None, channels_last: bool) -> str:
    precision = "fp32" if dtype is None else f"{_DTYPE_SHORT[dtype]} autocast"
    if dtype == torch.float16:
        precision += " + loss scaling"
    return f"{precision}, {'channels_last' if channels_last else 'contiguous'}"


def _ratio_text(t: float, other: float) -> str:
    """``9.8x slower`` / ``1.9x faster``: ``t`` against ``other``."""
    return f"{t / other:.1f}x slower" if t >= other else f"{other / t:.1f}x faster"


def _best(timings: Mapping[str, float], dtype: torch.dtype | None) -> float | None:
    values = [timings[k] for k in (mode_key(dtype, True), mode_key(dtype, False)) if k in timings]
    return min(values) if values else None


def _decide_amp(cfg: PrecisionConfig, kind: DeviceKind, timings: Mapping[str, float]) -> tuple[bool, str, str | None]:
    """CPU: (amp, why, warning) from the best time of each dtype over both memory formats."""
    dtype = amp_dtype(cfg, kind)
    name = _DTYPE_SHORT[dtype]
    t32, t_amp = _best(timings, None), _best(timings, dtype)
    if t32 is None or t_amp is None:
        amp = kind.bf16 if cfg.amp == "auto" else bool(cfg.amp)
        return amp, f"{name} against fp32 not measured: {kind.description}", None
    if cfg.amp == "auto":
        amp = t_amp * AMP_MIN_SPEEDUP <= t32
        if amp or t_amp >= t32:
            return amp, f"{name} measured {_ratio_text(t_amp, t32)}: {kind.description}", None
        return False, (
            f"{name} measured only {t32 / t_amp:.2f}x faster, under the {AMP_MIN_SPEEDUP}x that leaving fp32 "
            f"needs: {kind.description}"
        ), None
    amp = bool(cfg.amp)
    why = f"precision.amp={str(amp).lower()} as set; {name} measured {_ratio_text(t_amp, t32)}: {kind.description}"
    chosen, other = (t_amp, t32) if amp else (t32, t_amp)
    warning = None
    if chosen > SLOW_WARNING_RATIO * other:
        mode, alt = (f"{name} autocast", "fp32") if amp else ("fp32", f"{name} autocast")
        warning = (
            f"precision.amp={str(amp).lower()}: {mode} measured {chosen / other:.1f}x slower than {alt} on this "
            f"machine ({chosen:.3f} s against {other:.3f} s per step; {kind.description}); "
            f"set precision.amp: auto to let the measurement choose"
        )
    return amp, why, warning


def _decide_layout(
    cfg: PrecisionConfig, dtype: torch.dtype | None, timings: Mapping[str, float]
) -> tuple[bool, str | None, str | None]:
    """(channels_last, why or None, warning) within the chosen dtype."""
    t_cl, t_plain = timings.get(mode_key(dtype, True)), timings.get(mode_key(dtype, False))
    if cfg.channels_last == "auto":
        if t_cl is None or t_plain is None:
            return t_cl is not None or t_plain is None, None, None  # the measured one; channels_last by default
        return t_plain * LAYOUT_MIN_SPEEDUP > t_cl, f"channels_last {_ratio_text(t_cl, t_plain)} than contiguous", None
    channels_last = bool(cfg.channels_last)
    chosen, other = (t_cl, t_plain) if channels_last else (t_plain, t_cl)
    if chosen is None or other is None or chosen <= SLOW_WARNING_RATIO * other:
        return channels_last, None, None
    alt = "contiguous" if channels_last else "channels_last"
    return channels_last, None, (
        f"precision.channels_last={str(channels_last).lower()}: measured {chosen / other:.1f}x slower than {alt} "
        f"({chosen:.3f} s against {other:.3f} s per step); set precision.channels_last: auto"
    )


def _decide_accelerator(cfg: PrecisionConfig, kind: DeviceKind) -> PrecisionDecision:
    """CUDA (and other non-CPU devices): no measurement. On CUDA autocast unless switched off:
    bf16 where supported (no loss scaling), else fp16 with dynamic loss scaling."""
    if kind.type == "cuda":
        amp = cfg.amp is not False
        why = f"{kind.description}, not measured: " + ("autocast pays on a GPU" if amp else "precision.amp=false as set")
    else:
        amp = cfg.amp is True
        why = f"no calibration for a {kind.description}: " + ("precision.amp=true as set" if amp else "fp32")
    dtype = amp_dtype(cfg, kind) if amp else None
    warning = None
    if dtype == torch.float16:
        why += "; fp16 with dynamic loss scaling" + ("" if kind.bf16 or cfg.dtype == "float16" else " (no bf16 here)")
    elif dtype == torch.bfloat16 and kind.bf16:
        why += "; bf16 supported: no loss scaling"
    elif dtype == torch.bfloat16:
        warning = f"precision.dtype=bfloat16 but the {kind.description} has no native bf16: expect it to be slow"
    # NHWC is the layout cuDNN's tensor-core kernels use under autocast.
    channels_last = amp if cfg.channels_last == "auto" else bool(cfg.channels_last)
    return PrecisionDecision(
        amp, dtype, channels_last, f"precision: {_mode_label(dtype, channels_last)} ({why})", warning, {}, False,
        device=kind.description,
    )


def decide_precision(
    cfg: PrecisionConfig, kind: DeviceKind, timings: Mapping[str, float], *, cached: bool = False
) -> PrecisionDecision:
    """PURE: the precision a run uses, from the request, the device and measured seconds per step.

    ``timings``: ``mode_key`` -> seconds per step (missing: not measured, e.g. a dtype dropped
    after one very slow step). CPU, ``amp: auto``: autocast only where its best time beats fp32's
    best by ``AMP_MIN_SPEEDUP``. ``channels_last: auto``: within that dtype, channels_last unless
    contiguous is measured ``LAYOUT_MIN_SPEEDUP`` times faster.
    Explicit ``true`` / ``false`` are honoured, with a ``warning`` when measured more than
    ``SLOW_WARNING_RATIO`` times slower than the alternative.
    """
    if kind.type != "cpu":
        return _decide_accelerator(cfg, kind)
    amp, why, amp_warning = _decide_amp(cfg, kind, timings)
    dtype = amp_dtype(cfg, kind) if amp else None
    channels_last, layout_why, layout_warning = _decide_layout(cfg, dtype, timings)
    if layout_why:
        why += f"; {layout_why}"
    if cached:
        why += "; cached calibration"
    warning = "; ".join(w for w in (amp_warning, layout_warning) if w) or None
    return PrecisionDecision(
        amp, dtype, channels_last, f"precision: {_mode_label(dtype, channels_last)} ({why})", warning,
        dict(timings), bool(timings), cached, kind.description,
    )


# ----------------------------------------------------------------------------- the measurement
def _float_tensors(outputs: Any) -> Iterator[Tensor]:
    """Every floating tensor in a model's outputs (a tensor, or nested tuples / lists / dicts)."""
    if isinstance(outputs, Tensor):
        if outputs.is_floating_point():
            yield outputs
    elif isinstance(outputs, Mapping):
        for value in outputs.values():
            yield from _float_tensors(value)
    elif isinstance(outputs, (list, tuple)):
        for value in outputs:
            yield from _float_tensors(value)


LossFn = Callable[[Any], Tensor]  # a model's outputs -> the scalar training loss


def _outputs_mean_sum(outputs: Any) -> Tensor:
    """A stand-in loss when the caller gives none: the sum of the outputs' means."""
    return sum(t.float().mean() for t in _float_tensors(outputs))


def _timed_step(
    model: nn.Module, images: Tensor, dtype: torch.dtype | None, device: torch.device, train: bool,
    clock: Callable[[], float], loss_fn: LossFn | None = None,
) -> float:
    """Seconds for one forward under autocast + loss + backward (train), or one forward under
    no_grad (eval). As in the trainer, the loss runs after the autocast region."""
    start = clock()
    with torch.set_grad_enabled(train):
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            outputs = model(images)
        if train:
            (loss_fn or _outputs_mean_sum)(outputs).backward()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = clock() - start
    model.zero_grad(set_to_none=True)
    return elapsed


def measure_precision_modes(
    model: nn.Module,
    batch_shape: tuple[int, int, int, int],
    device: torch.device,
    *,
    train: bool,
    modes: Sequence[Mode],
    time_limit: float = DEFAULT_TIME_LIMIT,
    max_steps: int = DEFAULT_MAX_STEPS,
    clock: Callable[[], float] = time.perf_counter,
    images: Tensor | None = None,
    loss_fn: LossFn | None = None,
) -> dict[str, float]:
    """Seconds per step of ``model`` in each mode (median), on a deep copy: the caller's model
    (weights, BN statistics, grads, memory format, train/eval mode) and the global RNG are untouched.

    ``batch_shape``: (B, 3, H, W) of the run. ``images`` (that shape) and ``loss_fn`` (outputs ->
    loss, e.g. the criterion on that batch's targets): a real batch and the real loss, so that the
    step timed is the training step (loss included); without them, seeded noise and the sum of
    the outputs' means (the network's forward and backward alone).

    The modes take turns, one step each per round, so that a shared machine's changing load falls
    on all of them alike. Round 0 warms up (allocator, oneDNN kernels) and is not counted; then
    rounds run until ``time_limit`` seconds have passed (warmup included) or ``max_steps`` rounds,
    at least one. A mode's warmup or first timed step taking ``SLOW_STOP_FACTOR`` times the
    fastest comparable step so far (warmup against warmup) ends its dtype at once: that step is
    its figure, and its other memory format is not measured.
    """
    copies, batches = {}, {}  # one copy of the model and the batch per memory format
    if images is not None and tuple(images.shape) != tuple(batch_shape):
        raise ValueError(f"measure_precision_modes: images of shape {tuple(images.shape)}, batch_shape {batch_shape}")
    if images is None:
        images = torch.randn(batch_shape, generator=torch.Generator().manual_seed(0))
    x = images.to(device)
    for channels_last in sorted({m[1] for m in modes}):
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        copies[channels_last] = copy.deepcopy(model).to(device, memory_format=fmt).train(train)
        copies[channels_last].zero_grad(set_to_none=True)
        batches[channels_last] = x.contiguous(memory_format=fmt)
    warmup: dict[Mode, float] = {}
    timed: dict[Mode, list[float]] = {m: [] for m in modes}
    dropped: dict[Mode, float] = {}
    start = clock()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # dropout draws
        for round_ in range(max_steps + 1):
            for mode in modes:
                if any(d[0] == mode[0] for d in dropped):
                    continue
                seconds = _timed_step(copies[mode[1]], batches[mode[1]], mode[0], device, train, clock, loss_fn)
                so_far = list(warmup.values()) if round_ == 0 else [t for ts in timed.values() for t in ts]
                # Only a mode's first steps can end it; later, a slow step (a load spike) joins the median.
                if not timed[mode] and seconds > SLOW_STOP_FACTOR * min(so_far, default=math.inf):
                    dropped[mode] = seconds
                elif round_ == 0:
                    warmup[mode] = seconds
                else:
                    timed[mode].append(seconds)
            if round_ >= 1 and clock() - start >= time_limit:
                break
    timings = {mode_key(*m): statistics.median(ts) for m, ts in timed.items() if ts}
    timings.update({mode_key(*m): t for m, t in dropped.items()})
    return {mode_key(*m): timings[mode_key(*m)] for m in modes if mode_key(*m) in timings}  # in ``modes`` order


# ----------------------------------------------------------------------------- the cache
def cache_dir() -> Path:
    """``$ONESTAGE_CACHE_DIR``, else ``$XDG_CACHE_HOME/onestage``, else ``~/.cache/onestage``."""
    if os.environ.get("ONESTAGE_CACHE_DIR"):
        return Path(os.environ["ONESTAGE_CACHE_DIR"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "onestage"
    return Path.home() / ".cache" / "onestage"


def model_fingerprint(model: nn.Module) -> str:
    """The class and every parameter's and buffer's name, shape and dtype, hashed: two models with
    the same fingerprint run the same kernels (the weights' values do not change the speed)."""
    h = hashlib.sha256(type(model).__qualname__.encode())
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
    return f"{type(model).__name__}-{h.hexdigest()[:16]}"


def calibration_key(
    model: nn.Module, batch_shape: tuple[int, int, int, int], device: torch.device, *, train: bool,
    modes: Sequence[Mode], cpu: CpuInfo | None = None,
) -> dict[str, Any]:
    """Everything a step time depends on: the machine, torch, the model, the batch shape, the mode list."""
    cpu = cpu or cpu_info()
    return {
        "cpu": cpu.model, "capability": cpu.capability, "flags": list(cpu.flags), "threads": cpu.threads,
        "onednn_max_isa": cpu.onednn_max_isa, "torch": torch.__version__, "device": device.type,
        "model": model_fingerprint(model), "batch_shape": list(batch_shape), "train": train,
        "modes": [mode_key(*m) for m in modes],
    }


class PrecisionCache:
    """Calibration timings in one JSON file (``cache_dir() / "precision.json"``), entries keyed by
    the hash of ``calibration_key``. Written atomically (a temporary file renamed over the old one);
    an unreadable or corrupt file is ignored with a warning, never a crash."""

    VERSION = 1

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or cache_dir() / "precision.json"

    @staticmethod
    def digest(key: Mapping[str, Any]) -> str:
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]

    def _entries(self) -> dict[str, Any]:
        if not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            warnings.warn(f"{self.path}: unreadable precision cache ({exc}); ignored, it will be rewritten", stacklevel=3)
            return {}
        if not isinstance(data, dict) or data.get("version") != self.VERSION or not isinstance(data.get("entries"), dict):
            warnings.warn(f"{self.path}: not a version-{self.VERSION} precision cache; ignored", stacklevel=3)
            return {}
        return data["entries"]

    def get(self, key: Mapping[str, Any]) -> dict[str, float] | None:
        entry = self._entries().get(self.digest(key))
        timings = entry.get("timings") if isinstance(entry, dict) else None
        if not isinstance(timings, dict) or not all(
            isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in timings.values()
        ):
            return None
        return {str(k): float(v) for k, v in timings.items()}

    def put(self, key: Mapping[str, Any], timings: Mapping[str, float]) -> None:
        entries = self._entries()
        entries[self.digest(key)] = {"key": dict(key), "timings": dict(timings), "measured_at": time.time()}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"version": self.VERSION, "entries": entries}, indent=1, sort_keys=True))
        os.replace(tmp, self.path)


# ----------------------------------------------------------------------------- the entry point
class MeasureFn(Protocol):
    def __call__(
        self, model: nn.Module, batch_shape: tuple[int, int, int, int], device: torch.device, *,
        train: bool, modes: Sequence[Mode], time_limit: float, images: Tensor | None, loss_fn: LossFn | None,
    ) -> dict[str, float]: ...


def resolve_precision(
    cfg: PrecisionConfig,
    model: nn.Module,
    batch_shape: tuple[int, int, int, int],
    device: torch.device,
    *,
    train: bool,
    cache: bool = True,
    refresh: bool = False,
    time_limit: float = DEFAULT_TIME_LIMIT,
    images: Tensor | None = None,
    loss_fn: LossFn | None = None,
    measure: MeasureFn = measure_precision_modes,
) -> PrecisionDecision:
    """The precision a run uses: call once, then use ``decision.apply(cfg)`` (a concrete config).

    ``batch_shape``: (B, 3, H, W) of the run's batches; ``train``: forward + backward is timed,
    else forward only (evaluation, predict). ``images`` and ``loss_fn``: a real batch and the
    training loss on it (``lambda out: criterion(out, boxes, labels)["total"]``), so that the
    calibration times what a step does; see ``measure_precision_modes``. On the CPU every mode is timed (an explicit choice
    too: it is warned about when much slower), unless the cache holds this machine, model and
    shape; ``cache=False`` neither reads nor writes it, ``refresh=True`` re-measures and rewrites.
    On CUDA nothing is measured.
    """
    device = torch.device(device)
    kind = device_kind(device)
    if kind.type != "cpu":
        return decide_precision(cfg, kind, {})
    modes = calibration_modes(cfg, kind)
    key = calibration_key(model, batch_shape, device, train=train, modes=modes)
    store = PrecisionCache() if cache else None
    timings = store.get(key) if store is not None and not refresh else None
    if timings is not None:
        return decide_precision(cfg, kind, timings, cached=True)
    timings = measure(
        model, batch_shape, device, train=train, modes=modes, time_limit=time_limit, images=images, loss_fn=loss_fn
    )
    if store is not None:
        store.put(key, timings)
    return decide_precision(cfg, kind, timings)


__all__ = [
    "AMP_MIN_SPEEDUP", "LAYOUT_MIN_SPEEDUP", "SLOW_STOP_FACTOR", "SLOW_WARNING_RATIO",
    "CpuInfo", "DeviceKind", "LossFn", "Mode", "PrecisionCache", "PrecisionDecision",
    "amp_dtype", "cache_dir", "calibration_key", "calibration_modes", "cpu_info", "decide_precision",
    "device_kind", "measure_precision_modes", "mode_key", "model_fingerprint", "resolve_precision",
    "static_amp_guess",
]
