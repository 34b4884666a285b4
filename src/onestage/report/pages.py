"""``report.html``: one self-contained page per run, per ``eval --out`` folder, per comparison.

Each writer reads only what its folder holds and leaves out a section whose files are
missing (a run stopped before its final evaluation still gets its training curves).

Run folder (what ``onestage train`` writes): config.yaml, version.txt, metrics.csv (the
whole history, also after a resume: the trainer restores it from the checkpoint),
eval/metrics.json (final metrics and the run summary), eval/result.json (per-class AP and
TIDE), eval/confusion.json, eval/pr_curves.png, eval/worst/*.png, predictions/*.png,
plots/*.png; optional: precision decision JSON files, assignment panels, anything else as
PNG (shown under "Other figures").
"""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Any, Sequence

import yaml

from onestage.eval.tide import MAIN_ERRORS, SPECIAL_ERRORS
from onestage.report import figures as plots
from onestage.report import html as h
from onestage.report.html import Charts, details, esc, gallery, img, key_values, page, pre, section, table

REPORT_NAME = "report.html"
# PNG plots the interactive charts replace (engine/plots.py writes them for people without a browser)
_REPLACED_PLOTS = {"losses.png", "lr.png", "metrics.png"}
_COCO_ROWS = [
    ("coco_ap", "AP @[0.50:0.95]"), ("coco_ap50", "AP @0.50"), ("coco_ap75", "AP @0.75"),
    ("coco_ap_small", "AP small"), ("coco_ap_medium", "AP medium"), ("coco_ap_large", "AP large"),
    ("coco_ar1", "AR 1 det"), ("coco_ar10", "AR 10 dets"), ("coco_ar100", "AR 100 dets"),
    ("coco_ar_small", "AR small"), ("coco_ar_medium", "AR medium"), ("coco_ar_large", "AR large"),
]


def _read_json(path: Path) -> Any | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc


def _read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def _number(text: str | None) -> str | None:
    """A metrics.csv cell as a short number (one decimal), or None when empty / not a number."""
    try:
        return f"{float(text):.1f}" if text not in (None, "") else None
    except ValueError:
        return None


