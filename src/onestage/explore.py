"""The assignment explorer (``onestage assign``): which candidates each object gets, and how many.

Everything here goes through the family interface only (``layout``, ``candidate_boxes``,
``assign`` and the ``extras`` a family documents), so a new family is explored without a
line of code here. Optional family attributes are read when present: ``pos_iou`` (the IoU at
which a candidate is positive: objects below it are "only forced") and ``neg_pos_ratio``
(hard negative mining's ratio). Three layers:

- ``analyse_batch``: one padded batch (B images, M object slots) -> per-object and per-image
  numbers, all tensors, no loop over candidates or boxes;
- ``summarize``: the numbers of a whole split (positives per object by COCO size bucket,
  forced, lost, without a positive, ignored per image, positive : negative before and after
  mining), what ``assignment.json`` holds;
- ``build_panels`` / ``draw_assignment``: one panel per feature map in the input image's
  pixels (the geometry is a pure function, tested apart from the pixels of the PNG).

Boxes: ground truth and candidates are (.., 4) xyxy normalized to the network input;
panels hold xyxy pixels of the (S, S) network input.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from torch import Tensor

from onestage.boxes import box_iou
from onestage.data.check import MEDIUM_AREA, SMALL_AREA, class_color
from onestage.families import IGNORE, BACKGROUND, Assignment, LayoutRow, positives_per_object

BUCKETS = ("small", "medium", "large")  # COCO: area < 32^2 <= area < 96^2 <= area, in input pixels


# ----------------------------------------------------------------------------- numbers
def map_bounds(layout: Sequence[LayoutRow]) -> list[tuple[int, int]]:
    """[(start, end)] of each map's candidates in the family's candidate order (maps in layout order)."""
    ends = np.cumsum([r.candidates for r in layout]).tolist()
    return list(zip([0] + ends[:-1], ends))


def size_bucket(boxes: Tensor, size: int) -> Tensor:
    """(..., 4) xyxy normalized -> (...) int64: 0 small, 1 medium, 2 large, by area at ``size`` px."""
    area = (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0) * size**2
    return (area >= SMALL_AREA).long() + (area >= MEDIUM_AREA).long()


@dataclass
class BatchNumbers:
    """What ``analyse_batch`` measures on one padded batch (B images, M slots, K maps)."""

    valid: Tensor  # (B, M) bool
    labels: Tensor  # (B, M) int64
    boxes: Tensor  # (B, M, 4) xyxy normalized
    positives_per_map: Tensor  # (B, M, K) int64
    best_iou: Tensor  # (B, M) float32: best IoU with any candidate
    lost: Tensor  # (B, M) bool: lost its slot to another object (family extras["lost"] > 0)
    ignored: Tensor  # (B,) int64: candidates ignored in the image
    positive: Tensor  # (B,) int64: positive candidates
    negative: Tensor  # (B,) int64: background candidates before mining
    negative_kept: Tensor  # (B,) int64: background candidates the loss sees (after mining)


@torch.no_grad()
def analyse_batch(
    family: Any, candidates: Tensor, gt_boxes: Tensor, gt_labels: Tensor, outputs: Any = None
) -> tuple[Assignment, BatchNumbers]:
    """Assign one padded batch and count. candidates: (N, 4) xyxy normalized (``candidate_boxes()``);
    gt_boxes (B, M, 4) xyxy normalized; gt_labels (B, M), -1 padding; outputs: the model's, or None."""
    a = family.assign(gt_boxes, gt_labels, outputs)
    roles = a.roles  # (B, N)
    num_gt = gt_labels.shape[1]
    per_map = torch.stack(
        [positives_per_object(roles[:, s:e], num_gt) for s, e in map_bounds(family.layout())], dim=-1
    )  # (B, M, K)
    best = box_iou(gt_boxes, candidates.to(gt_boxes)).amax(dim=-1) if len(candidates) else torch.zeros_like(gt_labels, dtype=torch.float32)
    lost = a.extras.get("lost")
    lost = (lost > 0) & a.valid if lost is not None else torch.zeros_like(a.valid)
    positive = (roles >= 0).sum(dim=1)
    negative = (roles == BACKGROUND).sum(dim=1)
    return a, BatchNumbers(
        valid=a.valid, labels=gt_labels, boxes=gt_boxes, positives_per_map=per_map, best_iou=best.float(), lost=lost,
        ignored=(roles == IGNORE).sum(dim=1), positive=positive, negative=negative,
        negative_kept=negatives_in_loss(family, a, positive, negative),
    )


