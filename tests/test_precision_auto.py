"""precision.amp: auto (issue 15, engine/calibrate.py): the decision from given timings, the cache,
the measurement's hands-off copy, the CPU description, config parsing and `onestage doctor`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from onestage import cli
from onestage.config import ConfigError, PrecisionConfig, load_config
from onestage.engine import calibrate
from onestage.engine.calibrate import (
    CpuInfo,
    DeviceKind,
    PrecisionCache,
    calibration_key,
    calibration_modes,
    decide_precision,
    measure_precision_modes,
    resolve_precision,
)
from onestage.engine.precision import resolve_dtype, should_force_fp32

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
AVX2 = DeviceKind("cpu", False, "AVX2 CPU without native bf16")
AMX = DeviceKind("cpu", True, "AVX512 CPU with native bf16 (amx_bf16)")
AUTO = PrecisionConfig()
# seconds per step, as measure_precision_modes reports them
SLOW_BF16 = {"fp32+channels_last": 1.0, "fp32": 1.25, "bf16+channels_last": 9.8, "bf16": 11.0}
FAST_BF16 = {"fp32+channels_last": 1.0, "fp32": 1.1, "bf16+channels_last": 0.5, "bf16": 0.6}


# ----------------------------------------------------------------------------- config
def test_config_amp_and_channels_last_accept_auto_true_false() -> None:
    assert PrecisionConfig().amp == "auto" and PrecisionConfig().channels_last == "auto"
    demo = str(ROOT / "configs" / "demo_shapes.yaml")
    for raw, value in (("auto", "auto"), ("true", True), ("false", False)):
        cfg = load_config(demo, [f"precision.amp={raw}", f"precision.channels_last={raw}"])
        assert cfg.precision.amp == value and cfg.precision.channels_last == value
    with pytest.raises(ConfigError, match="precision.amp"):
        load_config(demo, ["precision.amp=sometimes"])


def test_unresolved_auto_forces_listed_ops_and_falls_back_to_the_static_guess(monkeypatch) -> None:
    assert should_force_fp32("iou", AUTO)  # may still run under autocast: the listed ops stay fp32
    assert not should_force_fp32("iou", PrecisionConfig(amp=False))
    monkeypatch.setattr("onestage.engine.precision.static_amp_guess", lambda device: False)
    assert resolve_dtype(AUTO, CPU) is None
    monkeypatch.setattr("onestage.engine.precision.static_amp_guess", lambda device: True)
    assert resolve_dtype(AUTO, CPU) == torch.bfloat16


# ----------------------------------------------------------------------------- the decision
def test_bf16_measured_faster_chooses_bf16() -> None:
    d = decide_precision(AUTO, AMX, FAST_BF16)
    assert (d.amp, d.dtype, d.channels_last, d.warning, d.measured) == (True, torch.bfloat16, True, None, True)
    assert d.reason == (
        "precision: bf16 autocast, channels_last (bf16 measured 2.0x faster: AVX512 CPU with native bf16 "
        "(amx_bf16); channels_last 1.2x faster than contiguous)"
    )
    concrete = d.apply(AUTO)
    assert (concrete.amp, concrete.dtype, concrete.channels_last) == (True, "bfloat16", True)
    assert resolve_dtype(concrete, CPU) == torch.bfloat16 and should_force_fp32("iou", concrete)
    assert d.to_json()["dtype"] == "bfloat16" and d.to_json()["timings"] == FAST_BF16


def test_bf16_measured_slower_chooses_fp32() -> None:
    d = decide_precision(AUTO, AVX2, SLOW_BF16)
    assert (d.amp, d.dtype, d.channels_last, d.warning) == (False, None, True, None)
    assert d.reason.startswith("precision: fp32, channels_last (bf16 measured 9.8x slower: AVX2 CPU without native bf16")
    concrete = d.apply(AUTO)
    assert concrete.amp is False and concrete.channels_last is True
    assert resolve_dtype(concrete, CPU) is None and not should_force_fp32("iou", concrete)


def test_small_bf16_gain_stays_fp32_and_layout_follows_the_measurement() -> None:
    timings = {"fp32+channels_last": 1.2, "fp32": 1.0, "bf16+channels_last": 1.1, "bf16": 0.95}
    d = decide_precision(AUTO, AMX, timings)  # 1.05x faster: under AMP_MIN_SPEEDUP
    assert (d.amp, d.channels_last) == (False, False)  # contiguous is the faster fp32 layout here
    assert "bf16 measured only 1.05x faster, under the 1.1x" in d.reason
    assert "channels_last 1.2x slower than contiguous" in d.reason
    near = {**timings, "fp32+channels_last": 1.05}  # contiguous only 1.05x faster: channels_last stays
    assert decide_precision(AUTO, AMX, near).channels_last is True


def test_explicit_true_with_bf16_ten_times_slower_is_honoured_with_a_warning() -> None:
    d = decide_precision(PrecisionConfig(amp=True), AVX2, SLOW_BF16)
    assert (d.amp, d.dtype, d.channels_last) == (True, torch.bfloat16, True)
    assert d.reason.startswith("precision: bf16 autocast, channels_last (precision.amp=true as set; bf16 measured 9.8x slower")
    assert d.warning is not None
    assert "bf16 autocast measured 9.8x slower than fp32" in d.warning and "precision.amp: auto" in d.warning


def test_explicit_false_warns_only_when_bf16_is_much_faster() -> None:
    d = decide_precision(PrecisionConfig(amp=False), AMX, FAST_BF16)
    assert (d.amp, d.dtype) == (False, None)
    assert d.warning is not None and "fp32 measured 2.0x slower than bf16 autocast" in d.warning
    mild = {"fp32+channels_last": 1.0, "fp32": 1.1, "bf16+channels_last": 0.8, "bf16": 0.9}  # 1.25x: no warning
    assert decide_precision(PrecisionConfig(amp=False), AMX, mild).warning is None
    assert decide_precision(PrecisionConfig(amp=False), AVX2, SLOW_BF16).warning is None


def test_explicit_channels_last_much_slower_warns() -> None:
    timings = {"fp32+channels_last": 2.0, "fp32": 1.0, "bf16+channels_last": 20.0, "bf16": 10.0}
    d = decide_precision(PrecisionConfig(channels_last=True), AVX2, timings)
    assert (d.amp, d.channels_last) == (False, True)
    assert d.warning is not None and "channels_last=true: measured 2.0x slower than contiguous" in d.warning


def test_a_dtype_dropped_after_one_slow_step_is_decided_on_what_was_measured() -> None:
    partial = {"fp32+channels_last": 1.0, "fp32": 1.25, "bf16+channels_last": 12.0}  # bf16 contiguous skipped
    assert decide_precision(AUTO, AVX2, partial).amp is False
    forced = decide_precision(PrecisionConfig(amp=True), AVX2, partial)
    assert forced.channels_last is True and "12.0x slower" in forced.warning


def test_cuda_uses_bf16_without_scaler_or_fp16_with_it_unmeasured() -> None:
    d = decide_precision(AUTO, DeviceKind("cuda", True, "CUDA device H200"), {})
    assert (d.amp, d.dtype, d.channels_last, d.loss_scaling, d.measured) == (True, torch.bfloat16, True, False, False)
    assert "not measured" in d.reason and "no loss scaling" in d.reason
    assert resolve_dtype(d.apply(AUTO), torch.device("cuda")) == torch.bfloat16
    old = decide_precision(AUTO, DeviceKind("cuda", False, "CUDA device T4-like"), {})
    assert (old.amp, old.dtype, old.loss_scaling) == (True, torch.float16, True)
    assert "loss scaling" in old.reason
    assert resolve_dtype(old.apply(AUTO), torch.device("cuda")) == torch.float16
    off = decide_precision(PrecisionConfig(amp=False), DeviceKind("cuda", True, "CUDA device H200"), {})
    assert (off.amp, off.dtype, off.channels_last) == (False, None, False)


# ----------------------------------------------------------------------------- the CPU
def test_cpu_description_and_native_bf16() -> None:
    avx2 = CpuInfo("X", "AVX2", ("avx2",), 2, None)
    assert not avx2.native_bf16 and avx2.describe() == "AVX2 CPU without native bf16"
    assert avx2.headline() == "X (2 threads, AVX2 CPU without native bf16)"  # what benchmarks print
    amx = CpuInfo("X", "AVX512", ("avx2", "avx512f", "avx512_bf16", "amx_bf16"), 2, None)
    assert amx.native_bf16 and amx.describe() == "AVX512 CPU with native bf16 (avx512_bf16, amx_bf16)"
    capped = CpuInfo("X", "AVX2", amx.flags, 2, "AVX2")  # ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2
    assert not capped.native_bf16 and "capped" in capped.describe()
    assert not CpuInfo("X", "AVX512", amx.flags, 2, "AVX512_CORE").native_bf16
    info = calibrate.cpu_info()
    assert info.capability == torch.backends.cpu.get_cpu_capability() and info.threads == torch.get_num_threads()


# ----------------------------------------------------------------------------- the measurement
def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5), nn.Conv2d(4, 2, 1))


@pytest.mark.parametrize("train", [True, False])
def test_measuring_leaves_the_model_and_rng_unchanged(train: bool) -> None:
    model = _net().eval()
    model[0].weight.grad = torch.ones_like(model[0].weight)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    modes = calibration_modes(AUTO, AMX)
    timings = measure_precision_modes(model, (2, 3, 16, 16), CPU, train=train, modes=modes, time_limit=0.01)
    assert set(timings) <= {"fp32+channels_last", "fp32", "bf16+channels_last", "bf16"} and "fp32" in timings
    assert all(t > 0 for t in timings.values())
    assert not model.training
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # weights and BN statistics
    assert torch.equal(model[0].weight.grad, torch.ones_like(model[0].weight)) and model[4].weight.grad is None
    assert model[0].weight.is_contiguous() and not model[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(torch.get_rng_state(), rng)  # the dropout draws came from a forked generator


def test_measuring_uses_the_given_batch_and_loss() -> None:
    seen: list[torch.Size] = []

    def loss_fn(outputs: torch.Tensor) -> torch.Tensor:
        seen.append(outputs.shape)
        return outputs.float().pow(2).mean()

    images = torch.rand(2, 3, 8, 8)
    timings = measure_precision_modes(_net(), (2, 3, 8, 8), CPU, train=True, modes=[(None, False)], time_limit=0.0,
                                      images=images, loss_fn=loss_fn)
    assert list(timings) == ["fp32"] and seen == [torch.Size([2, 2, 8, 8])] * 2  # warmup + one timed step
    with pytest.raises(ValueError, match=r"images of shape \(2, 3, 8, 8\), batch_shape \(4, 3, 8, 8\)"):
        measure_precision_modes(_net(), (4, 3, 8, 8), CPU, train=True, modes=[(None, False)], images=images)


def test_one_very_slow_step_ends_that_dtype(monkeypatch) -> None:
    calls: list[str] = []

    def fake_step(model, images, dtype, device, train, clock, loss_fn) -> float:
        calls.append(calibrate.mode_key(dtype, images.is_contiguous(memory_format=torch.channels_last)))
        return 1.0 if dtype is None else 20.0

    monkeypatch.setattr(calibrate, "_timed_step", fake_step)
    timings = measure_precision_modes(_net(), (2, 3, 8, 8), CPU, train=True, modes=calibration_modes(AUTO, AVX2),
                                      time_limit=1e9, max_steps=3)
    assert timings == {"fp32+channels_last": 1.0, "fp32": 1.0, "bf16+channels_last": 20.0}
    # Round 0 warms up, bf16's first step was enough; then max_steps rounds of the two fp32 layouts.
    assert calls == ["fp32+channels_last", "fp32", "bf16+channels_last"] + ["fp32+channels_last", "fp32"] * 3


def test_a_slow_step_after_the_first_ones_joins_the_median(monkeypatch) -> None:
    # rounds: warmup (1, 1), round 1 (1, 1), round 2 (50: a load spike, 1)
    steps = iter([1.0, 1.0, 1.0, 1.0, 50.0, 1.0])
    monkeypatch.setattr(calibrate, "_timed_step", lambda *args: next(steps))
    timings = measure_precision_modes(_net(), (2, 3, 8, 8), CPU, train=True, modes=[(None, True), (None, False)],
                                      time_limit=1e9, max_steps=2)
    assert timings == {"fp32+channels_last": 25.5, "fp32": 1.0}  # the median of 1 and 50; not dropped


def test_rounds_stop_at_the_time_limit_after_one_timed_round(monkeypatch) -> None:
    now = [0.0]

    def fake_step(model, images, dtype, device, train, clock, loss_fn) -> float:
        now[0] += 1.0  # every step takes one second of the fake clock
        return 1.0

    monkeypatch.setattr(calibrate, "_timed_step", fake_step)
    timings = measure_precision_modes(_net(), (2, 3, 8, 8), CPU, train=False, modes=calibration_modes(AUTO, AVX2),
                                      time_limit=6.0, max_steps=3, clock=lambda: now[0])
    assert len(timings) == 4 and now[0] == 8.0  # warmup round + one timed round: 8 s > 6 s, stop


# ----------------------------------------------------------------------------- the cache
class CountingMeasure:
    def __init__(self, timings: dict[str, float]) -> None:
        self.timings, self.calls = timings, 0

    def __call__(self, model, batch_shape, device, *, train, modes, time_limit, images, loss_fn) -> dict[str, float]:
        self.calls += 1
        return dict(self.timings)


def test_cache_hit_avoids_measuring_and_key_follows_the_shape(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("ONESTAGE_CACHE_DIR", str(tmp_path))
    measure, model = CountingMeasure(SLOW_BF16), _net()
    first = resolve_precision(AUTO, model, (16, 3, 256, 256), CPU, train=True, measure=measure)
    assert measure.calls == 1 and not first.cached and first.timings == SLOW_BF16 and first.amp is False
    again = resolve_precision(AUTO, model, (16, 3, 256, 256), CPU, train=True, measure=measure)
    assert measure.calls == 1 and again.cached and again.timings == SLOW_BF16 and "cached calibration" in again.reason
    resolve_precision(AUTO, model, (8, 3, 256, 256), CPU, train=True, measure=measure)  # another batch shape
    resolve_precision(AUTO, model, (16, 3, 256, 256), CPU, train=False, measure=measure)  # eval
    assert measure.calls == 3
    resolve_precision(AUTO, model, (16, 3, 256, 256), CPU, train=True, measure=measure, refresh=True)
    assert measure.calls == 4
    modes = calibration_modes(AUTO, AVX2)
    key = calibration_key(model, (16, 3, 256, 256), CPU, train=True, modes=modes)
    assert key != calibration_key(model, (16, 3, 128, 128), CPU, train=True, modes=modes)
    other_model = nn.Sequential(nn.Conv2d(3, 8, 3))
    assert key != calibration_key(other_model, (16, 3, 256, 256), CPU, train=True, modes=modes)
    assert len(json.loads((tmp_path / "precision.json").read_text())["entries"]) == 3


def test_no_cache_measures_every_time_and_writes_nothing(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("ONESTAGE_CACHE_DIR", str(tmp_path))
    measure = CountingMeasure(FAST_BF16)
    for _ in range(2):
        resolve_precision(AUTO, _net(), (2, 3, 8, 8), CPU, train=True, cache=False, measure=measure)
    assert measure.calls == 2 and not (tmp_path / "precision.json").exists()


@pytest.mark.parametrize("content", ["{not json", json.dumps({"version": 99, "entries": {}}), json.dumps([1, 2])])
def test_corrupt_cache_is_ignored_with_a_warning(tmp_path, monkeypatch, content: str) -> None:
    monkeypatch.setenv("ONESTAGE_CACHE_DIR", str(tmp_path))
    (tmp_path / "precision.json").write_text(content)
    measure = CountingMeasure(SLOW_BF16)
    with pytest.warns(UserWarning, match="precision cache"):
        d = resolve_precision(AUTO, _net(), (2, 3, 8, 8), CPU, train=True, measure=measure)
    assert measure.calls == 1 and d.amp is False
    data = json.loads((tmp_path / "precision.json").read_text())  # rewritten, readable again
    assert data["version"] == PrecisionCache.VERSION and len(data["entries"]) == 1


def test_cache_dir_precedence(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("ONESTAGE_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert calibrate.cache_dir() == tmp_path / "home" / ".cache" / "onestage"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert calibrate.cache_dir() == tmp_path / "xdg" / "onestage"
    monkeypatch.setenv("ONESTAGE_CACHE_DIR", str(tmp_path / "mine"))
    assert calibrate.cache_dir() == tmp_path / "mine"


# ----------------------------------------------------------------------------- onestage doctor
def test_doctor_json_on_the_demo_config(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("ONESTAGE_CACHE_DIR", str(tmp_path))
    config = str(ROOT / "configs" / "demo_shapes.yaml")
    assert cli.main(["doctor", config, "train.batch_size=2", "model.input_size=128", "data.train.num_images=4", "data.val.num_images=2", "--json",
                     "--time-limit", "0.05", "--device", "cpu"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["machine"]["cpu"]["capability"] == torch.backends.cpu.get_cpu_capability()
    assert report["machine"]["torch"] == torch.__version__
    config_report = report["config"]
    assert config_report["batch_shape"] == [2, 3, 128, 128]
    for part in ("train", "eval"):
        result = config_report[part]
        assert set(result["modes"]) | set(result["skipped"]) == {"fp32+channels_last", "fp32", "bf16+channels_last", "bf16"}
        assert isinstance(result["auto"]["amp"], bool) and result["auto"]["reason"].startswith("precision: ")
        for mode in result["modes"].values():
            assert mode["images_per_second"] == pytest.approx(2 / mode["seconds_per_step"])
    assert len(json.loads((tmp_path / "precision.json").read_text())["entries"]) == 2  # train and eval


def test_doctor_text_report_names_the_cpu_skipped_modes_and_warnings() -> None:
    from onestage.doctor import format_report, machine_report

    machine = machine_report()
    part = {
        "modes": {"fp32": {"seconds_per_step": 0.5, "images_per_second": 4.0}}, "skipped": ["bf16"],
        "auto": {"reason": "precision: fp32, contiguous (why)"}, "configured": {"reason": "as set", "warning": "slow"},
    }
    report = {"model": "m", "batch_shape": [2, 3, 8, 8], "device": "cpu",
              "precision": {"amp": True, "channels_last": "auto"}, "train": part, "eval": part}
    lines = format_report(machine, report).splitlines()
    assert f"  capability {torch.backends.cpu.get_cpu_capability()}, flags: " in "\n".join(lines)
    assert "    fp32" + " " * 36 + "   0.500       4.0" in lines
    assert any(line.startswith("    bf16 ") and "not measured" in line for line in lines)
    assert lines.count("    auto: precision: fp32, contiguous (why)") == 2
    assert lines.count("    this config (amp=true, channels_last=auto): as set") == 2
    assert lines.count("    warning: slow") == 2
