"""``onestage compare``: several detectors trained on equal terms, measured in one run, side by side.

Each config is trained with the same data, seed and time budget (the first config's seed;
``--budget`` minutes), or finished run folders are taken as they are (``--runs``). Then every
model is measured by the same code in the same process: its outputs (``inspect.describe``),
its assignment on the training split (``explore``, under its own predictions), its loss terms
at the start and end of training (``metrics.csv``), its accuracy on the val split (VOC and
COCO AP, per class, the error breakdown of ``eval.plots.confusion_summary``), its speed and,
when the val split is video or ``--video`` names held-out videos, its temporal stability
(``eval.stability``).

Written to ``--out``: ``compare.md`` and ``compare.json`` (the table: a list of rows, one dict
each with ``section``, ``row`` and one value per model), ``detections.png`` (the same
validation images with each model's detections), ``assign_<model>.png`` (positives per object
histograms) and ``report.html`` (``onestage.report.write_compare_report``).
"""

from __future__ import annotations

import csv
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from onestage.config import Config, ConfigError, load_config

STABILITY_NA = "n/a (no video: the val split is images; --video DIR measures it)"


# ----------------------------------------------------------------------------- training
def unique_names(paths: Sequence[Path]) -> list[str]:
    """A short name per model (file or folder stem), numbered where two are the same."""
    stems = [Path(p).stem if Path(p).suffix in (".yaml", ".yml") else Path(p).name for p in paths]
    return [s if stems.count(s) == 1 else f"{s}-{i}" for i, s in enumerate(stems)]


def check_equal_terms(cfgs: Sequence[Config], names: Sequence[str]) -> list[str]:
    """Raise when the models would not see the same data; return notes on what else differs."""
    ref = cfgs[0]
    for cfg, name in zip(cfgs[1:], names[1:]):
        for split in ("train", "val"):
            a, b = getattr(ref.data, split).model_dump(mode="json"), getattr(cfg.data, split).model_dump(mode="json")
            if a != b:
                raise ConfigError(f"compare: {names[0]} and {name} read different data.{split} ({a} vs {b}); "
                                  "a comparison needs the same data")
    notes = []
    sizes = {n: c.model.input_size for n, c in zip(names, cfgs)}
    if len(set(sizes.values())) > 1:
        notes.append(f"input sizes differ ({', '.join(f'{n} {s}' for n, s in sizes.items())}): the papers' own sizes")
    augment = {n: c.data.augment.preset for n, c in zip(names, cfgs)}
    if len(set(augment.values())) > 1:
        notes.append(f"augmentation presets differ ({', '.join(f'{n} {s}' for n, s in augment.items())})")
    return notes


def train_all(
    configs: Sequence[Path], runs_dir: Path, budget: float | None, max_steps: int | None, progress: bool
) -> tuple[list[Path], list[str]]:
    """Train every config with the first one's seed and the same budget; returns (run folders, notes)."""
    from onestage.engine.trainer import train

    names = unique_names(configs)
    cfgs = [load_config(c) for c in configs]
    notes = check_equal_terms(cfgs, names)
    seed = cfgs[0].seed
    run_dirs = []
    for path, name in zip(configs, names):
        overrides = [f"seed={seed}", f"train.out_dir={runs_dir}", f"train.name={name}"]
        if budget is not None:
            overrides.append(f"train.time_budget={budget}")
        cfg = load_config(path, overrides)
        run_dir = runs_dir / name
        run_dir.mkdir(parents=True, exist_ok=True)
        print(f"[compare] training {name} ({cfg.model.arch} on {cfg.model.backbone}, input {cfg.model.input_size}, "
              f"seed {seed}, budget {cfg.train.time_budget} min) in {run_dir}", file=sys.stderr)
        summary = train(cfg, run_dir, progress=progress, max_steps=max_steps)
        if summary["stop_reason"] == "terminated":  # SIGTERM / Ctrl-C: stop the whole comparison
            raise KeyboardInterrupt(f"compare: training of {name} was interrupted; {run_dir} can be resumed")
        run_dirs.append(run_dir)
    return run_dirs, notes