def negatives_in_loss(family: Any, a: Assignment, positive: Tensor, negative: Tensor) -> Tensor:
    """(B,) background candidates the classification/objectness loss sees.

    With the model's outputs, SSD's mined negatives (extras["hard_negative"]); without them a
    family with ``neg_pos_ratio`` keeps min(ratio x positives, negatives) (the count mining keeps
    whichever predictions it ranks); a family without mining trains every background
    candidate (YOLO: objectness on all non-ignored negatives, weighted instead of mined)."""
    if "hard_negative" in a.extras:
        return a.extras["hard_negative"].sum(dim=1)
    ratio = getattr(family, "neg_pos_ratio", None)
    if ratio is not None:
        return torch.minimum((positive.double() * ratio).floor().long(), negative)
    return negative


def mining_rule(family: Any, a: Assignment) -> str:
    if "hard_negative" in a.extras:
        return f"hard negative mining under the model's predictions (ratio {getattr(family, 'neg_pos_ratio', '?')}:1)"
    if getattr(family, "neg_pos_ratio", None) is not None:
        return f"hard negative mining, {family.neg_pos_ratio:g}:1 (count only: no checkpoint to rank negatives)"
    return "no mining: every background candidate is in the objectness/confidence loss"


# ----------------------------------------------------------------------------- per object rows
def object_rows(
    numbers: BatchNumbers, image_ids: Sequence[Any], class_names: Sequence[str], map_names: Sequence[str],
    size: int, pos_iou: float | None,
) -> list[dict[str, Any]]:
    """One JSON-ready row per valid object of the batch (formatting only: the numbers are tensors)."""
    b_idx, m_idx = numbers.valid.nonzero(as_tuple=True)
    boxes = numbers.boxes[b_idx, m_idx]  # (O, 4)
    wh = ((boxes[:, 2:] - boxes[:, :2]) * size).tolist()
    buckets = size_bucket(boxes, size).tolist()
    per_map = numbers.positives_per_map[b_idx, m_idx].tolist()
    best = numbers.best_iou[b_idx, m_idx].tolist()
    lost = numbers.lost[b_idx, m_idx].tolist()
    labels = numbers.labels[b_idx, m_idx].tolist()
    rows = []
    for k, (b, m) in enumerate(zip(b_idx.tolist(), m_idx.tolist())):
        total = int(sum(per_map[k]))
        rows.append({
            "image": image_ids[b], "object": m, "class": class_names[labels[k]] if 0 <= labels[k] < len(class_names) else str(labels[k]),
            "width_px": round(wh[k][0], 1), "height_px": round(wh[k][1], 1), "bucket": BUCKETS[buckets[k]],
            "positives": total, "positives_per_map": dict(zip(map_names, per_map[k])), "best_iou": round(best[k], 4),
            "only_forced": bool(pos_iou is not None and total > 0 and best[k] < pos_iou),
            "lost": bool(lost[k]), "no_positive": total == 0,
        })
    return rows


def format_object_table(rows: Sequence[dict[str, Any]], map_names: Sequence[str]) -> str:
    """The per-object table as text; objects without a positive flagged loudly."""
    short = [f"m{i}" for i in range(len(map_names))]
    head = f"{'obj':>4} {'class':<12}{'w x h px':>12} {'bucket':<7}" + "".join(f"{s:>5}" for s in short) + f"{'best IoU':>10}  flags"
    lines = [head, "-" * len(head)]
    for r in rows:
        flags = []
        if r["no_positive"]:
            flags.append("!!! NO POSITIVE: contributes nothing to training !!!")
        if r["only_forced"]:
            flags.append("only forced")
        if r["lost"]:
            flags.append("LOST its slot to another object")
        counts = "".join(f"{r['positives_per_map'][n]:>5}" for n in map_names)
        lines.append(f"{r['object']:>4} {r['class'][:12]:<12}{r['width_px']:>6.0f}x{r['height_px']:<5.0f} {r['bucket']:<7}"
                     f"{counts}{r['best_iou']:>10.3f}  {'; '.join(flags)}")
    lines.append("maps: " + ", ".join(f"{s} = {n}" for s, n in zip(short, map_names)))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- summary
