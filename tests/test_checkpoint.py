"""Checkpoints (engine/checkpoint.py): atomic writes, safe loading, exact RNG state."""

from __future__ import annotations

import os
import pickle
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from onestage.config import Config, PrecisionConfig, ScheduleConfig
from onestage.engine.checkpoint import CheckpointError, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from onestage.engine.ema import ModelEMA
from onestage.engine.precision import LossScaler
from onestage.engine.schedule import LRScheduler


class NotATensor:
    """An arbitrary class: pickling stores a reference to it, which safe loading must refuse."""

    def __init__(self) -> None:
        self.payload = 1


def _draws() -> tuple[float, float, list[float], list[float], list[float]]:
    return (
        random.random(),
        random.gauss(0.0, 1.0),
        np.random.rand(3).tolist(),
        np.random.randn(3).tolist(),
        torch.rand(3).tolist(),
    )


def _assert_same(a: Any, b: Any) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    else:
        assert a == b


def test_full_training_state_roundtrip_with_rng(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    ema = ModelEMA(model)
    scaler = LossScaler(PrecisionConfig(dtype="float16"), torch.device("cpu"))
    sched = LRScheduler(opt, ScheduleConfig(warmup_steps=2), base_lr=0.1, total_steps=10)
    sched.step(3)
    loss = model(torch.randn(5, 3)).square().mean()
    scaler.scale(loss).backward()
    scaler.step(opt)  # fills the momentum buffers
    scaler.update()
    ema.update(model, 3)
    # odd numbers of gaussian draws leave cached values in random and numpy's legacy state
    random.gauss(0.0, 1.0)
    np.random.randn(1)
    state = {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "ema": ema.state_dict(),
        "scaler": scaler.state_dict(),
        "scheduler": sched.state_dict(),
        "rng": rng_state(),
        "step": 4,
        "best_metric": 0.25,
        "config": Config().model_dump(mode="json"),
    }
    expected_draws = _draws()
    path = save_checkpoint(tmp_path / "run" / "last.pt", state)
    assert path == tmp_path / "run" / "last.pt"
    assert os.listdir(tmp_path / "run") == ["last.pt"]  # no temp file left behind
    _draws()  # move every generator on
    loaded = load_checkpoint(path)
    _assert_same(state, loaded)
    set_rng_state(loaded["rng"])
    assert _draws() == expected_draws
    # the pieces accept their states back
    opt2 = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt2.load_state_dict(loaded["optimizer"])
    assert torch.equal(opt2.state_dict()["state"][0]["momentum_buffer"], opt.state_dict()["state"][0]["momentum_buffer"])
    scaler2 = LossScaler(PrecisionConfig(dtype="float16"), torch.device("cpu"))
    scaler2.load_state_dict(loaded["scaler"])
    assert scaler2.scale_value == scaler.scale_value == 2.0**16


def test_failed_write_keeps_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"step": 1, "w": torch.ones(3)})

    def broken_save(obj: Any, f: Any) -> None:
        f.write(b"half a checkpoint")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(path, {"step": 2, "w": torch.zeros(3)})
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["last.pt"]  # the partial temp file is removed
    old = load_checkpoint(path)
    assert old["step"] == 1 and old["w"].tolist() == [1.0, 1.0, 1.0]


_CHILD = textwrap.dedent(
    """
    import sys, time
    import torch
    from onestage.engine.checkpoint import save_checkpoint

    def slow_save(obj, f):  # a slow disk: half the bytes written, then the process is killed
        f.write(b"x" * 100000)
        f.flush()
        print("WRITING", flush=True)
        time.sleep(60)

    torch.save = slow_save
    save_checkpoint(sys.argv[1], {"step": 2})
    """
)


def test_sigkill_mid_write_keeps_previous_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "ckpt" / "last.pt"
    save_checkpoint(path, {"step": 1})
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    proc = subprocess.Popen([sys.executable, str(script), str(path)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "WRITING"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    leftovers = sorted(os.listdir(path.parent))
    assert len(leftovers) == 2 and leftovers[0].startswith(".last.pt.") and leftovers[1] == "last.pt"
    assert load_checkpoint(path)["step"] == 1  # the final path still holds the previous checkpoint
    save_checkpoint(path, {"step": 3})  # the next save clears the stale temp file
    assert os.listdir(path.parent) == ["last.pt"]
    assert load_checkpoint(path)["step"] == 3


def test_arbitrary_class_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"model": {}, "extra": NotATensor()}, path)
    with pytest.raises(
        CheckpointError,
        match=r"evil\.pt: holds objects that are not tensors or plain data; refused by weights_only loading .*NotATensor",
    ):
        load_checkpoint(path)


def test_plain_pickle_is_refused_by_weights_only_loading_not_called_corrupt(tmp_path: Path) -> None:
    # pickle.dump writes protocol-4 opcodes that the weights_only unpickler refuses; torch puts
    # the reason on the line after "WeightsUnpickler error:".
    path = tmp_path / "plain.pt"
    with path.open("wb") as f:
        pickle.dump({"model": {}, "extra": NotATensor()}, f)
    with pytest.raises(CheckpointError, match=r"plain\.pt: refused by weights_only loading \(Unsupported operand"):
        load_checkpoint(path)


def test_missing_corrupt_and_non_dict_files(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"nope\.pt: no such checkpoint file"):
        load_checkpoint(tmp_path / "nope.pt")
    full = tmp_path / "full.pt"
    save_checkpoint(full, {"w": torch.zeros(1000)})
    cut = tmp_path / "cut.pt"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(CheckpointError, match=r"cut\.pt: cannot be loaded"):
        load_checkpoint(cut)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty\.pt: empty or truncated"):
        load_checkpoint(empty)
    tensor_only = tmp_path / "tensor.pt"
    torch.save(torch.zeros(2), tensor_only)
    with pytest.raises(CheckpointError, match=r"tensor\.pt: expected a dict of states, found Tensor"):
        load_checkpoint(tensor_only)
    with pytest.raises(TypeError, match="state must be a dict"):
        save_checkpoint(tmp_path / "x.pt", [1, 2])  # type: ignore[arg-type]
