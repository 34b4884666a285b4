"""Nothing silently wrong before a run starts (issue 21, items 9 and 10): strict config
types, a batch size the model cannot train on, run folders never reused silently, and a
resumed run whose folder and checkpoint agree."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from onestage.cli import main as cli_main
from onestage.config import ConfigError, dump_config, load_config
from onestage.engine.checkpoint import save_checkpoint
from onestage.engine.preflight import check_trainable_batch, new_run_dir
from onestage.engine.trainer import load_run_config, make_run_dir, train

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "model.arch=ssdlite", "model.width_mult=0.25", "model.extra_channels=[64,32,32]",
    "data.train.num_images=4", "data.val.num_images=2", "data.augment.preset=none",
    "train.epochs=1", "train.time_budget=null", "schedule.warmup_steps=0", "ema.enabled=false",
]


# --------------------------------------------------------------------------- item 9: types
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.batch_size=true", r"train\.batch_size: .*true is a boolean; expected int"),
        ("precision.amp=1", r"precision\.amp: .*1 is not a boolean"),
        ("train.epochs='3'", r"train\.epochs: .*'3' is a string; expected int"),
        ("data.mean=[0.4, 0.5, false]", r"data\.mean: .*item 2: false is a boolean"),
    ],
)
def test_config_types_are_strict(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_yaml_ints_and_exponents_still_work_for_floats(tmp_path: Path) -> None:
    # YAML reads `lr: 1` as an int and `min_lr: 1e-5` (no dot) as a string: both are numbers here.
    path = tmp_path / "exp.yaml"
    path.write_text("optim: {lr: 1}\nschedule: {min_lr: 1e-5}\ntrain: {time_budget: 2, batch_size: 8}\n")
    cfg = load_config(path)
    assert cfg.optim.lr == 1.0 and cfg.schedule.min_lr == 1e-5 and cfg.train.time_budget == 2.0
    assert cfg.train.batch_size == 8 and cfg.precision.loss_scale == "dynamic"
    assert load_config(None, ["precision.loss_scale=128", "train.time_budget=null"]).precision.loss_scale == 128.0


# --------------------------------------------------------------------------- item 9: batch size
class FCWithNorm(nn.Module):
    """A conv map followed by a fully connected layer with BatchNorm1d (one value per channel at batch 1)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.BatchNorm2d(4))
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(4 * 8 * 8, 6), nn.BatchNorm1d(6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x))


def test_batch_of_one_with_batchnorm_on_single_values_is_refused() -> None:
    model = FCWithNorm()
    with pytest.raises(ValueError, match="more than 1 value per channel"):  # what PyTorch would say
        model.train()(torch.zeros(1, 3, 16, 16))
    with pytest.raises(ConfigError, match=r"train\.batch_size: 1 image .*fc\.2 .*batch_size >= 2"):
        check_trainable_batch(model, 1, input_size=16)
    assert model.training  # the probe restores the mode
    check_trainable_batch(model, 2, input_size=16)
    check_trainable_batch(model, 1, world_size=2, input_size=16, sync_bn=True)  # 2 images per statistic
    # BatchNorm2d on 8x8 maps alone trains on one image: 64 values per channel.
    check_trainable_batch(model.conv, 1, input_size=16)


def test_trainer_refuses_batch_of_one_before_the_first_step(tmp_path: Path) -> None:
    # SSDLite's last extra layers see 1x1 maps through BatchNorm.
    cfg = load_config(ROOT / "configs" / "demo_shapes.yaml", TINY + [f"train.out_dir={tmp_path}", "train.batch_size=1"])
    with pytest.raises(ConfigError, match=r"train\.batch_size: 1 image per BatchNorm batch"):
        train(cfg, tmp_path / "one", progress=False, max_steps=1)
    assert not (tmp_path / "one" / "last.pt").exists()


# --------------------------------------------------------------------------- item 10: run folders
def _fake_run(run_dir: Path, cfg) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(dump_config(cfg))
    save_checkpoint(run_dir / "last.pt", {"config": dump_config(cfg), "model": {"w": torch.ones(3)}})


def test_a_named_run_folder_holding_a_run_is_refused_unless_overwrite(tmp_path: Path) -> None:
    cfg = load_config(None, [f"train.out_dir={tmp_path}", "train.name=exp"])
    first = make_run_dir(cfg, "x.yaml")
    assert first == tmp_path / "exp" and first.is_dir()
    assert make_run_dir(cfg, "x.yaml") == first  # an empty folder holds no run yet
    _fake_run(first, cfg)
    (first / "best.pt").write_bytes(b"old")
    with pytest.raises(ConfigError, match=r"exp already holds a run; .*--resume .*--overwrite"):
        make_run_dir(cfg, "x.yaml")
    assert (first / "best.pt").exists()  # nothing touched
    assert make_run_dir(cfg, "x.yaml", overwrite=True) == first
    assert list(first.iterdir()) == []  # the old run's files are gone, no stale best.pt


def test_unnamed_runs_in_the_same_second_get_their_own_folders(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("time.strftime", lambda fmt: "20260101-000000")
    a = new_run_dir(tmp_path, None, "demo")
    b = new_run_dir(tmp_path, None, "demo")
    assert (a.name, b.name) == ("demo-20260101-000000", "demo-20260101-000000-2")


def test_cli_train_refuses_an_existing_run(tmp_path: Path, capsys) -> None:
    cfg = load_config(None, [f"train.out_dir={tmp_path}", "train.name=exp"])
    _fake_run(tmp_path / "exp", cfg)
    args = [str(ROOT / "configs" / "demo_shapes.yaml"), f"train.out_dir={tmp_path}", "train.name=exp", "--no-progress"]
    assert cli_main(["train", *args]) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_resume_checks_that_folder_config_and_checkpoint_agree(tmp_path: Path) -> None:
    cfg = load_config(None, [f"train.out_dir={tmp_path}", "train.name=exp"])
    run = tmp_path / "exp"
    _fake_run(run, cfg)
    assert load_run_config(run).train.name == "exp"
    edited = load_config(None, [f"train.out_dir={tmp_path}", "train.name=exp", "optim.lr=0.5", "seed=3"])
    (run / "config.yaml").write_text(dump_config(edited))
    with pytest.raises(ConfigError, match=r"config\.yaml and last\.pt disagree on optim\.lr, seed"):
        load_run_config(run)