@dataclass
class SplitTally:
    """Numbers gathered over a split, batch by batch."""

    objects: list[dict[str, Any]] = field(default_factory=list)
    ignored: list[int] = field(default_factory=list)  # per image
    positive: list[int] = field(default_factory=list)
    negative: list[int] = field(default_factory=list)
    negative_kept: list[int] = field(default_factory=list)

    def add(self, numbers: BatchNumbers, rows: list[dict[str, Any]]) -> None:
        self.objects += rows
        self.ignored += numbers.ignored.tolist()
        self.positive += numbers.positive.tolist()
        self.negative += numbers.negative.tolist()
        self.negative_kept += numbers.negative_kept.tolist()


def _ratio(pos: int, neg: int) -> str:
    return f"1:{neg / pos:.1f}" if pos else "no positives"


def summarize(tally: SplitTally) -> dict[str, Any]:
    """Split-level numbers: positives per object by size bucket, flags, ignored, pos:neg ratios."""
    by_bucket: dict[str, Any] = {}
    for name in (*BUCKETS, "all"):
        counts = np.array([o["positives"] for o in tally.objects if name in ("all", o["bucket"])], dtype=np.int64)
        hist = np.bincount(counts).tolist() if len(counts) else []
        by_bucket[name] = {
            "objects": int(len(counts)),
            "mean": float(counts.mean()) if len(counts) else None,
            "median": float(np.median(counts)) if len(counts) else None,
            "histogram": hist,  # histogram[k] = objects with exactly k positives
        }
    pos, neg, kept = (int(np.sum(x)) for x in (tally.positive, tally.negative, tally.negative_kept))
    ignored = np.asarray(tally.ignored, dtype=np.float64)
    flag = lambda key: int(sum(o[key] for o in tally.objects))  # noqa: E731
    return {
        "images": len(tally.ignored), "objects": len(tally.objects),
        "positives_per_object": by_bucket,
        "only_forced": flag("only_forced"), "lost": flag("lost"), "no_positive": flag("no_positive"),
        "ignored_per_image": {"mean": float(ignored.mean()) if len(ignored) else None,
                              "median": float(np.median(ignored)) if len(ignored) else None},
        "positives": pos, "negatives_before_mining": neg, "negatives_after_mining": kept,
        "pos_neg_before": _ratio(pos, neg), "pos_neg_after": _ratio(pos, kept),
    }


def format_summary(s: dict[str, Any]) -> str:
    lines = [f"{s['images']} images, {s['objects']} objects",
             f"{'bucket':<8}{'objects':>8}{'mean pos':>10}{'median':>8}  histogram (objects with 0, 1, 2, ... positives)"]
    for name, b in s["positives_per_object"].items():
        mean = "-" if b["mean"] is None else f"{b['mean']:.2f}"
        median = "-" if b["median"] is None else f"{b['median']:g}"
        lines.append(f"{name:<8}{b['objects']:>8}{mean:>10}{median:>8}  {b['histogram'][:16]}")
    lines += [
        f"only forced (best IoU below the positive threshold): {s['only_forced']}",
        f"lost their slot to another object: {s['lost']}",
        f"WITHOUT ANY POSITIVE: {s['no_positive']}" + ("  <-- these objects are never trained on" if s["no_positive"] else ""),
        f"ignored candidates per image: mean {s['ignored_per_image']['mean']:.1f}, median {s['ignored_per_image']['median']:g}"
        if s["ignored_per_image"]["mean"] is not None else "ignored candidates per image: -",
        f"ignore rule: {s['ignore_rule']}" if s.get("ignore_rule") else "",
        f"positive : negative  before mining {s['pos_neg_before']}, after {s['pos_neg_after']}  ({s.get('mining', '')})",
    ]
    return "\n".join(line for line in lines if line)


