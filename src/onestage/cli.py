"""``onestage`` command line: train | eval | predict | inspect | anchors | doctor | data check."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from onestage.config import Config, ConfigError, load_config

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="onestage", description="One-stage object detectors: SSD and YOLO, one pipeline.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a detector from a YAML experiment file")
    t.add_argument("config", nargs="?", help="experiment YAML (not needed with --resume)")
    t.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.epochs=5")
    t.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue the run in RUN_DIR from its last.pt")
    t.add_argument("--overwrite", action="store_true",
                   help="replace the run already in out_dir/train.name (its files are deleted) instead of refusing")
    t.add_argument("--plot-lr", action="store_true", help="write the LR schedule plot and exit")
    t.add_argument("--max-steps", type=int, help="stop after this many optimizer steps (smoke tests)")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")

    e = sub.add_parser(
        "eval", help="evaluate a checkpoint (or a COCO results file) on the config's validation split",
        description="onestage eval CONFIG CHECKPOINT [key=value ...]  |  onestage eval CHECKPOINT [key=value ...] (the "
                    "run's own config, kept in the checkpoint)  |  onestage eval --results FILE.json --dataset CONFIG",
    )
    e.add_argument("config", nargs="?", help="experiment YAML (its data.val split is the ground truth); "
                                             "or the CHECKPOINT alone, to use the config it was trained with")
    e.add_argument("checkpoint", nargs="?", type=Path)
    e.add_argument("overrides", nargs="*")
    e.add_argument("--dataset", metavar="CONFIG", help="the config, when scoring --results without a checkpoint")
    e.add_argument("--results", type=Path, metavar="FILE.json", help="score this COCO results file instead of a model")
    e.add_argument("--save-results", type=Path, metavar="FILE.json", help="write the detections in COCO results format")
    e.add_argument("--json", action="store_true", help="print the metrics as JSON")
    e.add_argument("--out", type=Path, help="folder for PR curves, the confusion summary and the worst images")

    pr = sub.add_parser(
        "predict", help="draw a checkpoint's detections on images",
        description="onestage predict CHECKPOINT INPUTS... --out DIR: the architecture, classes and input "
                    "transform come from the checkpoint; --config (or key=value overrides) may change inference settings",
    )
    pr.add_argument("checkpoint", type=Path)
    pr.add_argument("inputs", nargs="+", type=Path, help="images, folders of images, or video files (.mp4 ...)")
    pr.add_argument("--out", type=Path, required=True)
    pr.add_argument("--config", type=Path, help="a YAML whose eval/precision settings override the checkpoint's")
    pr.add_argument("--threshold", type=float, help="display score threshold (default: eval.display_threshold)")
    pr.add_argument("--batch-size", type=int, default=16, help="images per forward pass (default 16)")
    pr.add_argument("overrides", nargs="*", default=[], help=argparse.SUPPRESS)

    x = sub.add_parser("export", help="export a checkpoint to ONNX, checked against PyTorch with onnxruntime")
    x.add_argument("checkpoint", type=Path)
    x.add_argument("--out", type=Path, required=True, help="the .onnx file to write")
    x.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17; --nms needs >= 11)")
    x.add_argument("--dynamic-batch", action="store_true", help="any batch size (default: batch 1)")
    x.add_argument("--nms", action="store_true", help="end the graph with NMS: padded detections and a count")
    x.add_argument("--max-detections", type=int, metavar="K", help="per-image cap and padded size (default: eval's)")
    x.add_argument("--half", action="store_true", help="float16 network (checked at a looser tolerance)")
    x.add_argument("overrides", nargs="*", default=[], help="inference settings, e.g. eval.score_threshold=0.05")

    i = sub.add_parser("inspect", help="print the model's output layout")
    i.add_argument("config")
    i.add_argument("overrides", nargs="*")
    i.add_argument("--json", action="store_true")
    i.add_argument("--priors", type=Path, metavar="FILE.npy", help="save the priors (P, 4) cxcywh normalized")
    i.add_argument("--num-classes", type=int, help="classes to lay out (default: the dataset's)")
    i.add_argument("--compare", metavar="CONFIG_B", help="a second config, printed side by side")

    a = sub.add_parser("anchors", help="k-means YOLO anchors for a dataset (1 - IoU distance)")
    a.add_argument("config", help="experiment YAML whose data.train split is clustered")
    a.add_argument("overrides", nargs="*")
    a.add_argument("--num", type=int, default=9, help="number of anchors (default 9)")
    a.add_argument("--size", type=int, help="network input size (default: model.input_size)")
    a.add_argument("--threshold", type=float, default=0.5, help="assignment IoU threshold for the coverage share")

    _add_explore_parsers(sub)

    dr = sub.add_parser("doctor", help="this machine's torch, CPU/GPU and bf16 support; with a config, step times per precision")
    dr.add_argument("config", nargs="?", help="experiment YAML: time its model at its batch and input size")
    dr.add_argument("overrides", nargs="*")
    dr.add_argument("--json", action="store_true")
    dr.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available, else cpu)")
    dr.add_argument("--time-limit", type=float, default=6.0, metavar="S", help="seconds per calibration (default 6)")
    dr.add_argument("--no-cache", action="store_true", help="do not write the calibration cache")

    d = sub.add_parser("data", help="dataset tools")
    dsub = d.add_subparsers(dest="data_command", required=True)
    c = dsub.add_parser("check", help="read a dataset once and report what is in it and what is wrong")
    c.add_argument("config")
    c.add_argument("overrides", nargs="*")
    c.add_argument("--split", choices=["train", "val"], default="train")
    c.add_argument("--out", type=Path, default=Path("data_check"), help="folder for the sample grid")
    c.add_argument("--augment", type=int, default=0, metavar="N", help="also draw N augmented samples")
    mv = dsub.add_parser("make-video", help="generate moving-shapes videos with MOTChallenge gt.txt tracks")
    mv.add_argument("--out", type=Path, required=True, help="folder for the videos (data.*.format: mot root)")
    mv.add_argument("--videos", type=int, default=4, help="number of videos (default 4)")
    mv.add_argument("--frames", type=int, default=60, help="frames per video (default 60)")
    mv.add_argument("--seed", type=int, default=0, help="video v is drawn from seed (SEED, v)")
    mv.add_argument("--size", type=int, nargs=2, default=(320, 240), metavar=("W", "H"), help="frame size (320 240)")
    mv.add_argument("--fps", type=float, default=15.0, help="frame rate (default 15)")
    return p


def _add_explore_parsers(sub) -> None:
    from onestage.explore_cli import add_assign_parser, add_compare_parser

    add_assign_parser(sub)
    add_compare_parser(sub)


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """(other words, key=value overrides): a word with "=" that is not an option, an option's
    value (``--out a=b``) or an existing path is an override."""
    words: list[str] = []
    overrides: list[str] = []
    for word in argv:
        takes_value = bool(words) and words[-1].startswith("--") and "=" not in words[-1] and words[-1] not in _FLAGS
        if "=" in word and not word.startswith("-") and not takes_value and not Path(word).exists():
            overrides.append(word)
        else:
            words.append(word)
    return words, overrides


# Options that take no value (the word after them is never theirs).
_FLAGS = {"--json", "--no-progress", "--plot-lr", "--help", "--dynamic-batch", "--nms", "--half"}


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    # key=value overrides may stand anywhere (`inspect CFG --json a.b=1`): taken out before parsing.
    words, overrides = split_overrides(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(words)
    if overrides:
        if not hasattr(args, "overrides"):
            parser.error(f"{args.command} takes no key=value overrides: {' '.join(overrides)}")
        args.overrides = list(args.overrides or []) + overrides
    try:
        if args.command == "train":
            return cmd_train(args)
        if args.command == "eval":
            return cmd_eval(args)
        if args.command == "predict":
            return cmd_predict(args)
        if args.command == "export":
            return cmd_export(args)
        if args.command == "inspect":
            return cmd_inspect(args)
        if args.command == "anchors":
            return cmd_anchors(args)
        if args.command in ("assign", "compare"):
            from onestage.explore_cli import run_explore_command

            return run_explore_command(args)
        if args.command == "doctor":
            return cmd_doctor(args)
        if args.command == "data" and args.data_command == "check":
            return cmd_data_check(args)
        if args.command == "data" and args.data_command == "make-video":
            return cmd_data_make_video(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except _file_errors() as exc:  # each names its file and the problem
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 1


def _file_errors() -> tuple[type[Exception], ...]:
    """Errors printed without a traceback. Evaluated only when an exception is raised, and the
    training stack's errors only when torch is loaded: `predict model.onnx` never imports it."""
    from onestage.data.problems import DataError
    from onestage.export import ExportError

    errors: tuple[type[Exception], ...] = (DataError, ExportError)
    if "torch" in sys.modules:
        from onestage.engine.checkpoint import CheckpointError
        from onestage.models.backbones.base import BackboneWeightsError

        errors += (CheckpointError, BackboneWeightsError)
    return errors


