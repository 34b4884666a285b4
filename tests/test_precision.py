"""Mixed precision (engine/precision.py): the fp32 predicate and what it forces, dtypes, loss scaling."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from onestage.boxes import box_iou
from onestage.config import PrecisionConfig
from onestage.engine.precision import (
    FP32_OPS,
    LossScaler,
    autocast_context,
    grads_are_finite,
    resolve_dtype,
    should_force_fp32,
)

CPU = torch.device("cpu")
AMP = PrecisionConfig(amp=True, dtype="bfloat16", force_fp32=["iou", "loss_reduction", "nms"])
AMP_NONE_FORCED = PrecisionConfig(amp=True, dtype="bfloat16", force_fp32=[])

# Two thin boxes on the bf16 grid of [0.5, 1) (spacing 1/256): in fp32 they overlap with
# IoU 0.69 / 1.31 = 0.527 > 0.45; rounded to bf16 they become [230, 231] and [231, 232] / 256,
# which only touch: IoU 0.
BOXES = torch.tensor([[230.49 / 256, 0.1, 231.49 / 256, 0.5], [230.8 / 256, 0.1, 231.8 / 256, 0.5]])


def test_predicate() -> None:
    assert FP32_OPS == ("iou", "loss_reduction", "nms", "decode", "softmax")
    assert should_force_fp32("iou", AMP)
    assert not should_force_fp32("decode", AMP)  # not listed
    assert not should_force_fp32("iou", PrecisionConfig(amp=False))  # nothing to force without AMP
    assert not should_force_fp32("nms", None)
    with pytest.raises(ValueError, match="unknown operation 'ious'; known: iou, loss_reduction, nms, decode, softmax"):
        should_force_fp32("ious", AMP)


def test_resolve_dtype_and_autocast_context() -> None:
    assert resolve_dtype(PrecisionConfig(amp=True, dtype="auto"), CPU) == torch.bfloat16
    assert resolve_dtype(PrecisionConfig(amp=True, dtype="auto"), torch.device("cuda")) == torch.float16
    assert resolve_dtype(PrecisionConfig(amp=True, dtype="float16"), CPU) == torch.float16
    assert resolve_dtype(PrecisionConfig(amp=False), torch.device("cuda")) is None
    with autocast_context(PrecisionConfig(amp=False), CPU):
        assert not torch.is_autocast_enabled("cpu")
    with autocast_context(PrecisionConfig(amp=True), CPU):
        assert torch.is_autocast_enabled("cpu")
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert nn.Linear(4, 2)(torch.ones(1, 4)).dtype == torch.bfloat16


def _iou_dtype(precision: PrecisionConfig) -> torch.dtype:
    """What the matcher and NMS do with the predicate (families/ssd.py, postprocess/ssd.py)."""
    return torch.float32 if should_force_fp32("iou", precision) else torch.bfloat16


def test_iou_forced_to_fp32_equals_fp32() -> None:
    reference = box_iou(BOXES[:1], BOXES[1:])
    assert reference.item() == pytest.approx(0.69 / 1.31, abs=1e-4)
    forced = box_iou(BOXES[:1], BOXES[1:], dtype=_iou_dtype(AMP))
    unforced = box_iou(BOXES[:1], BOXES[1:], dtype=_iou_dtype(AMP_NONE_FORCED))
    assert forced.dtype == torch.float32 and torch.equal(forced, reference)
    assert unforced.item() == 0.0  # in bf16 the two boxes 0.3 px apart no longer overlap


def test_loss_reduction_forced_to_fp32_equals_fp32() -> None:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        # (10000,) per-prior values as an autocast forward returns them: bf16(0.1) = 205 / 2048
        per_prior = (torch.ones(10000, 1) @ torch.full((1, 1), 0.1)).squeeze(1)
    assert per_prior.dtype == torch.bfloat16 and per_prior[0].item() == 205 / 2048

    def reduce(precision: PrecisionConfig) -> torch.Tensor:  # as the criteria do (losses/multibox.py)
        return (per_prior.float() if should_force_fp32("loss_reduction", precision) else per_prior).sum()

    forced, unforced = reduce(AMP), reduce(AMP_NONE_FORCED)
    reference = per_prior.float().sum()  # the same values reduced in pure fp32
    # 10000 * 205 / 2048 = 1000.9765625 needs 21 significant bits: exact in fp32
    assert forced.dtype == torch.float32 and forced.item() == reference.item() == 1000.9765625
    # un-forced the sum stays in bf16 (8 significant bits, spacing 4 in [512, 1024))
    assert unforced.dtype == torch.bfloat16 and unforced.item() == 1000.0


def test_nms_forced_to_fp32_equals_fp32() -> None:
    from onestage.postprocess import nms_keep_mask

    valid = torch.ones(2, dtype=torch.bool)
    reference = nms_keep_mask(BOXES, valid, 0.45)
    assert reference.tolist() == [True, False]  # IoU 0.527 > 0.45: the lower score is suppressed

    def nms_dtype(precision: PrecisionConfig) -> torch.dtype:  # as the post-processors do
        return torch.float32 if should_force_fp32("nms", precision) else torch.bfloat16

    assert nms_keep_mask(BOXES, valid, 0.45, dtype=nms_dtype(AMP)).tolist() == reference.tolist()
    assert nms_keep_mask(BOXES, valid, 0.45, dtype=nms_dtype(AMP_NONE_FORCED)).tolist() == [True, True]


# ----------------------------------------------------------------------------- loss scaling


def _linear_step_setup() -> tuple[nn.Linear, torch.optim.SGD]:
    model = nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.5, 0.25]]))
        model.bias.copy_(torch.tensor([0.5, -0.5]))
    return model, torch.optim.SGD(model.parameters(), lr=0.5)


def test_fixed_huge_scale_overflow_is_skipped_and_counted() -> None:
    cfg = PrecisionConfig(amp=True, dtype="float16", loss_scale=2.0**120)
    model, opt = _linear_step_setup()
    before = [p.detach().clone() for p in model.parameters()]
    scaler = LossScaler(cfg, CPU)
    with autocast_context(cfg, CPU):
        loss = model(torch.ones(1, 3)).float().sum()
    scaler.scale(loss).backward()  # 2**120 overflows fp16 in the backward pass
    assert not grads_are_finite(model.parameters())
    assert scaler.step(opt) is False
    scaler.update()
    assert scaler.skipped_steps == 1
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert scaler.scale_value == 2.0**120  # a fixed scale does not back off


def test_fixed_scale_finite_step_is_exact() -> None:
    cfg = PrecisionConfig(amp=True, dtype="float16", loss_scale=1024.0)
    model, opt = _linear_step_setup()
    scaler = LossScaler(cfg, CPU)
    loss = model(torch.ones(1, 3)).sum()  # fp32 loss: grads are exactly 1 * 1024, unscaled to 1
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    assert model.weight.grad.tolist() == [[1.0, 1.0, 1.0], [1.0, 1.0, 1.0]]
    assert scaler.step(opt) is True
    scaler.update()
    assert model.weight.tolist() == [[0.5, 1.5, 2.5], [-1.5, 0.0, -0.25]]  # w - 0.5 * 1
    assert scaler.skipped_steps == 0 and scaler.scale_value == 1024.0


def test_dynamic_scale_backs_off_and_state_roundtrips() -> None:
    cfg = PrecisionConfig(amp=True, dtype="float16", loss_scale="dynamic")
    model, opt = _linear_step_setup()
    scaler = LossScaler(cfg, CPU)
    scaler.scale(model(torch.ones(1, 3)).sum()).backward()
    model.bias.grad[0] = float("inf")  # injected overflow
    assert scaler.step(opt) is False
    scaler.update()
    assert scaler.scale_value == 2.0**15  # 2**16 halved
    restored = LossScaler(cfg, CPU)
    restored.load_state_dict(scaler.state_dict())
    assert restored.skipped_steps == 1 and restored.scale_value == 2.0**15


def test_bf16_nonfinite_grad_is_skipped_and_counted() -> None:
    cfg = PrecisionConfig(amp=True, dtype="bfloat16")
    model, opt = _linear_step_setup()
    scaler = LossScaler(cfg, CPU)
    assert scaler.scale_value == 1.0
    before = model.weight.detach().clone()
    loss = model(torch.ones(1, 3)).sum()
    assert scaler.scale(loss) is loss  # bf16 needs no scaling
    loss.backward()
    model.weight.grad[1, 2] = float("nan")
    assert scaler.step(opt) is False
    scaler.update()
    assert scaler.skipped_steps == 1 and torch.equal(model.weight, before)
    opt.zero_grad()
    model(torch.ones(1, 3)).sum().backward()
    assert scaler.step(opt) is True
    assert model.weight.tolist() == [[0.5, 1.5, 2.5], [-1.5, 0.0, -0.25]]
    assert scaler.state_dict() == {"skipped_steps": 1, "grad_scaler": {}}