def plot_histograms(summary: dict[str, Any], family_name: str, out_png: Path) -> Path:
    """One bar chart per size bucket: how many objects got 0, 1, 2, ... positives."""
    fig = Figure(figsize=(12, 3.2), dpi=100)
    FigureCanvasAgg(fig)
    for i, name in enumerate(BUCKETS):
        ax = fig.add_subplot(1, len(BUCKETS), i + 1)
        b = summary["positives_per_object"][name]
        hist = b["histogram"]
        if hist:
            bars = ax.bar(range(len(hist)), hist, color="C0")
            if hist[0]:
                bars[0].set_color("C3")  # objects without a positive
        mean = "-" if b["mean"] is None else f"{b['mean']:.1f}"
        ax.set_title(f"{name}: {b['objects']} objects, mean {mean}", fontsize=9)
        ax.set_xlabel("positive candidates per object", fontsize=8)
        ax.set_ylabel("objects", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.suptitle(f"{family_name}: positives per object by COCO size bucket (red: no positive)", fontsize=10)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png)
    return out_png


# ----------------------------------------------------------------------------- drawing geometry
@dataclass
class Panel:
    """What one feature map's panel draws, in pixels of the (size x size) network input."""

    title: str
    grid: tuple[int, int]  # (H, W) cells
    size: int
    gt: np.ndarray  # (M', 4) xyxy px of the valid objects
    gt_index: np.ndarray  # (M',) slot index of each
    positives: np.ndarray  # (K, 4) xyxy px: the positive candidates' prior / anchor / cell
    owner: np.ndarray  # (K,) slot index of the object each positive belongs to
    slot: np.ndarray  # (K,) rank among candidates of this map with the same box (YOLOv1: predictor)
    shares_box: np.ndarray  # (K,) bool: other candidates of the map have the same box (label the slot)
    ignored: np.ndarray  # (I, 4) xyxy px
    hard_negatives: np.ndarray  # (H, 4) xyxy px


def build_panels(
    layout: Sequence[LayoutRow], candidates: Tensor, roles: Tensor, gt_boxes: Tensor, valid: Tensor, size: int,
    hard_negative: Tensor | None = None,
) -> list[Panel]:
    """One ``Panel`` per map of ONE image. candidates (N, 4) xyxy normalized; roles (N,);
    gt_boxes (M, 4) xyxy normalized; valid (M,); hard_negative (N,) bool or None."""
    gt_index = valid.nonzero(as_tuple=True)[0]
    gt_px = (gt_boxes[gt_index].float() * size).numpy()
    panels = []
    for row, (s, e) in zip(layout, map_bounds(layout)):
        cand, r = candidates[s:e].float(), roles[s:e]
        pos = (r >= 0).nonzero(as_tuple=True)[0]  # (K,)
        # rank among identical boxes of the map with a lower index: which predictor of a cell it is
        same = (cand[pos][:, None, :] == cand[None, :, :]).all(dim=-1)  # (K, N_map)
        slot = (same & (torch.arange(len(cand))[None, :] < pos[:, None])).sum(dim=1)
        shares_box = same.sum(dim=1) > 1
        hard = hard_negative[s:e] if hard_negative is not None else torch.zeros_like(r, dtype=torch.bool)
        panels.append(Panel(
            title=f"{row.name}: {row.grid[0]}x{row.grid[1]} x {row.anchors_per_cell}", grid=row.grid, size=size,
            gt=gt_px, gt_index=gt_index.numpy(), positives=(cand[pos] * size).numpy(), owner=r[pos].numpy(),
            slot=slot.numpy(), shares_box=shares_box.numpy(), ignored=(cand[r == IGNORE] * size).numpy(), hard_negatives=(cand[hard] * size).numpy(),
        ))
    return panels


def _object_colour(index: int) -> tuple[float, float, float]:
    return tuple(c / 255 for c in class_color(index))  # type: ignore[return-value]


def _rect(ax, box: np.ndarray, **style) -> None:
    x1, y1, x2, y2 = box
    ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, **style))


