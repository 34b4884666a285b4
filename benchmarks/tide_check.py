"""onestage's TIDE (src/onestage/eval/tide.py) against ``tidecv``, the paper's own code, on the
same detections; records tidecv's numbers in ``tests/data/tide_reference.json``, which
``tests/test_tide.py`` compares with.

tidecv pulls pandas, seaborn and opencv and is not a dependency of onestage: install it in
a venv of its own and name its python here.

    python3 -m venv /tmp/tidevenv && /tmp/tidevenv/bin/pip install tidecv
    PYTHONPATH=src .venv/bin/python benchmarks/tide_check.py --tide-python /tmp/tidevenv/bin/python [--write]
    # a real detector's detections instead of the recorded cases:
    .venv/bin/onestage eval configs/yolov1_shapes.yaml RUN/best.pt data.val.num_images=40 --save-results dets.json
    PYTHONPATH=src .venv/bin/python benchmarks/tide_check.py --tide-python /tmp/tidevenv/bin/python \
        --results dets.json --dataset configs/yolov1_shapes.yaml data.val.num_images=40

The data are synthetic, with a fixed seed, built to hold every error kind: per object a
detection that is right, badly placed (Loc), of another class (Cls), both (Both), a second
one (Dupe) or none (Miss); detections on background (Bkg); crowd regions with detections
inside; an image without detections and one without objects. Two synthetic cases: distinct scores,
and scores rounded to one decimal (ties, which tidecv breaks by list order). Each is written
as COCO JSON (ground truth and results), scored by both, and the numbers are printed side
by side; the script exits 1 when any differs by more than 1e-6. A third case takes coco128's
real ground truth (80 classes, crowd objects; ``../shared/datasets``) with detections made
the same way.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from onestage.data.base import ImageRecord
from onestage.eval.tide import MAIN_ERRORS, SPECIAL_ERRORS, tide_analysis, tide_to_json

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "data" / "tide_reference.json"
CLASSES = ["circle", "square", "triangle"]
COCO128 = ROOT / ".." / "shared" / "datasets" / "coco128" / "annotations" / "instances_train2017.json"

# Runs inside tidecv's venv: reads the two COCO files, prints tidecv's numbers as JSON
# (dAP x 100 as tidecv reports them; per class from the same fix_errors calls).
TIDECV_SNIPPET = r"""
import json, sys
from tidecv import TIDE, datasets
from tidecv.errors.main_errors import FalseNegativeError, FalsePositiveError
gt = datasets.COCO(sys.argv[1]); preds = datasets.COCOResult(sys.argv[2])
tide = TIDE(); run = tide.evaluate(gt, preds, mode=TIDE.BOX)
main = {e.short_name: v for e, v in run.fix_main_errors().items()}
special = {e.short_name: v for e, v in run.fix_special_errors().items()}
counts = {e.short_name: v for e, v in run.count_errors().items()}
def per_class(ap_data):
    return {str(k): o.get_ap() for k, o in ap_data.objs.items()}
per = {"base": per_class(run.ap_data)}
for e in TIDE._error_types:
    per[e.short_name] = per_class(run.fix_errors(lambda x, e=e: isinstance(x, e)))
