"""``onestage assign`` and ``onestage compare``: their sub-parsers and commands (``cli.py``
only wires them in, so the two stay out of the main command module)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from onestage.config import ConfigError, load_config


def add_assign_parser(sub) -> None:
    s = sub.add_parser(
        "assign", help="show which candidates each object is assigned to (PNG per image, per-object table, summary)",
        description="onestage assign CONFIG [IMAGES...] [--split train|val] [--num N|all] [--checkpoint CKPT] --out DIR",
    )
    s.add_argument("config")
    s.add_argument("images", nargs="*", type=Path, help="image files of the split (default: its first --num images)")
    s.add_argument("--split", choices=["train", "val"], default="train")
    s.add_argument("--num", default="8", help="images to assign: a number or 'all' (default 8)")
    s.add_argument("--checkpoint", type=Path, help="a trained model: SSD hard negatives, YOLOv3 ignore by prediction, "
                                                   "YOLOv1 responsible predictor under its predictions")
    s.add_argument("--draw", type=int, default=16, help="PNGs and tables for the first N images (default 16; "
                                                        "every image is counted)")
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--json", action="store_true", help="print the summary as JSON")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(overrides=[])


def add_compare_parser(sub) -> None:
    c = sub.add_parser(
        "compare", help="train (or take) several detectors on the same data and measure them side by side",
        description="onestage compare CONFIG_A CONFIG_B [...] --out DIR [--budget MINUTES] [--runs RUN_A RUN_B ...] [--video DIR]",
    )
    c.add_argument("configs", nargs="*", help="experiment YAMLs (same data and input size)")
    c.add_argument("--out", type=Path, required=True)
    c.add_argument("--budget", type=float, help="training minutes per model (default: each config's train.time_budget)")
    c.add_argument("--runs", type=Path, nargs="+", help="finished run folders to measure instead of training")
    c.add_argument("--assign-images", default="200", help="training images the assignment rows count ('all' or N; default 200)")
    c.add_argument("--draw", type=int, default=4, help="validation images drawn side by side (default 4)")
    c.add_argument("--video", type=Path, metavar="DIR",
                   help="held-out videos with tracks (a format: mot folder, e.g. from `onestage data make-video`) "
                        "for the stability rows; without it they are measured only when the val split is video")
    c.add_argument("--latency-repeats", type=int, default=5, help="timed passes per latency (median; default 5)")
    c.add_argument("--max-steps", type=int, help=argparse.SUPPRESS)  # smoke tests
    c.add_argument("--no-progress", action="store_true")
    c.set_defaults(overrides=[])


def run_explore_command(args: argparse.Namespace) -> int:
    if args.command == "assign":
        return cmd_assign(args)
    return cmd_compare(args)


def cmd_assign(args: argparse.Namespace) -> int:
    from onestage.explore import explore_split, format_summary, load_source, select_indices, write_result

    cfg = load_config(args.config, args.overrides)
    source = load_source(cfg, args.split, args.checkpoint)
    indices = select_indices(source, args.images, args.num)
    result = explore_split(source, indices, args.out, draw=args.draw if not args.images else len(indices),
                           progress=not args.no_progress, verbose=not args.json)
    path, png = write_result(result, args.out)
    if args.json:
        print(json.dumps(result["summary"], indent=2))
    else:
        print(f"\n== {result['family']}: {result['candidates']} candidates; {args.split} split\n{format_summary(result['summary'])}")
    print(f"[assign] {path}, {png} and one PNG per drawn image in {args.out}", file=sys.stderr)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from onestage.compare import compare

    if not args.configs and not args.runs:
        raise ConfigError("compare: give two or more CONFIGs to train, or --runs RUN_A RUN_B to measure")
    table_md = compare(
        [Path(c) for c in args.configs], args.out, budget=args.budget, runs=args.runs,
        assign_images=args.assign_images, draw=args.draw, max_steps=args.max_steps, progress=not args.no_progress,
        latency_repeats=args.latency_repeats, video=args.video,
    )
    print(table_md.read_text())
    print(f"[compare] table, JSON and figures in {args.out}", file=sys.stderr)
    return 0
