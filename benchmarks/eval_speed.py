"""COCO evaluation speed: pycocotools (the reference) vs faster-coco-eval through onestage.

Synthetic COCO-like input with a fixed seed: by default 5000 images, about 7 objects each
(Poisson, at least 1, 80 categories, some crowd), 100 detections per image (the objects
jittered, some with a wrong class, the rest random boxes). Both evaluators get the same
ground-truth dict and results list; each time covers index building, loading the results,
evaluate, accumulate and summarize. The script prints both times, their ratio, the VOC
evaluation time of the same detections for scale, and fails (exit 1) when any of the twelve
COCO numbers differ by more than 1e-4.

    .venv/bin/python benchmarks/eval_speed.py            # 5000 images (1-2 minutes)
    .venv/bin/python benchmarks/eval_speed.py --images 200
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import sys
import time

import numpy as np

from onestage.eval.coco import COCO_METRIC_KEYS, coco_metrics
from onestage.eval.voc import evaluate_voc


def xywh_to_xyxy(b: np.ndarray) -> np.ndarray:
    """(N, 4) COCO xywh -> (N, 4) xyxy."""
    return np.concatenate([b[:, :2], b[:, :2] + b[:, 2:]], axis=1)


def synthetic(num_images: int, dets_per_image: int, seed: int) -> tuple[dict, list[dict], list, list]:
    """COCO gt dict, COCO results, and the same data as VOC (gts, dets) per image."""
    rng = np.random.default_rng(seed)
    num_classes = 80
    images, annotations, results, voc_gts, voc_dets = [], [], [], [], []
    ann_id = 1
    for image_id in range(1, num_images + 1):
        w, h = 640, 480
        images.append({"id": image_id, "width": w, "height": h, "file_name": f"{image_id:012d}.jpg"})
        n = max(1, int(rng.poisson(7)))
        size = rng.uniform(8, 300, (n, 2))  # small, medium and large objects
        xy = rng.uniform(0, 1, (n, 2)) * (np.array([w, h]) - size)
        gt_xywh = np.concatenate([xy, size], axis=1)  # (n, 4)
        gt_cls = rng.integers(0, num_classes, n)
        crowd = rng.random(n) < 0.02
        for b, c, cr in zip(gt_xywh.tolist(), gt_cls.tolist(), crowd.tolist()):
            annotations.append(
                {
                    "id": ann_id,
                    "image_id": image_id,
                    "category_id": c + 1,
                    "bbox": b,
                    "area": b[2] * b[3],
                    "iscrowd": int(cr),
                }
            )
            ann_id += 1
        # Detections: each object jittered (90% kept), 10% with a random class, the rest random.
        kept = rng.random(n) < 0.9
        jit = gt_xywh[kept] + rng.normal(0, 0.1, (kept.sum(), 4)) * np.tile(gt_xywh[kept, 2:], 2)
        jit[:, 2:] = np.maximum(jit[:, 2:], 1.0)
        cls = np.where(rng.random(kept.sum()) < 0.1, rng.integers(0, num_classes, kept.sum()), gt_cls[kept])
        m = dets_per_image - len(jit)
        rnd_size = rng.uniform(8, 300, (m, 2))
        rnd = np.concatenate([rng.uniform(0, 1, (m, 2)) * (np.array([w, h]) - rnd_size), rnd_size], axis=1)
        det_xywh = np.concatenate([jit, rnd])  # (100, 4)
        det_cls = np.concatenate([cls, rng.integers(0, num_classes, m)])
        det_score = np.concatenate([rng.uniform(0.3, 1.0, len(jit)), rng.uniform(0.0, 0.7, m)])
        results.extend(
            {"image_id": image_id, "category_id": c + 1, "bbox": b, "score": s}
            for b, c, s in zip(det_xywh.tolist(), det_cls.tolist(), det_score.tolist())
        )
        voc_gts.append((xywh_to_xyxy(gt_xywh), gt_cls, crowd))
        voc_dets.append((xywh_to_xyxy(det_xywh), det_score, det_cls))
    categories = [{"id": c + 1, "name": f"class{c}"} for c in range(num_classes)]
    return {"images": images, "annotations": annotations, "categories": categories}, results, voc_gts, voc_dets


def pycocotools_stats(gt: dict, results: list[dict]) -> np.ndarray:
    """The reference, run directly (not through onestage)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = gt
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(results)
        ev = COCOeval(coco_gt, coco_dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return np.asarray(ev.stats)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--dets", type=int, default=100, help="detections per image")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    gt, results, voc_gts, voc_dets = synthetic(args.images, args.dets, args.seed)
    print(f"{args.images} images, {len(gt['annotations'])} objects, {len(results)} detections")

    # pycocotools edits its inputs in place: give it its own copies, outside the timing.
    gt_ref, res_ref = copy.deepcopy(gt), copy.deepcopy(results)
    t0 = time.perf_counter()
    ref = pycocotools_stats(gt_ref, res_ref)
    t_ref = time.perf_counter() - t0

    t0 = time.perf_counter()
    ours = coco_metrics(gt, results, backend="faster")
    t_fast = time.perf_counter() - t0

    t0 = time.perf_counter()
    voc = evaluate_voc(voc_gts, voc_dets, 80)
    t_voc = time.perf_counter() - t0

    print(f"pycocotools COCOeval:              {t_ref:7.2f} s")
    print(f"faster-coco-eval (onestage.coco):  {t_fast:7.2f} s")
    print(f"speed-up:                          {t_ref / t_fast:7.2f} x")
    print(f"VOC AP50, 80 classes (onestage):   {t_voc:7.2f} s   mAP {voc.mean_ap:.4f}")
    diff = np.abs(np.array([ours[k] for k in COCO_METRIC_KEYS]) - ref)
    for k, r, d in zip(COCO_METRIC_KEYS, ref, diff):
        print(f"  {k:15s} {r:.6f}  |diff| {d:.1e}")
    if diff.max() > 1e-4:
        print(f"MISMATCH: largest difference {diff.max():.2e} > 1e-4")
        return 1
    print(f"all twelve numbers agree (largest difference {diff.max():.1e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