per["FalsePos"] = per_class(run.fix_errors(transform=FalsePositiveError.fix))
per["FalseNeg"] = per_class(run.fix_errors(false_neg_dict=run.false_negatives))
print(json.dumps({"ap": run.ap, "main": main, "special": special, "counts": counts, "per_class_ap": per}))
"""


def _box(rng: np.random.Generator, size: int) -> np.ndarray:
    w, h = rng.uniform(20, 120, 2)
    x, y = rng.uniform(0, size - w), rng.uniform(0, size - h)
    return np.array([x, y, x + w, y + h])


def _shifted(box: np.ndarray, frac: float) -> np.ndarray:
    """The box moved right by ``frac`` of its width (IoU (1 - f) / (1 + f))."""
    w = box[2] - box[0]
    return box + np.array([frac * w, 0, frac * w, 0])


def _image_dets(rng: np.random.Generator, boxes: np.ndarray, labels: np.ndarray, size: int,
                num_classes: int = len(CLASSES)) -> list[tuple]:
    """(box xyxy, label, score) of the detections of one image: one fate per object."""
    out = []
    other = lambda c: (c + rng.integers(1, num_classes)) % num_classes  # noqa: E731
    for box, c in zip(boxes, labels):
        fate = rng.choice(["tp", "tp", "loc", "cls", "both", "dupe", "miss"])
        if fate in ("tp", "dupe"):
            out.append((_shifted(box, rng.uniform(0, 0.2)), c, rng.uniform()))
        if fate == "dupe":
            out.append((_shifted(box, rng.uniform(0, 0.25)), c, rng.uniform()))
        if fate == "loc":
            out.append((_shifted(box, rng.uniform(0.45, 0.75)), c, rng.uniform()))
        if fate == "cls":
            out.append((_shifted(box, rng.uniform(0, 0.2)), other(c), rng.uniform()))
        if fate == "both":
            out.append((_shifted(box, rng.uniform(0.45, 0.75)), other(c), rng.uniform()))
    for _ in range(rng.integers(0, 3)):  # background
        out.append((_box(rng, size), int(rng.integers(num_classes)), rng.uniform()))
    return out


def synthetic_case(seed: int, num_images: int = 30, size: int = 400, ties: bool = False) -> tuple[dict, list]:
    """(COCO ground truth dict, COCO results list)."""
    rng = np.random.default_rng(seed)
    images, anns, results = [], [], []
    for i in range(num_images):
        image_id = i + 1
        images.append({"id": image_id, "width": size, "height": size, "file_name": f"{image_id}.png"})
        n = 0 if i == 1 else int(rng.integers(1, 6))  # image 2 has no objects
        boxes = np.stack([_box(rng, size) for _ in range(n)]) if n else np.zeros((0, 4))
        labels = rng.integers(0, len(CLASSES), n)
        crowd = rng.uniform(size=n) < 0.1
        for b, c, cr in zip(boxes, labels, crowd):
            x1, y1, x2, y2 = b.tolist()
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": int(c) + 1, "iscrowd": int(cr),
                         "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                         "segmentation": [[x1, y1, x2, y1, x2, y2, x1, y2]]})  # tidecv's loader reads it
        if i == 0:
            continue  # image 1: no detections at all
        for b, c, s in _image_dets(rng, boxes[~crowd], labels[~crowd], size) + [
            (_shifted(b, 0.1), int(c), rng.uniform()) for b, c in zip(boxes[crowd], labels[crowd])
        ]:
            x1, y1, x2, y2 = np.asarray(b).tolist()
            score = round(float(s), 1) if ties else float(s)
            results.append({"image_id": image_id, "category_id": int(c) + 1, "bbox": [x1, y1, x2 - x1, y2 - y1],
                            "score": score})
    cats = [{"id": i + 1, "name": n} for i, n in enumerate(CLASSES)]
    return {"images": images, "annotations": anns, "categories": cats}, results


def coco128_case(seed: int) -> tuple[dict, list]:
    """coco128's real ground truth (80 classes, crowd objects) with synthetic detections made
    from its objects by ``_image_dets`` (boxes as tidecv reads them: rectangles for masks)."""
    gt = json.loads(COCO128.read_text())
    rng = np.random.default_rng(seed)
    cat_ids = [c["id"] for c in gt["categories"]]
    results, anns = [], []
    for img in gt["images"]:
        mine = [a for a in gt["annotations"] if a["image_id"] == img["id"]]
        xywh = np.array([a["bbox"] for a in mine], dtype=np.float64).reshape(-1, 4)
        boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1)
        labels = np.array([cat_ids.index(a["category_id"]) for a in mine], dtype=np.int64)
        crowd = np.array([bool(a["iscrowd"]) for a in mine], dtype=bool)
        for b, c, sc in _image_dets(rng, boxes[~crowd], labels[~crowd], min(img["width"], img["height"]),
                                    num_classes=len(cat_ids)):
            x1, y1, x2, y2 = np.asarray(b).tolist()
            results.append({"image_id": img["id"], "category_id": cat_ids[int(c)], "bbox": [x1, y1, x2 - x1, y2 - y1],
                            "score": float(sc)})
        for a in mine:
            x, y, w, h = a["bbox"]
            anns.append({k: a[k] for k in ("id", "image_id", "category_id", "iscrowd", "bbox", "area")}
                        | {"segmentation": [[x, y, x + w, y, x + w, y + h, x, y + h]]})
    images = [{k: im[k] for k in ("id", "width", "height", "file_name")} for im in gt["images"]]
    cats = [{"id": c["id"], "name": c["name"]} for c in gt["categories"]]
    return {"images": images, "annotations": anns, "categories": cats}, results


def _results_case(config: str, overrides: list[str], results_file: Path) -> tuple[dict, list]:
    """A real detector's results file and its config's validation ground truth."""
    from onestage.build import read_dataset
    from onestage.config import load_config
    from onestage.eval.coco import records_to_coco_gt

    cfg = load_config(config, overrides)
    spec = read_dataset(cfg.data.val, cfg)
    gt = records_to_coco_gt(spec.records, spec.class_names, getattr(spec, "category_ids", None))
    for a in gt["annotations"]:
        x, y, w, h = a["bbox"]
        a["segmentation"] = [[x, y, x + w, y, x + w, y + h, x, y + h]]  # tidecv's loader reads it
    return gt, json.loads(results_file.read_text())


def coco_to_inputs(gt: dict, results: list) -> tuple[list[ImageRecord], list[dict]]:
    """COCO ground truth + results -> onestage records and per-image detections (label = the
    category's index in ``gt["categories"]``)."""
    label = {c["id"]: i for i, c in enumerate(gt["categories"])}
    records, dets = [], []
    for img in gt["images"]:
        anns = [a for a in gt["annotations"] if a["image_id"] == img["id"]]
        mine = [r for r in results if r["image_id"] == img["id"]]
        xywh = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
        records.append(ImageRecord(
            image_id=img["id"], width=img["width"], height=img["height"],
            boxes=np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], 1),
            labels=np.array([label[a["category_id"]] for a in anns], dtype=np.int64),
            difficult=np.array([bool(a["iscrowd"]) for a in anns], dtype=bool)))
        dxywh = np.array([r["bbox"] for r in mine], dtype=np.float64).reshape(-1, 4)
        dets.append({"boxes": np.concatenate([dxywh[:, :2], dxywh[:, :2] + dxywh[:, 2:]], 1),
                     "scores": np.array([r["score"] for r in mine], dtype=np.float64),
                     "labels": np.array([label[r["category_id"]] for r in mine], dtype=np.int64)})
    return records, dets