# ----------------------------------------------------------------------------- measurements
def read_metrics_csv(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        raise ConfigError(f"{path}: no metrics.csv; compare --runs needs folders written by `onestage train`")
    with path.open(newline="") as f:
        return [r for r in csv.DictReader(f) if r.get("kind") == "step"]


def loss_shares(rows: Sequence[dict[str, str]]) -> dict[str, Any]:
    """The loss terms (weighted, as logged) and their share of their sum at the first and last logged step."""
    if not rows:
        return {"start": {}, "end": {}, "start_step": None, "end_step": None}
    terms = [k for k in rows[0] if k.startswith("loss_") and k != "loss_total" and not k.startswith("loss_num_")]

    def at(row: dict[str, str]) -> dict[str, dict[str, float]]:
        values = {k[5:]: float(row[k]) for k in terms if row.get(k) not in (None, "")}
        total = sum(values.values())
        return {k: {"value": v, "share": v / total if total else float("nan")} for k, v in values.items()}

    return {"start": at(rows[0]), "end": at(rows[-1]), "start_step": int(rows[0]["step"]), "end_step": int(rows[-1]["step"])}


def training_speed(rows: Sequence[dict[str, str]]) -> float | None:
    """Median training images/s over the logged steps after the first (which pays for warm-up)."""
    values = [float(r["images_per_s"]) for r in rows[1:] if r.get("images_per_s")] or \
             [float(r["images_per_s"]) for r in rows if r.get("images_per_s")]
    return statistics.median(values) if values else None


@torch.no_grad()
def inference_latency(loaded: Any, images: torch.Tensor, repeats: int = 5) -> dict[str, float]:
    """Median seconds of a forward pass and of decode + NMS on ``images`` (B, 3, S, S), after one warm-up."""
    from onestage.engine.precision import autocast_context

    model, post, cfg = loaded.detector.model.eval(), loaded.detector.postprocess, loaded.cfg
    x = images.contiguous(memory_format=torch.channels_last) if cfg.precision.channels_last else images
    forward, decode = [], []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        with autocast_context(cfg.precision, x.device):
            outputs = model(x)
        t1 = time.perf_counter()
        post(outputs)
        t2 = time.perf_counter()
        if i:
            forward.append(t1 - t0)
            decode.append(t2 - t1)
    f, d = statistics.median(forward), statistics.median(decode)
    return {"batch": len(images), "forward_s": f, "decode_nms_s": d, "total_s": f + d, "decode_share": d / (f + d)}


def _precision_words(amp: Any, dtype: Any) -> str:
    return f"{dtype} autocast" if amp is True else ("fp32" if amp is False else f"amp {amp}")


def training_precision(run_dir: Path) -> str:
    """The precision the run trained in (its precision.json, written when it was chosen by measurement)."""
    path = run_dir / "precision.json"
    if not path.exists():
        return "as configured"
    decision = json.loads(path.read_text())
    return _precision_words(decision.get("amp"), decision.get("dtype"))


def evaluate_on_video(loaded: Any, video: Path, progress: bool = False) -> tuple[Any, int]:
    """(EvalResult with ``stability``, frames) of a loaded detector on a ``format: mot`` folder."""
    from onestage.build import build_eval_dataset, read_dataset
    from onestage.config import DatasetConfig
    from onestage.engine.evaluate import evaluate

    spec = read_dataset(DatasetConfig(format="mot", root=Path(video)), loaded.cfg, class_names=loaded.class_names)
    dataset = build_eval_dataset(loaded.cfg, spec, loaded.class_names)
    result, _ = evaluate(loaded.detector, dataset, loaded.cfg, loaded.device, progress=progress)
    return result, len(dataset)


def stability_column(result: Any, frames: int, source: str) -> dict[str, Any]:
    """The stability figures of an evaluation on video (``eval.stability``, Zhang & Wang 2016),
    VOC AP@0.5 on the same frames and the share of annotated objects detected at the display
    threshold."""
    s, tracks = result.stability, result.stability.tracks
    return {
        "source": source, "frames": frames, "tracks": int(s.num_tracks.sum()),
        "voc_ap50": float(result.metrics["voc_ap50"]),
        "found_fixed": float(tracks.detected.sum() / max(int(tracks.length.sum()), 1)), **s.metrics(),
    }


def measure_stability(
    loaded: Any, val_result: Any, val_frames: int, video: Path | None, progress: bool
) -> dict[str, Any] | str:
    """Stability from the val split (``val_result``) when it is video, else from ``video``, else
    ``STABILITY_NA``."""
    if val_result.stability is not None:
        return stability_column(val_result, val_frames, "val split")
    if video is None:
        return STABILITY_NA
    return stability_column(*evaluate_on_video(loaded, video, progress), str(video))


def measure_run(
    run_dir: Path, assign_images: str, progress: bool, repeats: int = 5, video: Path | None = None
) -> tuple[dict[str, Any], Any]:
    """Every number of one model's column; also (loaded detector, val dataset, detections) for the figure."""
    from onestage.api import load_detector
    from onestage.build import build_eval_dataset, read_dataset
    from onestage.engine.evaluate import evaluate
    from onestage.eval.evaluator import result_to_json
    from onestage.eval.plots import confusion_summary
    from onestage.explore import AssignSource, explore_split, select_indices
    from onestage.inspect import describe

    ckpt = run_dir / "best.pt" if (run_dir / "best.pt").exists() else run_dir / "last.pt"
    if not ckpt.exists():
        raise ConfigError(f"{run_dir}: no best.pt or last.pt; not a finished `onestage train` run")
    loaded = load_detector(ckpt, device="cpu", overrides=["eval.metrics=[voc,coco]"])
    cfg, det = loaded.cfg, loaded.detector
    train_spec = read_dataset(cfg.data.train, cfg, class_names=loaded.class_names)
    val_spec = read_dataset(cfg.data.val, cfg, class_names=loaded.class_names)
    val_ds = build_eval_dataset(cfg, val_spec, loaded.class_names)

    source = AssignSource(build_eval_dataset(cfg, train_spec, loaded.class_names), det.family, loaded.class_names,
                          cfg.model.input_size, tuple(cfg.data.mean), tuple(cfg.data.std), det.model.eval(), cfg.precision)
    assignment = explore_split(source, select_indices(source, [], assign_images), None, progress=progress, verbose=False)

    result, dets = evaluate(det, val_ds, cfg, loaded.device, progress=progress, keep_detections=True)
    errors = confusion_summary(val_ds.records, dets, loaded.class_names, iou=cfg.eval.iou_threshold,
                               score_threshold=cfg.eval.display_threshold)
    rows = read_metrics_csv(run_dir / "metrics.csv")
    batch16 = torch.stack([val_ds[i]["image"] for i in range(min(16, len(val_ds)))])
    info = describe(cfg, det)
    column = {
        "run": str(run_dir), "checkpoint": ckpt.name, "arch": cfg.model.arch, "backbone": cfg.model.backbone,
        "input_size": cfg.model.input_size, "seed": cfg.seed, "budget_min": cfg.train.time_budget,
        "steps": int(rows[-1]["step"]) if rows else 0, "train_minutes": float(rows[-1]["time_s"]) / 60 if rows else 0.0,
        "precision": {"training": training_precision(run_dir), "inference": _precision_words(cfg.precision.amp, cfg.precision.dtype)},
        "outputs": info, "family": det.family.name, "background_is_a_class": det.family.background_is_a_class,
        "assignment": {k: v for k, v in assignment.items() if k != "objects"},
        "loss": loss_shares(rows), "train_images_per_s": training_speed(rows),
        "accuracy": result_to_json(result), "errors": {k: v for k, v in errors.items() if k != "per_class"},
        "errors_per_class": errors["per_class"],
        "latency": [inference_latency(loaded, batch16[:1], repeats), inference_latency(loaded, batch16, repeats)],
        "stability": measure_stability(loaded, result, len(val_ds), video, progress),
    }
    return column, (loaded, val_ds, dets)


# ----------------------------------------------------------------------------- the table
def _f(x: float | None, digits: int = 3) -> str:
    """A number, or "-" for none, NaN and COCO's -1 (no object of that size)."""
    return "-" if x is None or math.isnan(x) or x < 0 else f"{x:.{digits}f}"


def _terms(shares: dict[str, dict[str, float]]) -> str:
    return ", ".join(f"{k} {v['value']:.3g} ({100 * v['share']:.0f}%)" for k, v in shares.items()) or "-"


def _cell_rows(m: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(section, row, value) of one model, in table order."""
    o, a, acc = m["outputs"], m["assignment"]["summary"], m["accuracy"]
    metrics = acc["metrics"]
    per_obj = a["positives_per_object"]
    maps = o["maps"]
    values = maps[0]["values_per_anchor"]
    shared = maps[0]["shared_per_cell"]
    per_class = ", ".join(f"{r['name']} {_f(r['ap'], 2)}" for r in acc["per_class"])
    fp = ", ".join(f"{k.replace('_', ' ')} {m['errors'][k]}" for k in ("background", "localization", "wrong_class", "both", "duplicate"))
    b1, b16 = m["latency"]
    return [
        ("setup", "architecture", f"{m['arch']} on {m['backbone']}"),
        ("setup", "input, seed, budget", f"{m['input_size']} px, seed {m['seed']}, {m['budget_min']} min"),
        ("setup", "trained", f"{m['steps']} steps in {m['train_minutes']:.1f} min ({m['precision']['training']}; "
                             f"inference {m['precision']['inference']})"),
        ("outputs", "maps (grid x anchors)", " ".join(f"{r['grid'][0]}x{r['grid'][1]}x{r['anchors_per_cell']}" for r in maps)),
        ("outputs", "candidates", f"{o['total_candidates']:,}"),
        ("outputs", "values per candidate", f"{values}" + (f" + {shared} shared per cell" if shared else "")),
        ("outputs", "scoring", o["scoring"]),
        ("outputs", "parameters", f"{o['parameters'] / 1e6:.2f} M"),
        ("outputs", "MACs at the input size", f"{o['macs'] / 1e9:.2f} G"),
        ("assignment (train split)", "positives per object, small / medium / large (mean)",
         " / ".join(_f(per_obj[b]["mean"], 2) + f" (n={per_obj[b]['objects']})" for b in ("small", "medium", "large"))),
        ("assignment (train split)", "objects only forced / lost / without a positive",
         f"{a['only_forced']} / {a['lost']} / {a['no_positive']} of {a['objects']}"),
        ("assignment (train split)", "ignored candidates per image (mean)", _f(a["ignored_per_image"]["mean"], 1)),
        ("assignment (train split)", "positive : negative, before / after mining", f"{a['pos_neg_before']} / {a['pos_neg_after']}"),
        ("loss", "terms at the start (share of their sum)", _terms(m["loss"]["start"])),
        ("loss", "terms at the end (share of their sum)", _terms(m["loss"]["end"])),
        ("accuracy (val split)", "VOC AP@0.5", _f(metrics.get("voc_ap50"))),
        ("accuracy (val split)", "COCO AP@[.5:.95]", _f(metrics.get("coco_ap"))),
        ("accuracy (val split)", "COCO AP small / medium / large",
         " / ".join(_f(metrics.get(k)) for k in ("coco_ap_small", "coco_ap_medium", "coco_ap_large"))),
        ("accuracy (val split)", "per-class AP@0.5", per_class),
        ("accuracy (val split)", "false positives by kind (score >= display threshold)", fp),
        ("accuracy (val split)", "true positives / missed objects", f"{m['errors']['true_positives']} / {m['errors']['missed']}"),
        ("speed", "training images/s (median of metrics.csv)", _f(m["train_images_per_s"], 1)),
        ("speed", "inference latency, batch 1 (ms)", f"{1000 * b1['total_s']:.1f}"),
        ("speed", "inference latency, batch 16 (ms per batch / per image)",
         f"{1000 * b16['total_s']:.0f} / {1000 * b16['total_s'] / b16['batch']:.1f}"),
        ("speed", "decode + NMS share of inference, batch 1 / 16",
         f"{100 * b1['decode_share']:.0f}% / {100 * b16['decode_share']:.0f}%"),
        *_stability_rows(m["stability"]),
    ]


def _stability_rows(st: dict[str, Any] | str) -> list[tuple[str, str, str]]:
    """The stability section: the same rows with or without video (``STABILITY_NA`` in each)."""
    rows = ["video frames, tracks, VOC AP@0.5 on those frames",
            "E_F / E_C / E_R (mean over score thresholds 0.1..0.9; lower is steadier)",
            "Phi = E_F + E_C + E_R: mean over 0.1..0.9 / at the display threshold",
            "annotated objects detected at the display threshold"]
    if isinstance(st, str):
        return [("stability", row, st) for row in rows]
    cells = [f"{st['frames']} frames ({st['source']}), {st['tracks']} tracks, AP {_f(st['voc_ap50'])}",
             " / ".join(_f(st[f"stability_{k}"]) for k in ("fragment", "center", "scale_ratio")),
             f"{_f(st['stability_total'])} / {_f(st['stability_total_fixed'])} (score >= {st['stability_threshold']:g})",
             f"{100 * st['found_fixed']:.0f}%"]
    return [("stability", row, cell) for row, cell in zip(rows, cells)]


def build_table(columns: dict[str, dict[str, Any]]) -> list[dict[str, str]]:
    """One dict per row: ``section``, ``row`` and one value per model name."""
    per_model = {name: _cell_rows(m) for name, m in columns.items()}
    first = next(iter(per_model.values()))
    return [
        {"section": section, "row": row, **{name: cells[i][2] for name, cells in per_model.items()}}
        for i, (section, row, _) in enumerate(first)
    ]


def table_markdown(table: Sequence[dict[str, str]], names: Sequence[str], notes: Sequence[str] = ()) -> str:
    esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    lines = ["| section | row | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    lines += ["| " + " | ".join(esc(r[k]) for k in ("section", "row", *names)) + " |" for r in table]
    return "\n".join(lines + [""] + [f"Note: {n}" for n in notes]) + "\n"


# ----------------------------------------------------------------------------- figures
def draw_side_by_side(models: dict[str, Any], out_png: Path, num_images: int) -> Path:
    """The same validation images (rows) with each model's detections (columns); ground truth in green."""
    import cv2
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from onestage.data.check import draw_boxes

    names = list(models)
    _, val_ds, _ = models[names[0]]
    n = min(num_images, len(val_ds))
    fig = Figure(figsize=(3.6 * len(names), 3.6 * n), dpi=100)
    FigureCanvasAgg(fig)
    for i in range(n):
        rec = val_ds.records[i]
        image = val_ds.image_loader(rec)
        for j, name in enumerate(names):
            loaded, _, dets = models[name]
            d = dets[i]
            keep = d["scores"] >= loaded.cfg.eval.display_threshold
            drawn = image.copy()
            for x1, y1, x2, y2 in rec.boxes.astype(int):
                cv2.rectangle(drawn, (x1, y1), (x2, y2), (0, 200, 0), 1)
            drawn = draw_boxes(drawn, d["boxes"][keep], d["labels"][keep], loaded.class_names, d["scores"][keep])
            ax = fig.add_subplot(n, len(names), i * len(names) + j + 1)
            ax.imshow(drawn)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(f"{name}\n(score >= {loaded.cfg.eval.display_threshold:g}; green: ground truth)", fontsize=8)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png)
    return out_png


def write_html_report(out_dir: Path, table: list[dict[str, str]], figures: list[Path]) -> Path:
    """``report.html``: the table and figures rendered by the HTML report module."""
    from onestage.report import write_compare_report

    return write_compare_report(out_dir, table, figures)


# ----------------------------------------------------------------------------- the command
def compare(
    configs: Sequence[Path], out_dir: Path, budget: float | None = None, runs: Sequence[Path] | None = None,
    assign_images: str = "200", draw: int = 4, max_steps: int | None = None, progress: bool = True,
    latency_repeats: int = 5, video: Path | None = None,
) -> Path:
    """Train (or take ``runs``), measure, write the table and figures; returns ``compare.md``.
    ``video``: a ``format: mot`` folder of held-out videos for the stability rows (read first, so
    that a bad folder fails before any training)."""
    from onestage.data.mot import read_mot
    from onestage.explore import plot_histograms

    if video is not None:
        read_mot(Path(video))
    out_dir.mkdir(parents=True, exist_ok=True)
    if runs:
        if configs and len(configs) != len(runs):
            raise ConfigError(f"compare: {len(configs)} configs but {len(runs)} --runs; give one run per config, or only --runs")
        run_dirs, names = list(runs), unique_names(runs)
        notes = check_equal_terms([load_config(Path(r) / "config.yaml") for r in run_dirs], names)
    else:
        if len(configs) < 2:
            raise ConfigError("compare: give at least two configs")
        run_dirs, notes = train_all(configs, out_dir / "runs", budget, max_steps, progress)
        names = unique_names(configs)
    columns, models = {}, {}
    for name, run_dir in zip(names, run_dirs):
        print(f"[compare] measuring {name} ({run_dir})", file=sys.stderr)
        columns[name], models[name] = measure_run(Path(run_dir), assign_images, progress, latency_repeats, video)
    table = build_table(columns)
    figures = [draw_side_by_side(models, out_dir / "detections.png", draw)]
    figures += [plot_histograms(c["assignment"]["summary"], f"{n} ({c['family']})", out_dir / f"assign_{n}.png")
                for n, c in columns.items()]
    md = out_dir / "compare.md"
    md.write_text(table_markdown(table, names, notes))
    (out_dir / "compare.json").write_text(json.dumps({"models": names, "notes": notes, "table": table,
                                                      "measurements": columns}, indent=1, default=_json_default))
    print(f"[compare] {write_html_report(out_dir, table, figures)}", file=sys.stderr)
    return md


def _json_default(x: Any) -> Any:
    if isinstance(x, (np.integer, np.floating)):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"compare.json: cannot write {type(x).__name__}")