def _pngs(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.png")) if folder.is_dir() else []


# ----------------------------------------------------------------------------- sections
def _machine() -> list[tuple[str, Any]]:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return [("host", platform.node()), ("system", platform.platform()), ("CPU", cpu), ("CPU cores", os.cpu_count()),
            ("CPU capability", torch.backends.cpu.get_cpu_capability()), ("GPU", gpu),
            ("python", platform.python_version()), ("torch", torch.__version__)]


def _summary_section(run_dir: Path, cfg: dict, metrics: dict, rows: list[dict[str, str]]) -> str:
    seconds = metrics.get("seconds")
    images = metrics.get("images_seen")
    last = rows[-1] if rows else {}
    steps = [r for r in rows if r.get("kind") == "step"]
    pairs = [
        ("run folder", str(run_dir)),
        ("model", f"{cfg.get('model', {}).get('arch')} on {cfg.get('model', {}).get('backbone')}, "
                  f"input {cfg.get('model', {}).get('input_size')}" if cfg else None),
        ("steps", metrics.get("steps", last.get("step"))),
        ("epochs", metrics.get("epochs", last.get("epoch"))),
        ("stopped by", metrics.get("stop_reason")),
        ("training time", f"{seconds / 60:.1f} min" if isinstance(seconds, (int, float)) else None),
        ("images/s (whole run)", f"{images / seconds:.1f}" if images and seconds else None),
        ("images/s (last logged step)", _number(steps[-1].get("images_per_s")) if steps else None),
        ("best validation", f"{metrics['best_metric']} = {metrics['best_value']:.4f}"
         if isinstance(metrics.get("best_value"), float) and math.isfinite(metrics["best_value"]) else None),
        ("skipped steps (AMP overflow)", metrics.get("skipped_steps", last.get("skipped_steps"))),
        ("non-finite loss steps", metrics.get("nonfinite_steps", last.get("nonfinite_steps"))),
        ("processes", metrics.get("world_size")),
        ("evaluated checkpoint", metrics.get("checkpoint")),
    ]
    version = (run_dir / "version.txt").read_text().strip() if (run_dir / "version.txt").is_file() else None
    if version:
        pairs.append(("versions", version.replace("\n", ", ")))
    return key_values(pairs)


def _precision_section(run_dir: Path, cfg: dict) -> str:
    """The precision the run asked for (config) and the one it used (precision.json: the
    measured decision, with its reason and timings), plus any other precision JSON."""
    out = ""
    if cfg.get("precision"):
        out += "<p>Asked for (config):</p>" + key_values(sorted(cfg["precision"].items()))
    decision = _read_json(run_dir / "precision.json")
    if isinstance(decision, dict):
        used = [(k, decision[k]) for k in ("reason", "amp", "dtype", "channels_last", "loss_scaling", "device",
                                            "warning") if k in decision]
        out += "<p>Used (precision.json):</p>" + key_values(used)
        timings = decision.get("timings")
        if isinstance(timings, dict) and timings:
            out += table(["mode", "measured step (s)"], sorted(timings.items(), key=lambda kv: kv[1]), digits=3)
    for p in sorted(p for p in run_dir.rglob("*.json") if "precision" in p.name):
        out += details(f"{p.relative_to(run_dir)}", pre(p.read_text()))
    return out


def _layout_section(cfg_text: str, class_names: list[str] | None) -> str:
    """The ``inspect`` table of the model the run trained (built from its config, no weights)."""
    if not cfg_text or not class_names:
        return ""
    from onestage.build import build_detector
    from onestage.config import Config
    from onestage.inspect import describe

    cfg = Config.model_validate(yaml.safe_load(cfg_text))
    # the layout needs no weights: never read a backbone weights file (it may be gone by now)
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"backbone_weights": None})})
    info = describe(cfg, build_detector(cfg, class_names), macs=False)
    head = (f"{info['arch']} on {info['backbone']}, input {info['input_size']}, {info['num_classes']} classes, "
            f"{info['parameters']:,} parameters; scores: {info['scoring']}")
    rows = [(m["name"], f"{m['grid'][0]}x{m['grid'][1]}", m["anchors_per_cell"], m["values_per_anchor"],
             m["channels"], m["candidates"]) for m in info["maps"]]
    rows.append(("total", "", "", "", "", info["total_candidates"]))
    return f"<p>{esc(head)}</p>" + table(["map", "grid", "anchors/cell", "values/anchor", "channels", "candidates"],
                                          rows, digits=0)


def _dataset_section(cfg: dict, result: dict | None, run_dir: Path) -> str:
    data = cfg.get("data", {})
    rows = []
    for split in ("train", "val"):
        d = data.get(split) or {}
        generated = d.get("format") == "shapes"
        source = f"generated, seed {d.get('seed')}" if generated else \
            " ".join(str(d[k]) for k in ("root", "split", "annotations", "images") if d.get(k))
        rows.append((split, d.get("format"), source, d.get("num_images") if generated else d.get("limit") or "all"))
    out = table(["split", "format", "source", "images"], rows)
    if result and result.get("per_class"):
        per = result["per_class"]
        out += "<p>Validation objects per class (the evaluated split; crowd / difficult not counted):</p>"
        out += table(["class", "objects"], [(r["name"], r["num_gt"]) for r in per] +
                     [("total", sum(r["num_gt"] for r in per))], digits=0)
    flagged = sorted(p for p in run_dir.rglob("*.json") if "problem" in p.name or "data_check" in p.name)
    for p in flagged:
        out += details(f"data check: {p.relative_to(run_dir)}", pre(p.read_text()))
    return out


def _training_section(rows: list[dict[str, str]], charts: Charts) -> str:
    if not rows:
        return "<p class='note'>No metrics.csv.</p>"
    figs = plots.training_figures(rows)
    steps = [r for r in rows if r.get("kind") == "step"]
    note = (f"<p class='note'>{len(steps)} logged steps, {len(rows) - len(steps)} validation rows "
            f"(from step {rows[0].get('step')} to {rows[-1].get('step')}).</p>")
    return note + "<div class='grid2'>" + "".join(charts.add(f) for f in figs) + "</div>"


