"""Run a detector over a dataset and score it with the shared Evaluator."""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from tqdm import tqdm

from onestage.build import Detector
from onestage.config import Config
from onestage.data.base import DetectionDataset, collate
from onestage.engine.precision import autocast_context
from onestage.eval.evaluator import EvalResult, Evaluator


def make_evaluator(cfg: Config, class_names: list[str], category_ids: list[int] | None = None) -> Evaluator:
    return Evaluator(
        class_names,
        metrics=("voc",),
        iou_threshold=cfg.eval.iou_threshold,
        voc_metric=cfg.eval.voc_metric,
        category_ids=category_ids,
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
) -> Iterator[tuple[list[int], list[dict[str, np.ndarray]]]]:
    """Yield (record indices, detections in original-image pixels) batch by batch.

    Memory stays bounded: only one batch of raw outputs exists at a time.
    """
    model = detector.model
    was_training = model.training
    model.eval()
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size or cfg.train.batch_size, shuffle=False,
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
    """Score the detector on ``dataset``; optionally keep every image's detections (for plots)."""
    evaluator = make_evaluator(cfg, dataset.class_names)
    kept: list[dict[str, np.ndarray]] | None = [None] * len(dataset) if keep_detections else None  # type: ignore[list-item]
    for indices, dets in predict_batches(detector, dataset, cfg, device, progress=progress):
        evaluator.update([dataset.records[i] for i in indices], dets)
        if kept is not None:
            for i, d in zip(indices, dets):
                kept[i] = d
    return evaluator.compute(), kept
