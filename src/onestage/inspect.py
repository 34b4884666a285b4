"""What a model is: its output layout, size and cost, as ``onestage inspect`` prints it."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from onestage.families import Detector
from onestage.config import Config


def count_macs(model: nn.Module, input_size: int) -> int:
    """Multiply-adds of one forward pass at a square ``input_size``, batch 1.

    Counts convolutions (out elements x in_channels / groups x kernel area) and linear layers
    (in x out features): the layers that hold virtually all of a detector's arithmetic.
    """
    total = 0

    def conv_hook(module: nn.Conv2d, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        kh, kw = module.kernel_size
        total += output.numel() * (module.in_channels // module.groups) * kh * kw

    def linear_hook(module: nn.Linear, inputs: tuple, output: torch.Tensor) -> None:
        nonlocal total
        total += output.numel() * module.in_features

    handles = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, input_size, input_size))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return total


def describe(cfg: Config, detector: Detector, macs: bool = True) -> dict[str, Any]:
    """The facts ``inspect`` prints, as a JSON-ready dict."""
    rows = detector.layout
    return {
        "arch": cfg.model.arch,
        "backbone": cfg.model.backbone,
        "input_size": cfg.model.input_size,
        "num_classes": len(detector.class_names),
        "scoring": detector.scoring,
        "background_is_a_class": cfg.model.arch in ("ssd", "ssdlite"),
        "parameters": sum(p.numel() for p in detector.model.parameters()),
        "macs": count_macs(detector.model, cfg.model.input_size) if macs else None,
        "maps": [
            {
                "name": r.name, "grid": list(r.grid), "anchors_per_cell": r.anchors_per_cell,
                "values_per_anchor": r.values_per_anchor, "shared_per_cell": r.shared_per_cell,
                "channels": r.channels, "candidates": r.candidates,
            }
            for r in rows
        ],
        "total_candidates": sum(r.candidates for r in rows),
    }


def format_layout(info: dict[str, Any]) -> str:
    lines = [
        f"{info['arch']} on {info['backbone']}, input {info['input_size']}x{info['input_size']}, "
        f"{info['num_classes']} classes, {info['parameters']:,} parameters"
        + (f", {info['macs'] / 1e9:.2f} GMACs" if info.get("macs") else ""),
        f"scores: {info['scoring']}",
    ]
    header = f"{'map':<22}{'grid':>9}{'anchors/cell':>14}{'values/anchor':>15}{'channels':>10}{'candidates':>12}"
    lines += [header, "-" * len(header)]
    for r in info["maps"]:
        grid = f"{r['grid'][0]}x{r['grid'][1]}"
        values = f"{r['values_per_anchor']}" + (f" (+{r['shared_per_cell']})" if r["shared_per_cell"] else "")
        lines.append(f"{r['name']:<22}{grid:>9}{r['anchors_per_cell']:>14}{values:>15}{r['channels']:>10}{r['candidates']:>12}")
    lines += ["-" * len(header), f"{'total':<70}{info['total_candidates']:>12}"]
    return "\n".join(lines)


def format_comparison(a: dict[str, Any], b: dict[str, Any]) -> str:
    """Two models side by side: the facts that differ between SSD and YOLO."""
    rows = [
        ("architecture", a["arch"], b["arch"]),
        ("backbone", a["backbone"], b["backbone"]),
        ("input", f"{a['input_size']}x{a['input_size']}", f"{b['input_size']}x{b['input_size']}"),
        ("classes", a["num_classes"], b["num_classes"]),
        ("background", "a class (C+1 softmax)" if a["background_is_a_class"] else "objectness (sigmoid)",
         "a class (C+1 softmax)" if b["background_is_a_class"] else "objectness (sigmoid)"),
        ("output maps", len(a["maps"]), len(b["maps"])),
        ("grids", " ".join(f"{m['grid'][0]}" for m in a["maps"]), " ".join(f"{m['grid'][0]}" for m in b["maps"])),
        ("values per box", _values(a), _values(b)),
        ("candidate boxes", f"{a['total_candidates']:,}", f"{b['total_candidates']:,}"),
        ("parameters", f"{a['parameters']:,}", f"{b['parameters']:,}"),
        ("GMACs", f"{a['macs'] / 1e9:.2f}" if a.get("macs") else "-", f"{b['macs'] / 1e9:.2f}" if b.get("macs") else "-"),
    ]
    width = max(len(str(r[1])) for r in rows) + 2
    return "\n".join(f"{name:<18}{str(x):<{width}}{y}" for name, x, y in rows)


def _values(info: dict[str, Any]) -> str:
    m = info["maps"][0]
    return f"{m['values_per_anchor']}" + (f" + {m['shared_per_cell']} shared per cell" if m["shared_per_cell"] else "")