def _metric_table(metrics: dict) -> str:
    voc = [(k, v) for k, v in metrics.items() if k.startswith("voc_") and isinstance(v, (int, float))]
    coco = [(label, k, metrics[k]) for k, label in _COCO_ROWS if isinstance(metrics.get(k), (int, float))]
    out = ""
    if voc:
        out += table(["VOC metric", "value"], [(k, v) for k, v in voc], table_id="voc-metrics")
    if coco:
        out += table(["COCO metric", "key", "value"], coco, table_id="coco-metrics")
    return out


def _per_class_table(result: dict) -> str:
    tide = result.get("tide")
    tide_rows = {r["name"]: r for r in tide["per_class"]} if tide else {}
    names = list(MAIN_ERRORS) + list(SPECIAL_ERRORS)
    headers = ["class", f"AP@{result.get('iou_threshold', 0.5):g} ({result.get('voc_metric', 'area')})", "objects",
               "detections"] + ([f"dAP {n}" for n in names] if tide else [])
    rows = []
    for r in result["per_class"]:
        row: list[Any] = [r["name"], float("nan") if r["ap"] is None else r["ap"], r["num_gt"], r["num_det"]]
        if tide:
            t = tide_rows.get(r["name"])
            row += [100 * t["main"][n] for n in MAIN_ERRORS] + [100 * t["special"][n] for n in SPECIAL_ERRORS]
        rows.append(row)
    note = "<p class='note'>Click a column header to sort. dAP in AP points (x 100), TIDE at IoU 0.5.</p>"
    digits = [0, 4, 0, 0] + [2] * (len(headers) - 4)  # AP as the metric table, dAP in points as the TIDE table
    return note + table(headers, rows, sortable=True, table_id="per-class", digits=digits)


def _tide_section(result: dict | None, charts: Charts) -> str:
    tide = (result or {}).get("tide")
    if not tide:
        return ""
    counts = table(["error", "count", "dAP (AP points)", "what"],
                   [(n, tide["counts"][n], 100 * tide["main"][n], plots.ERROR_DESCRIPTIONS[n]) for n in MAIN_ERRORS] +
                   [(n, "-", 100 * tide["special"][n], plots.ERROR_DESCRIPTIONS[n]) for n in SPECIAL_ERRORS],
                   table_id="tide-table", digits=2)
    return ("<p class='note'>TIDE (Bolya et al., ECCV 2020): the AP gained by fixing each kind of error alone; "
            f"foreground IoU {tide['pos_threshold']:g}, background IoU {tide['bg_threshold']:g}.</p>"
            + "<div class='grid2'>" + charts.add(plots.tide_bar(tide)) + charts.add(plots.tide_heatmap(tide))
            + "</div>" + counts)


def _evaluation_sections(eval_dir: Path, metrics: dict, charts: Charts) -> list[tuple[str, str, str]]:
    """(anchor, title, html) of the evaluation parts that exist in ``eval_dir``."""
    result = _read_json(eval_dir / "result.json")
    confusion = _read_json(eval_dir / "confusion.json")
    out = []
    all_metrics = {**(result or {}).get("metrics", {}), **metrics}
    if any(k.startswith(("voc_", "coco_")) for k in all_metrics):
        out.append(("metrics", "Metrics", _metric_table(all_metrics)))
    if result and result.get("per_class"):
        out.append(("per-class", "Per class", _per_class_table(result)))
    tide = _tide_section(result, charts)
    if tide:
        out.append(("tide", "Error analysis (TIDE)", tide))
    if (eval_dir / "pr_curves.png").is_file():
        out.append(("pr", "Precision-recall curves", img(eval_dir / "pr_curves.png")))
    if confusion:
        counts = [(k.replace("_", " "), v) for k, v in confusion.items() if isinstance(v, (int, float))]
        out.append(("confusion", "Errors at the display threshold",
                    "<p class='note'>Detections above the display score threshold, sorted into kinds "
                    "(eval/confusion.json).</p>" + table(["kind", "count"], counts, digits=0)))
    worst = _pngs(eval_dir / "worst")
    if worst:
        out.append(("worst", "Worst images (ground truth and detections)", gallery(worst)))
    return out


def _other_figures(run_dir: Path, used: set[Path]) -> str:
    rest = [p for p in sorted(run_dir.rglob("*.png")) if p not in used and p.name not in _REPLACED_PLOTS]
    return gallery(rest, limit=16) if rest else ""


