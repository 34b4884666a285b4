"""Every experiment file shipped in configs/ validates against the schema (a typo in a key is
a ConfigError), and the raccoon config keeps what benchmarks/RESULTS.md measured."""

from __future__ import annotations

from pathlib import Path

import pytest

from onestage.build import build_mosaic
from onestage.config import load_config

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def test_configs_folder_is_not_empty() -> None:
    assert len(CONFIGS) >= 5


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_validates(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.model.input_size >= 32


@pytest.mark.datasets
def test_raccoon_config_is_the_measured_recipe() -> None:
    cfg = load_config(ROOT / "configs" / "raccoon_ssdlite.yaml")
    assert cfg.train.time_budget == 20 and cfg.precision.amp == cfg.precision.channels_last == "auto"
    assert cfg.model.ssd.matcher.neg_iou == cfg.model.ssd.matcher.pos_iou == 0.5  # no ignore band
    mosaic = build_mosaic(cfg)
    assert mosaic is not None and mosaic.p == 0.5 and mosaic.size == cfg.model.input_size
    assert cfg.data.augment.close_mosaic == 0.2
