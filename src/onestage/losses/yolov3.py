"""YOLOv3 loss: box, objectness and class terms on the targets of ``assign_yolov3``.

Seed 000 and DESIGN.md section 3, per scale, summed over the scales:
- ``xy``: on positives, ``mse``: (sigmoid(t_x) - tx)^2 + (sigmoid(t_y) - ty)^2, or ``bce``:
  BCE-with-logits of t_x against the soft target tx (and y);
- ``wh``: on positives, (t_w - tw)^2 + (t_h - th)^2 (``mse``) or smooth L1 (``smooth_l1``,
  beta 1); optionally both box terms scaled by (2 - w h) per object (w, h normalized):
  small boxes weigh up to twice as much (Darknet ``delta_yolo_box``'s ``scale``);
- ``obj``: BCE-with-logits of the objectness against 1 on positives;
- ``noobj``: BCE-with-logits against 0 on the negatives that are not ignored;
- ``cls``: BCE-with-logits per class (independent sigmoids, YOLOv3 paper section 2.2) on
  positives. Target: one-hot of the slot's object (``class_collisions="last"``, the
  default: when two objects share a (cell, anchor) the later one's class alone), or the
  multi-hot union of the classes of every object that landed on the slot
  (``class_collisions="union"``, Darknet's ``delta_yolo_class``).
Every term is returned already weighted, with ``total`` their sum (docs/contracts.md).

Reduction. ``sum`` (default): each term summed over all scales, anchors and cells, divided
by the batch size (Darknet accumulates per-image deltas and divides the learning rate by
the batch). ``mean``: as the PyTorch ports that use ``nn.MSELoss()`` / ``nn.BCELoss()``
(eriklindernoren/PyTorch-YOLOv3): xy and wh divided by the number of positives, obj by the
positives, noobj by the non-ignored negatives, cls by positives x C (pooled over the
scales; an empty count counts as 1). Those ports pair ``mean`` with ``noobj_weight=100``;
with ``sum`` the default 1.0 is Darknet's balance.

``preset="darknet"`` reproduces the GRADIENT of Darknet's YOLO layer (``yolo_layer.c``,
``iou_loss=mse``, yolov3.cfg). Darknet writes ``delta = target - output`` per entry and
``backward_yolo_layer`` adds ``delta`` to the input gradient unchanged (no logistic
derivative), so for the raw outputs z:
- x, y: delta = scale (tx - sigmoid(z)), the gradient of scale * BCE-with-logits(z, tx)
  -> ``xy_loss="bce"`` (its printed cost squares the deltas, which only looks like MSE);
- w, h: delta = scale (tw - z), the gradient of 0.5 scale (z - tw)^2 -> ``wh_loss="mse"``
  with ``wh_weight=0.5``;
- scale = 2 - w h -> ``box_weight_2wh=True``;
- obj / noobj / classes: 1 - sigmoid(z), -sigmoid(z), onehot - sigmoid(z): plain BCE ->
  weights 1; two objects on one slot: the later object's box deltas overwrite the earlier
  one's, its class delta is added beside the earlier class's -> ``class_collisions="union"``;
- ignore by prediction at ``ignore_thresh=.7`` (yolov3.cfg), the best of all 9 anchors
  (``assign_mode="global"``), ``reduction="sum"``.
The preset replaces exactly those settings (xy_loss, wh_loss, wh_weight, box_weight_2wh,
assign_mode, ignore_by, ignore_thres, reduction, class_collisions); the term weights obj/noobj/cls/box keep
the values given (1.0 by default, as Darknet). All losses are computed in fp32.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from onestage.assign.yolov3 import AssignMode, IgnoreBy, YoloTargets, assign_yolov3
from onestage.losses.functional import smooth_l1, weighted_terms
from onestage.coders import check_yolov3_outputs, yolov3_decode_boxes

XYLoss = Literal["mse", "bce"]
WHLoss = Literal["mse", "smooth_l1"]
ClassCollisions = Literal["last", "union"]
TERMS: tuple[str, ...] = ("xy", "wh", "obj", "noobj", "cls")


@dataclass(frozen=True)
class LossSettings:
    """The settings a preset decides (module docstring)."""

    xy_loss: XYLoss
    wh_loss: WHLoss
    wh_weight: float
    box_weight_2wh: bool
    assign_mode: AssignMode
    ignore_by: IgnoreBy
    ignore_thres: float
    reduction: Literal["sum", "mean"]
    class_collisions: ClassCollisions = "last"


# What preset="darknet" sets: Darknet's yolo_layer.c gradient with yolov3.cfg (module docstring).
DARKNET_PRESET = LossSettings(
    xy_loss="bce",
    wh_loss="mse",
    wh_weight=0.5,
    box_weight_2wh=True,
    assign_mode="global",
    ignore_by="prediction",
    ignore_thres=0.7,
    reduction="sum",
    class_collisions="union",
)


class YOLOv3Loss(nn.Module):
    """Criterion: ``loss(outputs, gt_boxes, gt_labels) -> {"xy", "wh", "obj", "noobj", "cls", "total"}``.

    anchors: [(A_s, 2)] w, h normalized by the input size, coarsest first (the order of the
        raw outputs); kept as buffers so that ``.to(device)`` moves them.
    num_classes: C. Other settings: module docstring.
    """

    def __init__(
        self,
        anchors: Sequence[Tensor],
        num_classes: int,
        *,
        xy_loss: XYLoss = "mse",
        wh_loss: WHLoss = "mse",
        box_weight_2wh: bool = False,
        noobj_weight: float = 1.0,
        obj_weight: float = 1.0,
        cls_weight: float = 1.0,
        box_weight: float = 1.0,
        wh_weight: float = 1.0,
        reduction: Literal["sum", "mean"] = "sum",
        assign_mode: AssignMode = "global",
        ignore_by: IgnoreBy = "prediction",
        ignore_thres: float = 0.5,
        class_collisions: ClassCollisions = "last",
        preset: Literal["darknet"] | None = None,
    ) -> None:
        super().__init__()
        if preset is not None and preset != "darknet":
            raise ValueError(f"preset must be 'darknet' or None, got {preset!r}")
        settings = LossSettings(
            xy_loss=xy_loss,
            wh_loss=wh_loss,
            wh_weight=wh_weight,
            box_weight_2wh=box_weight_2wh,
            assign_mode=assign_mode,
            ignore_by=ignore_by,
            ignore_thres=ignore_thres,
            reduction=reduction,
            class_collisions=class_collisions,
        )
        if preset == "darknet":
            settings = DARKNET_PRESET
        _check_choice("xy_loss", settings.xy_loss, ("mse", "bce"))
        _check_choice("wh_loss", settings.wh_loss, ("mse", "smooth_l1"))
        _check_choice("reduction", settings.reduction, ("sum", "mean"))
        _check_choice("assign_mode", settings.assign_mode, ("global", "per_scale"))
        _check_choice("ignore_by", settings.ignore_by, ("prediction", "anchor"))
        _check_choice("class_collisions", settings.class_collisions, ("last", "union"))
        weights = dict(noobj=noobj_weight, obj=obj_weight, cls=cls_weight, box=box_weight, wh=settings.wh_weight)
        negative = {k: v for k, v in weights.items() if v < 0}
        if negative:
            raise ValueError(f"loss weights must be >= 0, got {negative}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.preset = preset
        self.xy_loss = settings.xy_loss
        self.wh_loss = settings.wh_loss
        self.box_weight_2wh = settings.box_weight_2wh
        self.noobj_weight = float(noobj_weight)
        self.obj_weight = float(obj_weight)
        self.cls_weight = float(cls_weight)
        self.box_weight = float(box_weight)
        self.wh_weight = float(settings.wh_weight)
        self.reduction = settings.reduction
        self.assign_mode = settings.assign_mode
        self.ignore_by = settings.ignore_by
        self.ignore_thres = float(settings.ignore_thres)
        self.class_collisions = settings.class_collisions
        self.num_scales = len(anchors)
        for s, anc in enumerate(anchors):
            group = torch.as_tensor(anc, dtype=torch.float32).reshape(-1, 2)
            self.register_buffer(f"anchors_{s}", group, persistent=False)

    @property
    def anchors(self) -> list[Tensor]:
        """[(A_s, 2)] normalized w, h, coarsest first."""
        return [getattr(self, f"anchors_{s}") for s in range(self.num_scales)]

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, preset={self.preset}, xy_loss={self.xy_loss}, wh_loss={self.wh_loss}, "
            f"box_weight_2wh={self.box_weight_2wh}, weights(box={self.box_weight}, wh={self.wh_weight}, "
            f"obj={self.obj_weight}, noobj={self.noobj_weight}, cls={self.cls_weight}), reduction={self.reduction}, "
            f"assign_mode={self.assign_mode}, ignore_by={self.ignore_by}, ignore_thres={self.ignore_thres}, "
            f"class_collisions={self.class_collisions}"
        )

    def forward(self, outputs: Sequence[Tensor], gt_boxes: Tensor, gt_labels: Tensor) -> dict[str, Tensor]:
        """outputs: [(B, A_s, H_s, W_s, 5 + C)] coarsest first; gt_boxes (B, M, 4) xyxy normalized;
        gt_labels (B, M) int64, -1 on padding. Returns the weighted terms and ``total`` (0-dim)."""
        anchors = self.anchors
        check_yolov3_outputs(outputs, anchors, self.num_classes)
        device_type = outputs[0].device.type
        with torch.autocast(device_type=device_type, enabled=False):  # all losses in fp32
            raw = [out.float() for out in outputs]
            pred_boxes = None
            if self.ignore_by == "prediction":
                pred_boxes = [yolov3_decode_boxes(r.detach(), a) for r, a in zip(raw, anchors)]
            targets = assign_yolov3(
                gt_boxes,
                gt_labels,
                anchors,
                [(r.shape[2], r.shape[3]) for r in raw],
                mode=self.assign_mode,
                ignore_by=self.ignore_by,
                ignore_thres=self.ignore_thres,
                pred_boxes=pred_boxes,
            )
            sums, counts = self._raw_terms(raw, targets)
        batch = outputs[0].shape[0]
        if self.reduction == "sum":
            raw_terms = {name: sums[name] / batch for name in TERMS}
        else:
            raw_terms = {name: sums[name] / max(counts[name], 1) for name in TERMS}
        return weighted_terms(raw_terms, self.weights)

    @property
    def weights(self) -> dict[str, float]:
        return {
            "xy": self.box_weight,
            "wh": self.box_weight * self.wh_weight,
            "obj": self.obj_weight,
            "noobj": self.noobj_weight,
            "cls": self.cls_weight,
        }

    def _raw_terms(self, raw: list[Tensor], targets: list[YoloTargets]) -> tuple[dict[str, Tensor], dict[str, int]]:
        """Unweighted, unreduced sums of each term over all scales, and their element counts."""
        zero = raw[0].new_zeros(())  # each sum below adds a (possibly empty) selection of the outputs: graph kept
        sums = {name: zero for name in TERMS}
        counts = {name: 0 for name in TERMS}
        for r, t in zip(raw, targets):
            pos = r[t.obj_mask]  # (P, 5 + C)
            num_pos = pos.shape[0]
            box_scale = torch.ones(num_pos, device=r.device)
            if self.box_weight_2wh:
                tbox = t.tbox[t.obj_mask]  # (P, 4) xyxy normalized
                box_scale = 2.0 - (tbox[:, 2] - tbox[:, 0]) * (tbox[:, 3] - tbox[:, 1])  # Darknet: 2 - w h
            txy = torch.stack((t.tx[t.obj_mask], t.ty[t.obj_mask]), dim=-1)  # (P, 2)
            twh = torch.stack((t.tw[t.obj_mask], t.th[t.obj_mask]), dim=-1)  # (P, 2)
            sums["xy"] = sums["xy"] + (box_scale * self._xy(pos[:, 0:2], txy)).sum()
            sums["wh"] = sums["wh"] + (box_scale * self._wh(pos[:, 2:4], twh)).sum()
            sums["obj"] = sums["obj"] + F.binary_cross_entropy_with_logits(
                pos[:, 4], torch.ones_like(pos[:, 4]), reduction="sum"
            )
            neg_logits = r[..., 4][t.noobj_mask]  # (N_neg,)
            sums["noobj"] = sums["noobj"] + F.binary_cross_entropy_with_logits(
                neg_logits, torch.zeros_like(neg_logits), reduction="sum"
            )
            cls_target = self._class_target(t)  # (P, C)
            sums["cls"] = sums["cls"] + F.binary_cross_entropy_with_logits(pos[:, 5:], cls_target, reduction="sum")
            counts["xy"] += num_pos
            counts["wh"] += num_pos
            counts["obj"] += num_pos
            counts["noobj"] += int(neg_logits.shape[0])
            counts["cls"] += num_pos * self.num_classes
        return sums, counts

    def _class_target(self, t: YoloTargets) -> Tensor:
        """(P, C) float class target of the positives, in ``t.obj_mask`` order (module docstring)."""
        if self.class_collisions == "last":
            return F.one_hot(t.tcls[t.obj_mask], self.num_classes).float()
        multi_hot = torch.zeros(t.obj_mask.numel(), self.num_classes, device=t.obj_mask.device)  # (B*A*H*W, C)
        multi_hot[t.cls_slots[:, 0], t.cls_slots[:, 1]] = 1.0
        return multi_hot[t.obj_mask.reshape(-1)]

    def _xy(self, logits: Tensor, target: Tensor) -> Tensor:
        """(P, 2) raw t_x, t_y and targets in [0, 1] -> (P,) per-object loss."""
        if self.xy_loss == "bce":
            return F.binary_cross_entropy_with_logits(logits, target, reduction="none").sum(dim=-1)
        return ((torch.sigmoid(logits) - target) ** 2).sum(dim=-1)

    def _wh(self, pred: Tensor, target: Tensor) -> Tensor:
        """(P, 2) raw t_w, t_h and targets -> (P,) per-object loss."""
        if self.wh_loss == "smooth_l1":
            return smooth_l1(pred, target, beta=1.0, reduction="none")
        return ((pred - target) ** 2).sum(dim=-1)


def _check_choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(repr(a) for a in allowed)}; got {value!r}")
