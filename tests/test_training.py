"""End-to-end training: smoke run, overfit, exact resume, SIGTERM, non-finite losses, CLI."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from onestage.cli import main as cli_main
from onestage.config import load_config
from onestage.engine.checkpoint import load_checkpoint
from onestage.engine.trainer import TrainingError, train

ROOT = Path(__file__).resolve().parents[1]

# A small MobileNetV2-SSDLite at 300 (the 8732-prior layout) on a handful of shapes images.
TINY = [
    "model.arch=ssdlite", "model.width_mult=0.25", "model.extra_channels=[64,32,32]",
    "data.train.num_images=8", "data.val.num_images=4", "data.augment.preset=none",
    "train.batch_size=4", "train.epochs=1", "train.log_every=1", "train.time_budget=null", "train.eval_every=1",
    "schedule.warmup_steps=0", "optim.name=adamw", "optim.lr=0.002", "ema.enabled=false",
]


def tiny_cfg(tmp_path: Path, *extra: str):
    return load_config(ROOT / "configs" / "demo_shapes.yaml", TINY + [f"train.out_dir={tmp_path}", *extra])


def test_two_step_smoke(tmp_path):
    cfg = tiny_cfg(tmp_path, "train.name=smoke")
    summary = train(cfg, tmp_path / "smoke", progress=False, max_steps=2)
    assert summary["steps"] == 2
    ckpt = load_checkpoint(tmp_path / "smoke" / "last.pt")
    assert ckpt["step"] == 2 and "model" in ckpt and "rng" in ckpt
    rows = (tmp_path / "smoke" / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("kind,step,epoch,loss_loc,loss_cls,loss_total,lr")
    # 8 images in batches of 4: the 2 steps end the epoch, which is validated
    assert [r.split(",")[0] for r in rows[1:]] == ["step", "step", "epoch"]


def test_overfit_few_images_loss_falls_and_map_rises(tmp_path):
    cfg = tiny_cfg(
        tmp_path, "data.train.num_images=4", "data.val.num_images=4", "data.val.seed=0",
        "train.epochs=60", "train.eval_every=30", "model.width_mult=0.5", "optim.lr=0.003",
    )
    summary = train(cfg, tmp_path / "overfit", progress=False)
    rows = [r.split(",") for r in (tmp_path / "overfit" / "metrics.csv").read_text().splitlines()]
    header = rows[0]
    steps = [dict(zip(header, r)) for r in rows[1:] if r[0] == "step"]
    epochs = [dict(zip(header, r)) for r in rows[1:] if r[0] == "epoch"]
    first = float(steps[0]["loss_total"])
    last = sum(float(s["loss_total"]) for s in steps[-5:]) / 5
    assert last < 0.5 * first, (first, last)
    maps = [float(e["voc_ap50"]) for e in epochs]
    assert len(maps) == 2 and maps[-1] > maps[0] and maps[-1] > 0.3, maps
    assert summary["best_value"] == max(maps)


def test_resume_equals_straight_run(tmp_path):
    # close_mosaic is decided at epoch starts: step 3 < 0.6 * 6 keeps mosaic on for epoch 2,
    # and the run resumed at step 4 (past 3.6) must keep it on too
    base = ["train.epochs=2", "train.log_every=1", "data.train.num_images=12", "data.augment.preset=ssd",
            "ema.enabled=true", "schedule.warmup_steps=2", "data.augment.mosaic=0.5", "data.augment.close_mosaic=0.4"]
    straight = tiny_cfg(tmp_path, *base, "train.name=straight")
    train(straight, tmp_path / "straight", progress=False)  # 2 epochs x 3 steps

    split = tiny_cfg(tmp_path, *base, "train.name=split")
    train(split, tmp_path / "split", progress=False, max_steps=4)  # stops mid-epoch 2
    assert load_checkpoint(tmp_path / "split" / "last.pt")["step"] == 4
    train(split, tmp_path / "split", resume=True, progress=False)

    a = load_checkpoint(tmp_path / "straight" / "last.pt")
    b = load_checkpoint(tmp_path / "split" / "last.pt")
    assert a["step"] == b["step"] == 6
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=1e-5, atol=1e-6, msg=key)
    for key, value in a["ema"]["shadow"].items():
        torch.testing.assert_close(b["ema"]["shadow"][key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_close_mosaic_turns_mosaic_off_for_the_last_part(tmp_path, monkeypatch):
    from onestage.data.mosaic import Mosaic

    made: list[int] = []
    real_call = Mosaic.__call__
    monkeypatch.setattr(Mosaic, "__call__", lambda self, tiles: made.append(1) or real_call(self, tiles))
    # 12 images, batches of 4: 3 steps an epoch, 6 in all; every sample a mosaic until step 3
    cfg = tiny_cfg(tmp_path, "train.epochs=2", "data.train.num_images=12", "data.augment.preset=ssd",
                   "data.augment.mosaic=1.0", "data.augment.close_mosaic=0.5", "train.name=close")
    train(cfg, tmp_path / "close", progress=False, max_steps=4)  # cut in epoch 2, mosaic closed
    assert load_checkpoint(tmp_path / "close" / "last.pt")["mosaic_closed"] is True
    train(cfg, tmp_path / "close", resume=True, progress=False)  # the rest of epoch 2: still closed
    assert len(made) == 12  # epoch 1's samples only


def test_nonfinite_loss_skipped_counted_then_stops(tmp_path, monkeypatch):
    from onestage.losses.multibox import MultiboxLoss

    real_forward = MultiboxLoss.forward
    calls = {"n": 0}

    def flaky(self, outputs, boxes, labels):
        out = real_forward(self, outputs, boxes, labels)
        calls["n"] += 1
        if calls["n"] == 2:  # one poisoned step
            out["total"] = out["total"] * float("nan")
        return out

    monkeypatch.setattr(MultiboxLoss, "forward", flaky)
    cfg = tiny_cfg(tmp_path, "train.name=nan", "data.train.num_images=16")
    summary = train(cfg, tmp_path / "nan", progress=False)
    assert summary["nonfinite_steps"] == 1 and summary["steps"] == 3  # 4 batches, one skipped

    monkeypatch.setattr(MultiboxLoss, "forward", lambda self, o, b, l: {"total": torch.tensor(math.inf)})
    cfg = tiny_cfg(tmp_path, "train.name=nan2", "data.train.num_images=16", "train.max_nonfinite_steps=3")
    with pytest.raises(TrainingError, match="3 non-finite losses in a row"):
        train(cfg, tmp_path / "nan2", progress=False)


def test_sigterm_leaves_resumable_checkpoint(tmp_path):
    run = tmp_path / "term"
    cmd = [sys.executable, "-m", "onestage", "train", str(ROOT / "configs" / "demo_shapes.yaml"), *TINY,
           "data.train.num_images=400", f"train.out_dir={tmp_path}", "train.name=term", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (run / "metrics.csv").exists() and proc.poll() is None:
        time.sleep(0.2)
    time.sleep(1)  # metrics.csv appears at the first logged step: training is under way
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out
    assert "resume with: onestage train --resume" in out
    step = load_checkpoint(run / "last.pt")["step"]
    assert 0 < step < 100
    done = subprocess.run(
        [sys.executable, "-m", "onestage", "train", "--resume", str(run), "--no-progress", "--max-steps", str(step + 2)],
        capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert load_checkpoint(run / "last.pt")["step"] == step + 2


def test_cli_inspect_ssd300_counts(capsys):
    assert cli_main(["inspect", str(ROOT / "configs" / "ssd300_mobilenetv2_voc.yaml"), "--num-classes", "20"]) == 0
    out = capsys.readouterr().out
    for n in ("5776", "2166", "600", "150", "36", "8732"):
        assert n in out
    assert "25" in out  # (20 + 1) + 4 values per box
    assert cli_main(["inspect", str(ROOT / "configs" / "ssd300_mobilenetv2_voc.yaml"), "--num-classes", "20", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [m["candidates"] for m in info["maps"]] == [5776, 2166, 600, 150, 36, 4]
    assert info["total_candidates"] == 8732


def test_cli_bad_config_names_key(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochz: 3\n")
    assert cli_main(["inspect", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "train.epochz" in err and "epochs" in err
    assert cli_main(["inspect", str(ROOT / "configs" / "demo_shapes.yaml"), "train.batch_size=abc"]) == 2
    assert "train.batch_size" in capsys.readouterr().err


def test_cli_errors_name_the_file(tmp_path, capsys):
    ckpt = tmp_path / "nothing.pt"
    ckpt.write_bytes(b"not a checkpoint")
    cfg = str(ROOT / "configs" / "demo_shapes.yaml")
    assert cli_main(["predict", cfg, str(ckpt), str(tmp_path / "missing.png"), "--out", str(tmp_path / "o")]) == 2
    assert "nothing.pt" in capsys.readouterr().err
    assert cli_main(["train", str(tmp_path / "absent.yaml")]) == 2
    assert "absent.yaml: no such config file" in capsys.readouterr().err
    binary = tmp_path / "weights.yaml"
    binary.write_bytes(b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19.")  # a pickle's first bytes
    assert cli_main(["inspect", str(binary)]) == 2
    assert "weights.yaml: not a YAML text file" in capsys.readouterr().err


def test_cli_train_eval_predict(tmp_path, capsys):
    args = [str(ROOT / "configs" / "demo_shapes.yaml"), *TINY, f"train.out_dir={tmp_path}", "train.name=cli"]
    assert cli_main(["train", *args, "--no-progress"]) == 0
    run = tmp_path / "cli"
    for name in ("config.yaml", "metrics.csv", "last.pt", "best.pt", "plots/losses.png", "plots/lr.png",
                 "eval/pr_curves.png", "eval/metrics.json", "eval/result.json", "report.html"):
        assert (run / name).exists(), name
    assert len(list((run / "predictions").glob("*.png"))) == 4
    capsys.readouterr()
    assert cli_main(["eval", *args[:1], str(run / "best.pt"), *TINY, "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert "voc_ap50" in metrics["metrics"]
    # `eval CHECKPOINT`: the config the run was trained with (kept in the checkpoint), same val split
    assert cli_main(["eval", str(run / "best.pt"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["metrics"] == metrics["metrics"]
    assert cli_main(["eval", str(run / "best.pt"), "data.val.num_images=2", "eval.metrics=[voc]", "--json"]) == 0
    assert sum(r["num_gt"] for r in json.loads(capsys.readouterr().out)["per_class"]) < sum(
        r["num_gt"] for r in metrics["per_class"])
    images = run / "predictions"
    assert cli_main(["predict", args[0], str(run / "best.pt"), str(images), "--out", str(tmp_path / "pred"), "--threshold", "0.0"]) == 0
    dets = json.loads((tmp_path / "pred" / "detections.json").read_text())
    assert len(dets) == 4 and all("detections" in d for d in dets)


@pytest.mark.datasets
def test_raccoon_voc_one_epoch(tmp_path):
    """The MobileNetV2-SSD VOC config trains an epoch on the real raccoon photographs."""
    cfg = load_config(ROOT / "configs" / "ssd300_mobilenetv2_voc.yaml", [
        "model.input_size=160", "model.width_mult=0.25", "model.extra_channels=[64,32,32]",
        "model.priors.min_sizes=[]", "model.priors.max_sizes=[]", "model.priors.steps=[]",
        "data.train.limit=8", "data.val.limit=4", "train.batch_size=4", "train.epochs=1",
        f"train.out_dir={tmp_path}", "train.name=raccoon",
    ])
    summary = train(cfg, tmp_path / "raccoon", progress=False)
    assert summary["steps"] == 2 and summary["epochs"] == 1
    rows = (tmp_path / "raccoon" / "metrics.csv").read_text().splitlines()
    assert any(r.startswith("epoch,") for r in rows)
    assert load_checkpoint(tmp_path / "raccoon" / "best.pt")["class_names"] == ["raccoon"]


def test_eval_results_file_round_trip(tmp_path, capsys):
    """`eval --save-results` then `eval --results` scores the same detections to the same numbers."""
    args = [str(ROOT / "configs" / "demo_shapes.yaml"), *TINY, f"train.out_dir={tmp_path}", "train.name=res",
            "eval.metrics=[voc,coco]", "eval.score_threshold=0.0"]
    assert cli_main(["train", *args, "--no-progress", "--max-steps", "2"]) == 0
    capsys.readouterr()
    results = tmp_path / "dets.json"
    assert cli_main(["eval", args[0], str(tmp_path / "res" / "last.pt"), *args[1:], "--json",
                     "--save-results", str(results)]) == 0
    direct = json.loads(capsys.readouterr().out)["metrics"]
    assert json.loads(results.read_text())[0].keys() >= {"image_id", "category_id", "bbox", "score"}
    assert cli_main(["eval", "--results", str(results), "--dataset", args[0], *args[1:], "--json"]) == 0
    scored = json.loads(capsys.readouterr().out)
    for key in ("coco_ap", "coco_ap50", "coco_ar100"):
        assert scored[key] == pytest.approx(direct[key], abs=1e-6), key


def test_tensorboard_events_when_installed(tmp_path):
    pytest.importorskip("tensorboard")
    from onestage.engine.trainer import MetricsLog

    log = MetricsLog(tmp_path / "metrics.csv")
    log.log({"kind": "step", "step": 1, "epoch": 1, "loss_total": 2.5, "lr": 0.01})
    log.log({"kind": "epoch", "step": 1, "epoch": 1, "voc_ap50": 0.5})
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_plot_lr_writes_the_schedule(tmp_path, capsys):
    args = [str(ROOT / "configs" / "demo_shapes.yaml"), *TINY, f"train.out_dir={tmp_path}", "train.name=lr",
            "train.epochs=5", "schedule.warmup_steps=2"]
    assert cli_main(["train", *args, "--plot-lr"]) == 0
    png = tmp_path / "lr" / "lr.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert str(png) in capsys.readouterr().out
    assert not (tmp_path / "lr" / "last.pt").exists()  # a preview: nothing trained
    assert cli_main(["train", *args, "train.time_budget=5", "train.name=lr_budget", "--plot-lr"]) == 0
    assert "train.time_budget is 5 min" in capsys.readouterr().out
