"""Run a detector over a dataset and score it with the shared Evaluator.

Under torch.distributed (``evaluate`` during DDP training) each rank runs the model on a
shard of whole batches, rank 0 gathers the detections and computes the metrics once, and
the result is broadcast: every rank holds the same numbers (the best-checkpoint decision
agrees), equal to a single process's because each batch is one a single process would run.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import chain
from typing import Iterator

import numpy as np
import torch
from tqdm import tqdm

from onestage.families import Detector
from onestage.config import Config
from onestage.data.base import DetectionDataset, collate
from onestage.engine import distributed as dist
from onestage.engine.precision import autocast_context
from onestage.eval.evaluator import EvalResult, Evaluator
from onestage.eval.stability_report import add_stability, is_video_dataset


def make_evaluator(cfg: Config, class_names: list[str], category_ids: list[int] | None = None) -> Evaluator:
    return Evaluator(
        class_names,
        metrics=tuple(cfg.eval.metrics),
        iou_threshold=cfg.eval.iou_threshold,
        voc_metric=cfg.eval.voc_metric,
        category_ids=category_ids,
        voc_convention=cfg.eval.voc_convention,
    )


@torch.no_grad()
def predict_batches(
    detector: Detector,
    dataset: DetectionDataset,
    cfg: Config,
    device: torch.device,
    batch_size: int | None = None,
    progress: bool = True,
    desc: str = "eval",
    indices: Sequence[int] | None = None,
) -> Iterator[tuple[list[int], list[dict[str, np.ndarray]]]]:
    """Yield (record indices, detections in original-image pixels) batch by batch.

    Memory stays bounded: only one batch of raw outputs exists at a time. ``indices``: only
    these records, in this order (a rank's shard); default all of them.
    """
    model = detector.model
    was_training = model.training
    model.eval()
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size or cfg.train.batch_size, shuffle=False, sampler=indices,
        num_workers=cfg.data.num_workers, collate_fn=collate,
    )
    invert = dataset.transform.invert_boxes  # eval transforms map network boxes back to pixels
    try:
        for batch in tqdm(loader, desc=desc, leave=False, disable=not progress, dynamic_ncols=True):
            images = batch["images"].to(device)
            if cfg.precision.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with autocast_context(cfg.precision, device):
                outputs = model(images)
            dets = detector.postprocess(outputs)
            indices = batch["indices"].tolist()
            out = []
            for i, d in zip(indices, dets):
                rec = dataset.records[i]
                boxes = invert(d.boxes.float().cpu().numpy(), rec.width, rec.height)
                out.append(
                    {
                        "boxes": np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
                        "scores": d.scores.float().cpu().numpy(),
                        "labels": d.labels.cpu().numpy().astype(np.int64),
                    }
                )
            yield indices, out
    finally:
        model.train(was_training)


def evaluate(
    detector: Detector,
    dataset: DetectionDataset,
    cfg: Config,
    device: torch.device,
    progress: bool = True,
    keep_detections: bool = False,
) -> tuple[EvalResult, list[dict[str, np.ndarray]] | None]:
    """Score the detector on ``dataset``; optionally keep every image's detections (for plots).

    Under torch.distributed this is a collective (every rank calls it): see the module
    docstring. The result is the same on every rank; kept detections are returned on rank 0
    only (None elsewhere).
    """
    if dist.is_distributed():
        return _evaluate_sharded(detector, dataset, cfg, device, progress, keep_detections)
    evaluator = make_evaluator(cfg, dataset.class_names)
    video = is_video_dataset(dataset.records)  # the stability step needs every frame's detections
    kept: list[dict[str, np.ndarray]] | None = [None] * len(dataset) if keep_detections or video else None  # type: ignore[list-item]
    for indices, dets in predict_batches(detector, dataset, cfg, device, progress=progress):
        evaluator.update([dataset.records[i] for i in indices], dets)
        if kept is not None:
            for i, d in zip(indices, dets):
                kept[i] = d
    result = evaluator.compute()
    if video:
        add_stability(result, dataset.records, kept, dataset.class_names, cfg.eval.display_threshold)
    return result, kept if keep_detections else None


def shard_batches(size: int, batch_size: int, rank: int, world_size: int) -> list[int]:
    """The record indices rank ``rank`` evaluates: batches rank, rank + W, rank + 2W, ...

    Whole batches of the single-process order, so every image is run in exactly the batch
    (same images, same size) it would be in one process: the outputs match to the bit. The
    shards differ in length by at most one batch; evaluation has no step to keep in lockstep.
    """
    starts = range(rank * batch_size, size, world_size * batch_size)
    return [i for start in starts for i in range(start, min(start + batch_size, size))]


def _evaluate_sharded(
    detector: Detector,
    dataset: DetectionDataset,
    cfg: Config,
    device: torch.device,
    progress: bool,
    keep_detections: bool,
) -> tuple[EvalResult, list[dict[str, np.ndarray]] | None]:
    shard = shard_batches(len(dataset), cfg.train.batch_size, dist.rank(), dist.world_size())
    local = [
        (i, d)
        for indices, dets in predict_batches(detector, dataset, cfg, device, progress=progress, indices=shard)
        for i, d in zip(indices, dets)
    ]
    gathered = dist.gather_to_main(local)  # numpy arrays travel pickled: a few KB per image
    result: EvalResult | None = None
    kept: list[dict[str, np.ndarray]] | None = None
    if gathered is not None:
        pairs = sorted(chain.from_iterable(gathered), key=lambda pair: pair[0])
        if [i for i, _ in pairs] != list(range(len(dataset))):
            raise RuntimeError(f"distributed evaluation: gathered {len(pairs)} images for a dataset of {len(dataset)}")
        evaluator = make_evaluator(cfg, dataset.class_names)
        evaluator.update([dataset.records[i] for i, _ in pairs], [d for _, d in pairs])  # single-process order
        result = evaluator.compute()
        if is_video_dataset(dataset.records):
            add_stability(result, dataset.records, [d for _, d in pairs], dataset.class_names,
                          cfg.eval.display_threshold)
        kept = [d for _, d in pairs] if keep_detections else None
    return dist.broadcast_object(result), kept