# ----------------------------------------------------------------------------- train
def cmd_train(args: argparse.Namespace) -> int:
    from onestage.engine import distributed as dist
    from onestage.engine.trainer import TrainingError, load_run_config, make_run_dir, train

    if args.resume is not None:
        cfg = load_run_config(args.resume)
    else:
        if args.config is None:
            raise ConfigError("train: give a CONFIG file or --resume RUN_DIR")
        cfg = load_config(args.config, args.overrides)
    if args.plot_lr:
        # The preview only adds lr.png: an existing named run folder is used as it is, never replaced.
        named = Path(cfg.train.out_dir) / cfg.train.name if cfg.train.name else None
        return _plot_lr(cfg, args.resume or (named if named and named.is_dir() else make_run_dir(cfg, args.config)))
    try:
        # Under torchrun: join the other processes (nothing happens in a single process).
        dist.init_distributed(cfg.dist)
        main = dist.is_main()
        with dist.collective_failures_as(dist.DistributedError):
            # Rank 0 names (and creates) the run folder; a name with the time in it could differ per rank.
            run_dir = args.resume or dist.broadcast_object(make_run_dir(cfg, args.config, args.overwrite) if main else None)
        if main:
            print(f"[run] {run_dir}", file=sys.stderr)
        summary = train(cfg, run_dir, resume=args.resume is not None, progress=not args.no_progress, max_steps=args.max_steps)
    except (TrainingError, dist.DistributedError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        if dist.is_distributed():
            # A process group with a dead or stalled peer cannot be torn down cleanly: gloo/NCCL
            # threads may still wait on the peer, and the C++ runtime then aborts the process at
            # exit (SIGABRT) or hangs in destroy_process_group. Leave at once with the error's code.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(3)
        return 3
    finally:
        dist.cleanup()
    if summary["stop_reason"] == "terminated":
        return 130
    if main:  # plots, the final evaluation and drawings: rank 0 alone, after the others are done
        _finish_run(cfg, run_dir, summary)
    return 0


def _plot_lr(cfg: Config, run_dir: Path) -> int:
    from onestage.build import build_datasets
    from onestage.engine.schedule import lr_curve, plot_lr

    train_ds, *_ = build_datasets(cfg)
    steps = cfg.train.epochs * max(1, (len(train_ds) // cfg.train.batch_size) // cfg.train.accumulate)
    out = plot_lr(lr_curve(cfg.schedule, cfg.optim.lr, steps), run_dir / "lr.png")
    if cfg.train.time_budget:
        # The real length is known only once the first steps measure the pace.
        print(f"train.time_budget is {cfg.train.time_budget:g} min: training stretches this shape over the "
              f"steps the budget allows at the measured pace; the preview assumes {steps} steps "
              f"(train.epochs={cfg.train.epochs}); metrics.csv logs the learning rate actually used")
    print(out)
    return 0


def _finish_run(cfg: Config, run_dir: Path, summary: dict) -> None:
    """After training: plots, final evaluation of the best checkpoint with its table, drawings."""
    from onestage.engine.plots import plot_training_curves
    from onestage.engine.trainer import load_run_config

    plot_training_curves(run_dir / "metrics.csv", run_dir / "plots")
    best = run_dir / "best.pt" if (run_dir / "best.pt").exists() else run_dir / "last.pt"
    # The run's resolved config: the precision training measured, not measured again (time budget).
    detector, cfg, val_ds, _, device = _load_for_eval(load_run_config(run_dir), best, measure_precision=False)
    result, dets = _evaluate_and_report(cfg, detector, val_ds, device, run_dir / "eval", progress=True)
    (run_dir / "eval" / "metrics.json").write_text(json.dumps({"checkpoint": str(best), **result.metrics, **summary}, indent=2))
    _draw_dataset_predictions(cfg, detector, val_ds, dets, run_dir / "predictions")
    print(f"[done] {summary['steps']} steps in {summary['seconds'] / 60:.1f} min; "
          f"{cfg.train.best_metric} = {result.metrics.get(cfg.train.best_metric, float('nan')):.4f}; "
          f"run folder: {run_dir}", file=sys.stderr)
    from onestage.report import write_run_report  # one self-contained page over the whole run

    print(f"[report] {write_run_report(run_dir)}", file=sys.stderr)


# ----------------------------------------------------------------------------- eval
def _load_for_eval(cfg: Config | None, checkpoint: Path, measure_precision: bool = True, overrides: Sequence[str] = ()):
    """(detector, the inference config, val dataset, its spec, device) for evaluating ``checkpoint``.

    The architecture and the input transform are the checkpoint's (``onestage.api``); CONFIG
    (default: the checkpoint's own, with ``overrides``) chooses the data and the inference
    settings. Only the val split is read.
    """
    from onestage.api import load_detector
    from onestage.build import build_eval_dataset, read_dataset

    batch = cfg.train.batch_size if cfg is not None else 16
    loaded = load_detector(checkpoint, config=cfg, overrides=overrides, batch_size=batch, measure_precision=measure_precision)
    val_spec = read_dataset(loaded.cfg.data.val, loaded.cfg, class_names=loaded.class_names)
    val_ds = build_eval_dataset(loaded.cfg, val_spec, loaded.class_names)
    return loaded.detector, loaded.cfg, val_ds, val_spec, loaded.device


def _evaluate_and_report(cfg, detector, val_ds, device, out_dir: Path | None, progress: bool, quiet: bool = False):
    from onestage.engine.evaluate import evaluate
    from onestage.eval.evaluator import format_table

    from onestage.eval.plots import ERROR_KINDS, confusion_summary, draw_worst_images, plot_pr_curves
    from onestage.eval.tide import add_tide

    result, dets = evaluate(detector, val_ds, cfg, device, progress=progress, keep_detections=True)
    confusion = confusion_summary(val_ds.records, dets, val_ds.class_names, iou=cfg.eval.iou_threshold,
                                  score_threshold=cfg.eval.display_threshold)
    if not quiet:
        print(format_table(result))
        print(f"at score >= {cfg.eval.display_threshold}: {confusion['true_positives']} true positives, "
              f"{confusion['missed']} missed, {confusion['false_positives']} false positives ("
              + ", ".join(f"{k.replace('_', ' ')} {confusion[k]}" for k in ERROR_KINDS)
              + ")")
    add_tide(result, val_ds.records, dets, val_ds.class_names, out_dir, quiet)  # TIDE table, --json, out_dir/result.json
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        plot_pr_curves(result, out_dir / "pr_curves.png")
        (out_dir / "confusion.json").write_text(json.dumps(confusion, indent=2))
        draw_worst_images(val_ds.records, dets, val_ds.class_names, out_dir / "worst", cfg.eval.num_images_drawn,
                          val_ds.image_loader, score_threshold=cfg.eval.display_threshold)
        if result.stability is not None:  # video data: a timeline per worst track
            from onestage.eval.stability_report import draw_worst_tracks

            draw_worst_tracks(result.stability, out_dir / "worst_tracks", cfg.eval.num_images_drawn)
    return result, dets


def cmd_eval(args: argparse.Namespace) -> int:
    from onestage.eval.evaluator import result_to_json

    config = args.dataset or args.config
    if config is None:
        raise ConfigError("eval: give CONFIG (or --dataset CONFIG with --results)")
    checkpoint_overrides: list[str] = []  # applied to the checkpoint's own config, when no CONFIG is given
    if args.dataset is None and args.results is None and Path(config).suffix in (".pt", ".pth", ".ckpt"):
        # `eval CHECKPOINT [key=value ...]`: argparse took the checkpoint as CONFIG and the first override as CHECKPOINT
        checkpoint_overrides = [str(args.checkpoint)] * (args.checkpoint is not None) + list(args.overrides)
        args.checkpoint, cfg = Path(config), None
    else:
        cfg = load_config(config, args.overrides)
    if args.results is not None:
        return _score_results(cfg, args.results, args.json)
    if args.checkpoint is None:
        raise ConfigError("eval: give a CHECKPOINT to evaluate, or --results FILE.json to score")
    detector, cfg, val_ds, val_spec, device = _load_for_eval(cfg, args.checkpoint, overrides=checkpoint_overrides)
    result, dets = _evaluate_and_report(cfg, detector, val_ds, device, args.out, progress=not args.json, quiet=args.json)
    if args.out is not None:
        from onestage.config import dump_config
        from onestage.report import write_eval_report

        write_eval_report(args.out, config_text=dump_config(cfg), checkpoint=args.checkpoint)
    if args.save_results is not None:
        from onestage.eval.coco import coco_image_id_map
        from onestage.eval.results import save_coco_results

        records = val_ds.records
        id_map = coco_image_id_map([r.image_id for r in records])
        n = save_coco_results(args.save_results, [id_map[r.image_id] for r in records], dets,
                              _category_ids(val_spec, len(val_ds.class_names)))
        print(f"[eval] {n} detections written to {args.save_results}", file=sys.stderr)
    if args.json:
        print(json.dumps(result_to_json(result), indent=2))
    return 0


def _category_ids(spec, num_classes: int) -> list[int]:
    """Original COCO category ids for a COCO dataset (its reader keeps them), else 1..C."""
    ids = getattr(spec, "category_ids", None)
    return list(ids) if ids is not None else list(range(1, num_classes + 1))


def _score_results(cfg: Config, results: Path, as_json: bool) -> int:
    """Score a COCO results file from any detector against the config's val split."""
    from onestage.build import read_dataset
    from onestage.eval.coco import records_to_coco_gt
    from onestage.eval.results import load_coco_results, score_results_file
    from onestage.eval.tide import format_tide, tide_of_results, tide_to_json

    spec = read_dataset(cfg.data.val, cfg)
    gt = records_to_coco_gt(spec.records, spec.class_names, getattr(spec, "category_ids", None))
    metrics = score_results_file(results, gt)
    tide = tide_of_results(spec.records, gt, load_coco_results(results, gt), spec.class_names)
    if as_json:
        print(json.dumps({**metrics, "tide": tide_to_json(tide)}, indent=2))
    else:
        for key, value in metrics.items():
            print(f"{key:<18}{value:8.4f}")
        print(format_tide(tide))
    return 0


# ----------------------------------------------------------------------------- predict
def _draw_dataset_predictions(cfg: Config, detector, dataset, dets, out_dir: Path) -> None:
    import cv2

    from onestage.data.check import draw_boxes

    out_dir.mkdir(parents=True, exist_ok=True)
    for i in range(min(cfg.eval.num_images_drawn, len(dataset))):
        rec = dataset.records[i]
        image = dataset.image_loader(rec)
        d = dets[i]
        keep = d["scores"] >= cfg.eval.display_threshold
        drawn = draw_boxes(image, d["boxes"][keep], d["labels"][keep], detector.class_names, d["scores"][keep])
        cv2.imwrite(str(out_dir / f"{rec.image_id}.png"), cv2.cvtColor(drawn, cv2.COLOR_RGB2BGR))


def _collect_images(inputs: list[Path]) -> list[Path]:
    from onestage.data.problems import DataError

    files: list[Path] = []
    for path in inputs:
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"{path}: no such image or folder")
    if not files:
        raise DataError(f"no images found in {', '.join(map(str, inputs))}")
    return files


def cmd_predict(args: argparse.Namespace) -> int:
    import cv2

    from tqdm import tqdm

    from onestage.data.check import draw_boxes
    from onestage.data.io import load_image
    from onestage.prediction import save_predictions

    if args.checkpoint.suffix == ".onnx":  # onnxruntime alone: torch and the training code are never imported
        from onestage.export.runtime import load_onnx_detector

        det = load_onnx_detector(args.checkpoint, config=args.config, overrides=args.overrides)
    elif args.checkpoint.suffix in (".yaml", ".yml"):  # the form before 0.2: predict CONFIG CHECKPOINT INPUTS
        print(f"note: `predict CONFIG CHECKPOINT` is now `predict CHECKPOINT ... --config CONFIG`; "
              f"reading {args.checkpoint} as --config", file=sys.stderr)
        args.config, args.checkpoint, args.inputs = args.checkpoint, args.inputs[0], args.inputs[1:]
        if not args.inputs:
            raise ConfigError("predict: give images or folders after the checkpoint")
    if args.checkpoint.suffix != ".onnx":
        from onestage.api import load_detector

        det = load_detector(args.checkpoint, config=args.config, overrides=args.overrides, batch_size=args.batch_size)
    args.out.mkdir(parents=True, exist_ok=True)
    args.inputs = _predict_videos(det, args)
    if not args.inputs:
        return 0
    files = _collect_images(args.inputs)
    predictions = []
    for start in tqdm(range(0, len(files), args.batch_size), desc="predict", unit="batch", dynamic_ncols=True):
        chunk = files[start : start + args.batch_size]
        images = [load_image(path) for path in chunk]  # decoded once: predicted on, then drawn
        for path, image, p in zip(chunk, images, det.predict(images, threshold=args.threshold)):
            drawn = draw_boxes(image, p.boxes, p.labels, det.class_names, p.scores)
            cv2.imwrite(str(args.out / f"{path.stem}.png"), cv2.cvtColor(drawn, cv2.COLOR_RGB2BGR))
            tqdm.write(f"{path}: {len(p)} detections")
            predictions.append(p)
    save_predictions(predictions, [str(f) for f in files], args.out / "detections.json")
    print(f"[predict] drawn images and detections.json in {args.out}")
    return 0


def _predict_videos(det, args: argparse.Namespace) -> list[Path]:
    """Video files among the inputs: each to an annotated video + per-frame JSON in --out.
    Returns the other inputs."""
    from onestage.video import is_video_file, predict_video

    videos = [p for p in args.inputs if p.is_file() and is_video_file(p)]
    threshold = det.display_threshold if args.threshold is None else args.threshold
    for path in videos:
        summary = predict_video(lambda frames: det.predict(frames, threshold=threshold, batch_size=len(frames)),
                                det.class_names, path, args.out, batch_size=args.batch_size, threshold=threshold)
        print(f"{path}: {summary['frames']} frames at {summary['frames_per_second']:.1f} frames/s -> "
              f"{summary['video']}, {summary['json']}")
    return [p for p in args.inputs if p not in videos]


# ----------------------------------------------------------------------------- export
def cmd_export(args: argparse.Namespace) -> int:
    from onestage.export.onnx import export_onnx

    report = export_onnx(args.checkpoint, args.out, opset=args.opset, dynamic_batch=args.dynamic_batch, nms=args.nms,
                         max_detections=args.max_detections, half=args.half, overrides=args.overrides)
    print(report.summary())
    return 0


# ----------------------------------------------------------------------------- inspect
def _describe(config: str, overrides: list[str], num_classes: int | None, priors: Path | None = None) -> dict:
    from onestage.build import build_detector, read_dataset
    from onestage.inspect import describe

    cfg = load_config(config, overrides)
    if num_classes is not None:
        class_names = [f"class{i}" for i in range(num_classes)]
    elif cfg.data.class_names:
        class_names = list(cfg.data.class_names)
    else:
        class_names = read_dataset(cfg.data.train, cfg).class_names
    detector = build_detector(cfg, class_names)
    info = describe(cfg, detector)
    if priors is not None:
        if detector.priors is None:
            raise ConfigError(f"--priors: {cfg.model.arch} has anchors per grid cell, not a list of priors")
        np.save(priors, detector.priors.numpy())
        info["priors_file"] = str(priors)
    return info


def cmd_inspect(args: argparse.Namespace) -> int:
    from onestage.inspect import format_comparison, format_layout

    info = _describe(args.config, args.overrides, args.num_classes, args.priors)
    if args.compare is None:
        if args.json:
            print(json.dumps(info, indent=2))
            return 0
        print(format_layout(info))
        if "priors_file" in info:
            print(f"priors saved to {info['priors_file']} ({info['total_candidates']}, 4) cxcywh normalized")
        return 0
    # `inspect --compare CONFIG_A CONFIG_B`: argparse gives A to --compare and B as CONFIG.
    first = _describe(args.compare, [], args.num_classes)
    if args.json:
        print(json.dumps({"a": first, "b": info}, indent=2))
        return 0
    print(format_layout(first), format_layout(info), format_comparison(first, info), sep="\n\n")
    return 0


# ----------------------------------------------------------------------------- doctor
def cmd_doctor(args: argparse.Namespace) -> int:
    import torch

    from onestage.doctor import config_report, format_report, machine_report

    machine = machine_report()
    report = None
    if args.config is not None:
        cfg = load_config(args.config, args.overrides)
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        report = config_report(cfg, device, time_limit=args.time_limit, cache=not args.no_cache)
        report["config"] = args.config
    elif args.overrides:
        raise ConfigError("doctor: key=value overrides need a CONFIG")
    if args.json:
        print(json.dumps({"machine": machine, "config": report}, indent=2))
    else:
        print(format_report(machine, report))
    return 0


# ----------------------------------------------------------------------------- anchors
def cmd_anchors(args: argparse.Namespace) -> int:
    from onestage.anchors import anchor_fit, kmeans_anchors, letterbox_wh, split_by_scale
    from onestage.build import read_dataset

    cfg = load_config(args.config, args.overrides)
    size = args.size or cfg.model.input_size
    spec = read_dataset(cfg.data.train, cfg)
    wh = np.concatenate([r.boxes[:, 2:] - r.boxes[:, :2] for r in spec.records if len(r.boxes)])
    sizes = np.concatenate([np.tile([[r.width, r.height]], (len(r.boxes), 1)) for r in spec.records if len(r.boxes)])
    wh = letterbox_wh(wh, sizes, size)  # box shapes as the network sees them after the letterbox
    anchors = kmeans_anchors(wh, k=args.num, seed=cfg.seed)
    default = np.array([a for group in cfg.model.anchors.sizes for a in group], dtype=np.float64) * size / cfg.model.input_size
    print(f"{len(wh)} boxes of {len(spec.records)} images, letterboxed to {size}x{size}")
    print(f"{'anchors':<10}{'mean best IoU':>15}{f'share > {args.threshold}':>14}")
    for name, a in (("k-means", anchors), ("config", default)):
        mean_iou, share = anchor_fit(wh, a, args.threshold)
        print(f"{name:<10}{mean_iou:>15.4f}{share:>14.3f}")
    print("k-means anchors (w, h) in input pixels, smallest first:")
    print("  " + "  ".join(f"({w:.0f},{h:.0f})" for w, h in anchors))
    if args.num % 3 == 0:
        groups = split_by_scale(anchors, [args.num // 3] * 3)
        print("for the config (model.anchors.sizes, coarsest scale first):")
        print("  " + json.dumps([[[round(w), round(h)] for w, h in g] for g in groups]))
    return 0


# ----------------------------------------------------------------------------- data check
def cmd_data_check(args: argparse.Namespace) -> int:
    from onestage.build import read_dataset
    from onestage.data.check import check_dataset

    cfg = load_config(args.config, args.overrides + ["data.on_error=skip"])
    ds_cfg = cfg.data.train if args.split == "train" else cfg.data.val
    spec = read_dataset(ds_cfg, cfg)
    args.out.mkdir(parents=True, exist_ok=True)
    report, status = check_dataset(spec, args.out / "samples.png")
    print(report)
    if args.augment:
        from onestage.build import build_transform
        from onestage.data.check import draw_augmented

        path = draw_augmented(spec, build_transform(cfg, train=True), args.augment, args.out / "augmented.png",
                              cfg.data.mean, cfg.data.std)
        print(f"augmented samples: {path}")
    print(f"sample grid: {args.out / 'samples.png'}")
    return status


def cmd_data_make_video(args: argparse.Namespace) -> int:
    from onestage.data.moving_shapes import write_moving_shapes

    folders = write_moving_shapes(args.out, args.videos, args.frames, args.seed, width=args.size[0],
                                  height=args.size[1], fps=args.fps, progress=True)
    print(f"[make-video] {len(folders)} videos of {args.frames} frames in {args.out} "
          f"(evaluate with data.val: {{format: mot, root: {args.out}}})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