def _write(out_dir: Path, title: str, parts: list[tuple[str, str, str]], charts: Charts) -> Path:
    parts = [p for p in parts if p[2]]
    body = "".join(section(title_, content, anchor) for anchor, title_, content in parts)
    stamp = f"<p class='note'>Written {time.strftime('%Y-%m-%d %H:%M:%S %Z')} by onestage.</p>"
    html_text = page(title, [(a, t) for a, t, _ in parts], stamp + body, charts)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / REPORT_NAME
    tmp = path.with_suffix(".html.tmp")
    tmp.write_text(html_text, encoding="utf-8")
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------- public
def write_run_report(run_dir: Path) -> Path:
    """``run_dir/report.html`` from what the run folder holds; returns its path."""
    run_dir = Path(run_dir)
    cfg_text = (run_dir / "config.yaml").read_text() if (run_dir / "config.yaml").is_file() else ""
    cfg = yaml.safe_load(cfg_text) or {} if cfg_text else {}
    rows = _read_csv(run_dir / "metrics.csv")
    metrics = _read_json(run_dir / "eval" / "metrics.json") or {}
    result = _read_json(run_dir / "eval" / "result.json")
    charts = Charts()
    class_names = [r["name"] for r in result["per_class"]] if result else None
    parts: list[tuple[str, str, str]] = [
        ("run", "Run", _summary_section(run_dir, cfg, metrics, rows)),
        ("config", "Config", details("config.yaml (resolved)", pre(cfg_text)) if cfg_text else ""),
        ("layout", "Model layout", _layout_section(cfg_text, class_names)),
        ("data", "Dataset", _dataset_section(cfg, result, run_dir) if cfg else ""),
        ("machine", "Machine and precision",
         "<p class='note'>The machine this report was written on (at the end of training: the one that trained).</p>"
         + key_values(_machine()) + _precision_section(run_dir, cfg)),
        ("training", "Training", _training_section(rows, charts)),
    ]
    parts += _evaluation_sections(run_dir / "eval", metrics, charts)
    predictions = _pngs(run_dir / "predictions")
    if predictions:
        parts.append(("predictions", "Validation predictions", gallery(predictions)))
    assignment = sorted(p for p in run_dir.rglob("*.png") if "assign" in str(p.relative_to(run_dir)).lower())
    if assignment:
        parts.append(("assignment", "Assignment panels", gallery(assignment)))
    used = set(predictions) | set(assignment) | set(_pngs(run_dir / "eval" / "worst")) | {run_dir / "eval" / "pr_curves.png"}
    parts.append(("other", "Other figures", _other_figures(run_dir, used)))
    return _write(run_dir, f"onestage run: {run_dir.name}", parts, charts)


def write_eval_report(out_dir: Path, *, config_text: str | None = None, checkpoint: Path | str | None = None) -> Path:
    """``out_dir/report.html`` for ``onestage eval ... --out DIR``: the metrics, per-class
    AP, PR curves, TIDE and worst images found in ``out_dir``."""
    out_dir = Path(out_dir)
    charts = Charts()
    result = _read_json(out_dir / "result.json") or {}
    head = key_values([("checkpoint", str(checkpoint) if checkpoint else None), ("folder", str(out_dir))])
    parts = [("run", "Evaluation", head),
             ("config", "Config", details("config", pre(config_text)) if config_text else "")]
    parts += _evaluation_sections(out_dir, result.get("metrics", {}), charts)
    return _write(out_dir, f"onestage eval: {checkpoint or out_dir.name}", parts, charts)


def write_compare_report(out_dir: Path, table: list[dict], figures: Sequence[Path] = ()) -> Path:
    """``out_dir/report.html`` for ``onestage compare``: the side-by-side ``table`` (one dict
    per row, columns in first-seen order; sortable) and the ``figures`` (image files)."""
    out_dir = Path(out_dir)
    columns: list[str] = []
    for row in table:
        columns += [k for k in row if k not in columns]
    rows = [["" if row.get(c) is None else row[c] for c in columns] for row in table]
    parts = [("table", "Side by side", h.table(columns, rows, sortable=True, table_id="compare")),
             ("figures", "Figures", "".join(img(Path(f), Path(f).stem) for f in figures))]
    return _write(out_dir, "onestage compare", parts, Charts())