def draw_assignment(image: np.ndarray, panels: Sequence[Panel], labels: Sequence[str], out_png: Path, title: str) -> Path:
    """The PNG of one image: one panel per map over the (S, S, 3) uint8 network input.
    labels: one text per object slot (class name)."""
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(4.2 * cols, 4.4 * rows), dpi=100)
    FigureCanvasAgg(fig)
    for i, p in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.imshow(image, extent=(0, p.size, p.size, 0))
        h, w = p.grid
        ax.vlines(np.arange(1, w) * p.size / w, 0, p.size, colors="white", linewidth=0.4, alpha=0.5)
        ax.hlines(np.arange(1, h) * p.size / h, 0, p.size, colors="white", linewidth=0.4, alpha=0.5)
        for box in p.ignored:
            _rect(ax, box, edgecolor=(0.9, 0.9, 0.9), linewidth=0.8, linestyle=":", alpha=0.8)
        for box in p.hard_negatives:
            _rect(ax, box, edgecolor=(0.9, 0.1, 0.1), linewidth=0.5, linestyle="--", alpha=0.6)
        for box, owner, slot, shares in zip(p.positives, p.owner, p.slot, p.shares_box):
            _rect(ax, box, edgecolor=_object_colour(int(owner)), linewidth=1.0, alpha=0.9)
            if shares:  # a cell's predictors share one box (YOLOv1): name the responsible one
                ax.text(box[0] + 2, box[3] - 2, f"pred {slot}", fontsize=6, color=_object_colour(int(owner)))
        for box, m in zip(p.gt, p.gt_index):
            _rect(ax, box, edgecolor=_object_colour(int(m)), linewidth=2.2)
            ax.text(box[0], box[1] - 2, f"{m}:{labels[m]}", fontsize=7, color="white",
                    bbox={"facecolor": _object_colour(int(m)), "pad": 1, "linewidth": 0})
        counts = np.bincount(p.owner.astype(np.int64), minlength=len(labels)) if len(p.owner) else np.zeros(len(labels), int)
        ax.set_title(f"{p.title}\npositives {len(p.positives)} ({', '.join(f'{m}:{counts[m]}' for m in p.gt_index)}); "
                     f"ignored {len(p.ignored)}" + (f"; hard neg {len(p.hard_negatives)}" if len(p.hard_negatives) else ""),
                     fontsize=7)
        ax.set_xlim(0, p.size)
        ax.set_ylim(p.size, 0)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title + "\nthick: ground truth; thin, same colour: its positive candidates; grey dotted: ignored; "
                 "red dashed: hard negatives", fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / fig.get_figheight()))  # room for the two-line title
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png)
    return out_png


# ----------------------------------------------------------------------------- the command
@dataclass
class AssignSource:
    """What ``explore_split`` runs over: a dataset in the network frame and the detector."""

    dataset: Any  # DetectionDataset with the eval transform
    family: Any
    class_names: list[str]
    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    model: torch.nn.Module | None = None  # with --checkpoint: outputs for the rules that need predictions
    precision: Any = None


def _outputs(source: AssignSource, images: Tensor) -> Any:
    if source.model is None:
        return None
    from onestage.engine.precision import autocast_context

    with torch.no_grad(), autocast_context(source.precision, images.device):
        return source.model(images)


def explore_split(
    source: AssignSource, indices: Sequence[int], out_dir: Path | None, draw: int = 16, batch_size: int = 32,
    progress: bool = True, verbose: bool = True,
) -> dict[str, Any]:
    """Assign the images ``indices`` of ``source.dataset`` in padded batches; PNGs and tables for
    the first ``draw`` images; returns the JSON-ready result (summary + every object)."""
    from tqdm import tqdm

    from onestage.data.base import collate

    family = source.family
    layout = family.layout()
    map_names = [r.name for r in layout]
    candidates = family.candidate_boxes()  # (N, 4) xyxy normalized
    pos_iou = getattr(family, "pos_iou", None)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(source.dataset, list(indices)), batch_size=batch_size, shuffle=False, collate_fn=collate)
    tally, drawn, rule, extra_rules = SplitTally(), 0, "", {}
    for batch in tqdm(loader, desc="assign", unit="batch", disable=not progress, dynamic_ncols=True):
        outputs = _outputs(source, batch["images"])
        a, numbers = analyse_batch(family, candidates, batch["boxes"], batch["labels"], outputs)
        rule = mining_rule(family, a)
        extra_rules = {k: v for k, v in a.extras.items() if isinstance(v, str)}
        ids = [source.dataset.records[i].image_id for i in batch["indices"].tolist()]
        rows = object_rows(numbers, ids, source.class_names, map_names, source.size, pos_iou)
        tally.add(numbers, rows)
        for b in range(len(ids)):
            if out_dir is None or drawn >= draw:
                break
            image_rows = [r for r in rows if r["image"] == ids[b]]
            _draw_one(source, layout, candidates, a, batch, b, ids[b], image_rows, map_names, out_dir, verbose)
            drawn += 1
    summary = summarize(tally)
    summary["mining"] = rule
    summary.update(extra_rules)
    return {
        "family": family.name, "input_size": source.size, "candidates": int(len(candidates)),
        "maps": [{"name": r.name, "grid": list(r.grid), "anchors_per_cell": r.anchors_per_cell, "candidates": r.candidates}
                 for r in layout],
        "positive_iou": pos_iou, "with_model_outputs": source.model is not None,
        "summary": summary, "objects": tally.objects,
    }


