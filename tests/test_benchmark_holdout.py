"""benchmarks/raccoon_budget.py --holdout: settings are chosen on a split of the training images."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LABELS = ROOT / ".." / "shared" / "datasets" / "raccoon" / "data" / "train_labels.csv"

pytestmark = pytest.mark.datasets


def _script():
    spec = importlib.util.spec_from_file_location("raccoon_budget", ROOT / "benchmarks" / "raccoon_budget.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_holdout_split_is_by_image_disjoint_complete_and_fixed(tmp_path: Path) -> None:
    split = _script().split_training_images
    train_csv, val_csv = split(LABELS, 0.2, tmp_path / "a")
    train, val, every = _rows(train_csv), _rows(val_csv), _rows(LABELS)
    train_names, val_names = {r["filename"] for r in train}, {r["filename"] for r in val}
    all_names = {r["filename"] for r in every}
    assert (len(all_names), len(train_names), len(val_names)) == (160, 128, 32)
    assert not train_names & val_names and train_names | val_names == all_names
    assert len(train) + len(val) == len(every)  # every box row kept, with its image
    assert not all_names & _test_names()  # both parts come from the training images only
    again = split(LABELS, 0.2, tmp_path / "b")  # the same split on every run
    assert _rows(again[1]) == val


def _test_names() -> set[str]:
    return {r["filename"] for r in _rows(LABELS.parent / "test_labels.csv")}