def run_tidecv(tide_python: str, gt: dict, results: list) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        gt_file, res_file = Path(tmp) / "gt.json", Path(tmp) / "results.json"
        gt_file.write_text(json.dumps(gt))
        res_file.write_text(json.dumps(results))
        out = subprocess.run([tide_python, "-c", TIDECV_SNIPPET, str(gt_file), str(res_file)],
                             capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def compare(ours: dict, ref: dict) -> float:
    """Print both side by side (AP points x 100); return the largest difference (fraction)."""
    worst = abs(ours["ap"] - ref["ap"] / 100)
    print(f"{'':<10}{'onestage':>10}{'tidecv':>10}")
    print(f"{'AP':<10}{100 * ours['ap']:>10.4f}{ref['ap']:>10.4f}")
    for group, names in (("main", MAIN_ERRORS), ("special", SPECIAL_ERRORS)):
        for n in names:
            a, b = ours[group][n], ref[group][n] / 100
            worst = max(worst, abs(a - b))
            extra = f"{ours['counts'][n]:>8d}{ref['counts'][n]:>6d}" if group == "main" else ""
            print(f"{n:<10}{100 * a:>10.4f}{100 * b:>10.4f}{extra}")
    return worst


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tide-python", required=True, help="python of a venv with tidecv installed")
    p.add_argument("--write", action="store_true", help=f"record the cases and tidecv's numbers in {FIXTURE}")
    p.add_argument("--results", type=Path, help="also compare on this COCO results file (a real detector's, "
                                                "from `onestage eval CONFIG CKPT --save-results FILE`)")
    p.add_argument("--dataset", help="the config whose val split is the ground truth of --results")
    p.add_argument("overrides", nargs="*", help="dotted overrides for --dataset, as given to onestage eval")
    args = p.parse_args()
    if args.write and args.results:
        p.error("--write records the built-in cases; leave out --results")
    cases, worst = {}, 0.0
    made = {"distinct_scores": lambda: synthetic_case(0), "tied_scores": lambda: synthetic_case(1, ties=True),
            "coco128": lambda: coco128_case(2)}
    if args.results is not None:
        made = {f"{args.results.name}": lambda: _results_case(args.dataset, args.overrides, args.results)}
    for name, make in made.items():
        gt, results = make()
        classes = [c["name"] for c in gt["categories"]]
        records, dets = coco_to_inputs(gt, results)
        ours = tide_to_json(tide_analysis(records, dets, classes))
        ref = run_tidecv(args.tide_python, gt, results)
        print(f"== {name}: {len(gt['images'])} images, {len(gt['annotations'])} objects, {len(results)} detections")
        worst = max(worst, compare(ours, ref))
        cases[name] = {"classes": classes, "gt": gt, "results": results, "tidecv": ref}
    print(f"largest difference: {worst:.2e} AP")
    if args.write:
        FIXTURE.parent.mkdir(parents=True, exist_ok=True)
        FIXTURE.write_text(json.dumps({"cases": cases}, separators=(",", ":")))
        print(f"recorded in {FIXTURE}")
    return 0 if worst <= 1e-6 else 1


if __name__ == "__main__":
    sys.exit(main())
