"""The in-memory image cache of DetectionDataset: same boxes, smaller images, decoded once."""

from __future__ import annotations

from pathlib import Path

import pytest

import numpy as np
import torch

from onestage.data.base import DetectionDataset
from onestage.data.transforms import EvalTransform
from onestage.data.voc import read_voc

RACCOON = Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets" / "raccoon"

pytestmark = pytest.mark.datasets


def test_cache_keeps_boxes_and_decodes_once():
    spec = read_voc(RACCOON, ids=["raccoon-1", "raccoon-2", "raccoon-3"])
    calls = []

    def loader(rec):
        calls.append(rec.image_id)
        from onestage.data.io import load_record_image

        return load_record_image(rec)

    plain = DetectionDataset(spec.records, spec.class_names, EvalTransform(128), image_loader=loader)
    cached = DetectionDataset(spec.records, spec.class_names, EvalTransform(128), image_loader=loader,
                              cache_max_side=256)
    for i in range(3):
        a, b = plain[i], cached[i]
        # normalized boxes agree to the rounding of the shrunk image's size (< 1 px of 256)
        torch.testing.assert_close(b["boxes"], a["boxes"], atol=1 / 256, rtol=0)
        assert torch.equal(a["labels"], b["labels"])
        # the picture itself is the same scene: a low-resolution comparison agrees closely
        assert (a["image"] - b["image"]).abs().mean() < 0.1
    calls.clear()
    for _ in range(2):
        for i in range(3):
            cached[i]
    assert calls == []  # every image came from the cache
    h, w = cached._cache[0][0].shape[:2]
    assert max(h, w) <= 256
    assert np.isclose(cached._cache[0][1], w / spec.records[0].width)