def _draw_one(source, layout, candidates, a: Assignment, batch, b: int, image_id, rows, map_names, out_dir: Path,
              verbose: bool) -> None:
    from onestage.data.transforms import denormalize

    hard = a.extras.get("hard_negative")
    panels = build_panels(layout, candidates, a.roles[b], batch["boxes"][b], a.valid[b], source.size,
                          None if hard is None else hard[b])
    labels = [source.class_names[int(c)] if c >= 0 else "" for c in batch["labels"][b].tolist()]
    image = denormalize(batch["images"][b], source.mean, source.std)
    name = str(image_id).replace("/", "_")
    draw_assignment(image, panels, labels, out_dir / f"{name}.png", f"{source.family.name}: image {image_id}")
    table = format_object_table(rows, map_names)
    (out_dir / f"{name}.txt").write_text(table + "\n")
    if verbose:
        print(f"\n== {image_id} ({out_dir / f'{name}.png'})\n{table}")
    for r in rows:
        if r["no_positive"]:
            print(f"WARNING: {image_id} object {r['object']} ({r['class']}, {r['width_px']:.0f}x{r['height_px']:.0f} px) "
                  f"has NO positive candidate: it contributes nothing to training", file=sys.stderr)


def write_result(result: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """assignment.json (every number) and histograms.png."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "assignment.json"
    path.write_text(json.dumps(result, indent=1))
    png = plot_histograms(result["summary"], result["family"], out_dir / "histograms.png")
    return path, png


# ----------------------------------------------------------------------------- what to run over
def load_source(cfg: Any, split: str = "train", checkpoint: Path | None = None) -> AssignSource:
    """The config's ``split`` after its eval transform (boxes in the network frame) and the
    detector: the config's, or the checkpoint's (its architecture and weights; the data stays the config's)."""
    from onestage.build import build_detector, build_eval_dataset, read_dataset

    model, train_spec = None, None
    if checkpoint is not None:
        from onestage.api import load_detector

        loaded = load_detector(checkpoint, config=cfg, device="cpu")
        cfg, detector, class_names = loaded.cfg, loaded.detector, loaded.class_names
        model = detector.model.eval()
    else:
        train_spec = read_dataset(cfg.data.train, cfg, class_names=cfg.data.class_names or None)
        class_names = train_spec.class_names
        detector = build_detector(cfg, class_names)
    if split == "train" and train_spec is not None:
        spec = train_spec
    else:
        spec = read_dataset(cfg.data.train if split == "train" else cfg.data.val, cfg, class_names=class_names)
    if detector.family is None:
        raise ValueError(f"{cfg.model.arch}: this detector has no family object; `assign` needs one")
    return AssignSource(build_eval_dataset(cfg, spec, class_names), detector.family, class_names,
                        cfg.model.input_size, tuple(cfg.data.mean), tuple(cfg.data.std), model, cfg.precision)


def select_indices(source: AssignSource, images: Sequence[Path], num: str) -> list[int]:
    """Record indices: the given image files (matched by file name in the split; an error
    names a file the split does not hold), else the first ``num`` images ("all": every one)."""
    from onestage.data.problems import DataError

    records = source.dataset.records
    if images:
        by_name = {Path(r.path).name: i for i, r in enumerate(records) if r.path is not None}
        missing = [str(p) for p in images if Path(p).name not in by_name]
        if missing:
            raise DataError(f"{', '.join(missing)}: not in the config's split (assign reads each image's labels "
                            f"where the config's data format finds them; try --split val)")
        return [by_name[Path(p).name] for p in images]
    if num == "all":
        return list(range(len(records)))
    try:
        n = int(num)
    except ValueError:
        raise DataError(f"--num: expected a number or 'all', got {num!r}") from None
    return list(range(min(max(n, 0), len(records))))
