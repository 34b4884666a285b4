"""Shared test set-up: the real datasets beside the project (``../shared/datasets``).

A test that reads them carries the ``datasets`` mark (``pytestmark = pytest.mark.datasets``
for a whole module); where the folder is absent, every such test skips with the one reason below.
"""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
SKIP_REASON = (
    f"{SHARED_DATASETS} is absent: these tests read the real datasets (raccoon, BCCD, coco128) "
    "that sit in ../shared/datasets beside the project checkout"
)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "datasets: reads the real datasets in ../shared/datasets (skipped without them)")


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("datasets") is not None and not SHARED_DATASETS.is_dir():
        pytest.skip(SKIP_REASON)
