"""ModelEMA (engine/ema.py) and the termination handling it relies on (engine/signals.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from onestage.config import EMAConfig
from onestage.engine.ema import ModelEMA
from onestage.engine.signals import (
    TerminationRequested,
    handle_termination,
    raise_on_termination,
    termination_requested,
)


def _tiny() -> nn.Sequential:
    """Linear(2 -> 1) then BatchNorm1d(1), with known weights."""
    model = nn.Sequential(nn.Linear(2, 1), nn.BatchNorm1d(1))
    _set(model, 1.0)
    return model


@torch.no_grad()
def _set(model: nn.Sequential, value: float) -> None:
    """Every floating tensor := value; num_batches_tracked := int(value)."""
    for v in model.state_dict().values():
        v.fill_(value if v.is_floating_point() else int(value))


def test_decay_ramp_until_it_reaches_decay() -> None:
    ema = ModelEMA(_tiny(), decay=0.9)
    # (1 + n) / (10 + n) < 0.9 for n < 80; 81 / 90 = 0.9 exactly at n = 80
    expected = [(1 + n) / (10 + n) for n in range(80)] + [0.9] * 20
    got = [ema.decay_for(n) for n in range(100)]
    assert got[:4] == pytest.approx([0.1, 2 / 11, 0.25, 4 / 13], abs=1e-15)
    assert got == pytest.approx(expected, abs=1e-15)
    assert max(got) == pytest.approx(0.9, abs=1e-15)
    assert ModelEMA(_tiny(), decay=0.999).decay_for(8990) == pytest.approx(0.999, abs=1e-15)
    assert ModelEMA(_tiny(), decay=0.999).decay_for(100000) == 0.999


def test_update_math_by_hand() -> None:
    model = _tiny()  # every float tensor 1.0
    ema = ModelEMA(model, decay=0.999)
    _set(model, 3.0)
    assert ema.update(model, step=0)
    # n = 0: d = 0.1 -> 0.1 * 1 + 0.9 * 3 = 2.8
    assert ema.shadow["0.weight"].flatten().tolist() == pytest.approx([2.8, 2.8], abs=1e-6)
    assert ema.shadow["1.running_mean"].item() == pytest.approx(2.8, abs=1e-6)  # float buffers averaged
    assert ema.shadow["1.num_batches_tracked"].item() == 3  # integer buffers copied
    _set(model, 5.0)
    assert ema.update(model, step=1)
    # n = 1: d = 2/11 -> 2/11 * 2.8 + 9/11 * 5 = 50.6 / 11
    assert ema.shadow["0.bias"].item() == pytest.approx(50.6 / 11, abs=1e-6)
    assert ema.shadow["1.running_var"].item() == pytest.approx(50.6 / 11, abs=1e-6)
    assert ema.num_updates == 2
    assert model[0].weight.tolist() == [[5.0, 5.0]]  # the model itself untouched


def test_start_step_and_interval() -> None:
    model = _tiny()
    ema = ModelEMA(model, decay=0.5, start_step=5, update_every=3)
    done = [s for s in range(13) if ema.update(model, s)]
    assert done == [5, 8, 11]
    assert ema.num_updates == 3


def test_state_dict_roundtrip_and_loadable_into_model() -> None:
    model = _tiny()
    ema = ModelEMA(model)
    _set(model, 3.0)
    ema.update(model, 0)
    other = ModelEMA(_tiny())
    other.load_state_dict(ema.state_dict())
    assert other.num_updates == 1
    assert all(torch.equal(other.shadow[k], v) for k, v in ema.shadow.items())
    fresh = _tiny()
    fresh.load_state_dict(ema.state_dict()["shadow"])  # the shadow is a model state_dict
    assert fresh[0].weight.flatten().tolist() == pytest.approx([2.8, 2.8], abs=1e-6)
    with pytest.raises(KeyError, match="missing keys"):
        ModelEMA(nn.Linear(2, 1)).load_state_dict(ema.state_dict())


def test_swap_into_restores_after_exception() -> None:
    model = _tiny()
    ema = ModelEMA(model)
    _set(model, 3.0)
    ema.update(model, 0)  # shadow 2.8, training weights 3.0
    with pytest.raises(RuntimeError, match="boom"):
        with ema.swap_into(model):
            assert model[0].weight.flatten().tolist() == pytest.approx([2.8, 2.8], abs=1e-6)
            assert model[1].running_mean.item() == pytest.approx(2.8, abs=1e-6)
            raise RuntimeError("boom")
    assert model[0].weight.tolist() == [[3.0, 3.0]]
    assert model[1].running_mean.item() == 3.0
    with ema.swap_into(model):
        pass
    assert model[0].bias.item() == 3.0


def test_ema_rejects_a_wrapped_model() -> None:
    model = _tiny()
    ema = ModelEMA(model)
    with pytest.raises(KeyError, match="bare model"):
        ema.update(nn.Sequential(model), 0)  # keys now prefixed with "0."


# ----------------------------------------------------------------------------- signals


def test_first_signal_sets_flag_second_raises_and_handlers_restored() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with handle_termination():
        assert not termination_requested()
        signal.raise_signal(signal.SIGTERM)
        assert termination_requested()  # flagged, not raised: the loop stops at a step boundary
        with pytest.raises(TerminationRequested, match="SIGINT"):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is before


def test_raise_on_termination_raises_at_once_and_restores() -> None:
    with handle_termination():
        outer = signal.getsignal(signal.SIGTERM)
        with pytest.raises(TerminationRequested, match="SIGTERM"):
            with raise_on_termination():
                signal.raise_signal(signal.SIGTERM)
        assert signal.getsignal(signal.SIGTERM) is outer
        assert termination_requested()
        # a termination already pending: evaluation is not started at all
        with pytest.raises(TerminationRequested):
            with raise_on_termination():
                pytest.fail("evaluation must not start after a termination request")


_CHILD = textwrap.dedent(
    """
    import hashlib, sys, time
    import torch
    from torch import nn
    from onestage.engine.ema import ModelEMA
    from onestage.engine.signals import TerminationRequested, handle_termination, raise_on_termination

    def checksum(model):
        h = hashlib.sha256()
        for k, v in sorted(model.state_dict().items()):
            h.update(k.encode()); h.update(v.detach().cpu().numpy().tobytes())
        return h.hexdigest()

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    ema = ModelEMA(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        model[1].running_mean.fill_(0.5)
    ema.update(model, 0)
    with ema.swap_into(model):
        print("EMA", checksum(model))
    print("TRAIN", checksum(model))
    try:
        with handle_termination():
            with raise_on_termination(), ema.swap_into(model):
                print("EVALUATING", flush=True)
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:  # a slow evaluation
                    time.sleep(0.01)
        print("NOT INTERRUPTED")
    except TerminationRequested:
        print("AFTER", checksum(model), flush=True)
        sys.exit(0)
    """
)


def test_sigterm_during_evaluation_restores_training_weights(tmp_path: Path) -> None:
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        lines: dict[str, str] = {}
        assert proc.stdout is not None
        for line in proc.stdout:
            key, _, value = line.strip().partition(" ")
            lines[key] = value
            if key == "EVALUATING":
                break
        assert "EVALUATING" in lines, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.2)  # well inside the "evaluation"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    after = dict(line.split(" ", 1) for line in out.strip().splitlines())
    assert after["AFTER"] == lines["TRAIN"]
    assert after["AFTER"] != lines["EMA"]


def test_from_config_and_termination_escapes_except_exception() -> None:
    ema = ModelEMA.from_config(_tiny(), EMAConfig(decay=0.5, start_step=2, update_every=4))
    assert (ema.decay, ema.start_step, ema.update_every) == (0.5, 2, 4)
    assert not termination_requested()  # the flag of an earlier handle_termination() is gone
    with pytest.raises(TerminationRequested):
        try:
            with raise_on_termination():
                signal.raise_signal(signal.SIGTERM)
        except Exception:  # an ordinary error handler must not swallow a termination
            pytest.fail("TerminationRequested was caught by `except Exception`")
