"""PNG plots of a run: loss terms, learning rate and validation metrics against steps."""

from __future__ import annotations

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _read(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def metric_series(rows: list[dict[str, str]], kind: str, key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of a metrics.csv column over the rows of one kind (``step`` / ``epoch``)."""
    xs, ys = [], []
    for row in rows:
        if row.get("kind") == kind and row.get(key) not in (None, ""):
            xs.append(float(row["step"]))
            ys.append(float(row[key]))
    return xs, ys


def plot_training_curves(metrics_csv: Path, out_dir: Path) -> list[Path]:
    """losses.png (every loss term), lr.png and metrics.png (validation) from metrics.csv."""
    rows = _read(metrics_csv)
    out_dir.mkdir(parents=True, exist_ok=True)
    columns = list(rows[0].keys()) if rows else []
    written = []
    groups = {
        "losses.png": [c for c in columns if c.startswith("loss_")],
        "lr.png": ["lr"],
        "metrics.png": [c for c in columns if c.startswith(("voc_", "coco_"))],
    }
    for name, keys in groups.items():
        kind = "epoch" if name == "metrics.png" else "step"
        fig, ax = plt.subplots(figsize=(7, 4))
        for key in keys:
            xs, ys = metric_series(rows, kind, key)
            if xs:
                ax.plot(xs, ys, label=key, marker="o" if kind == "epoch" else None)
        ax.set_xlabel("optimizer step")
        ax.set_title(name[:-4])
        ax.grid(alpha=0.3)
        if keys:
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=90)
        plt.close(fig)
        written.append(out_dir / name)
    return written
