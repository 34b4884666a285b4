"""Videos: generator round trip, the MOT reader and its bad input, predict_video, eval on video."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from onestage.data.io import load_record_image
from onestage.data.mot import read_mot
from onestage.data.moving_shapes import gt_lines, render_video, write_moving_shapes
from onestage.data.problems import DataError
from onestage.data.shapes import SHAPE_CLASSES
from onestage.video import count_frames, predict_video, probe_video, read_video_frames, write_video

W, H = 64, 48


@pytest.fixture(scope="module")
def tiny_videos(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("videos")
    write_moving_shapes(out, num_videos=2, num_frames=6, seed=7, width=W, height=H, fps=12)
    return out


def test_generator_is_deterministic_and_tracks_move():
    a = render_video(np.random.default_rng([3, 0]), W, H, 8)
    b = render_video(np.random.default_rng([3, 0]), W, H, 8)
    assert all(np.array_equal(x, y) for x, y in zip(a.frames, b.frames))
    assert gt_lines(a) == gt_lines(b)
    ids = np.concatenate(a.track_ids)
    assert len(ids) > 0 and ids.min() >= 1
    first = {int(i): bx for i, bx in zip(a.track_ids[0], a.boxes[0])}
    last = {int(i): bx for i, bx in zip(a.track_ids[-1], a.boxes[-1])}
    assert any(not np.array_equal(first[k], last[k]) for k in first.keys() & last.keys())


def test_round_trip_same_frames_and_boxes(tiny_videos):
    spec = read_mot(tiny_videos)
    assert spec.class_names == list(SHAPE_CLASSES)
    seqs = sorted({r.video for r in spec.records})
    assert len(seqs) == 2 and len(spec.records) == 12
    for v, seq in enumerate(seqs):
        truth = render_video(np.random.default_rng([7, v]), W, H, 6)
        video = tiny_videos / seq / f"{seq}.mp4"
        info = probe_video(video)
        assert (info.width, info.height, info.num_frames, info.fps) == (W, H, 6, 12.0)
        assert count_frames(video) == 6
        frames, _ = read_video_frames(video)
        decoded = list(frames)
        assert len(decoded) == 6
        recs = [r for r in spec.records if r.video == seq]
        for t, rec in enumerate(recs):
            assert rec.frame_index == t and rec.path == video
            np.testing.assert_array_equal(rec.boxes, truth.boxes[t])  # gt.txt gives the drawn boxes back
            np.testing.assert_array_equal(rec.labels, truth.labels[t])
            np.testing.assert_array_equal(rec.track_ids, truth.track_ids[t])
            # lossy H.264: the decoded frame is the drawn one up to compression noise
            assert np.abs(decoded[t].astype(int) - truth.frames[t]).mean() < 6
            assert np.array_equal(load_record_image(rec), decoded[t])
    # frames read out of order (reopens the file) give the same pixels
    assert np.array_equal(load_record_image(spec.records[1]), load_record_image(spec.records[1]))
    assert np.array_equal(load_record_image(spec.records[0]), read_video_frames(spec.records[0].path)[0].__next__())


def test_mot17_image_folder_layout(tmp_path, tiny_videos):
    import cv2

    seq = tmp_path / "MOT-01"
    (seq / "img1").mkdir(parents=True)
    (seq / "gt").mkdir()
    src = next(p for p in tiny_videos.iterdir() if p.is_dir())
    frames, _ = read_video_frames(src / f"{src.name}.mp4")
    for t, f in enumerate(frames):
        cv2.imwrite(str(seq / "img1" / f"{t + 1:06d}.png"), cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    # conf 0 = ignore (difficult); class missing = 1; boxes reaching outside are clipped
    (seq / "gt" / "gt.txt").write_text("1,4,11,21,10,8,1,2,1\n3,4,61,1,10,8,0,2,0.5\n2,5,1,1,5,5\n")
    spec = read_mot(seq, class_names=["person", "car"])
    assert len(spec.records) == 6 and spec.records[2].path == seq / "img1" / "000003.png"
    np.testing.assert_array_equal(spec.records[0].boxes, [[10, 20, 20, 28]])
    assert spec.records[0].labels.tolist() == [1] and spec.records[1].labels.tolist() == [0]
    assert spec.records[2].difficult.tolist() == [True]
    np.testing.assert_array_equal(spec.records[2].boxes, [[60, 0, 64, 8]])
    assert load_record_image(spec.records[2]).shape == (H, W, 3)


def _sequence(tmp_path: Path, tiny_videos: Path, gt: str) -> Path:
    import shutil

    src = next(p for p in sorted(tiny_videos.iterdir()) if p.is_dir())
    dst = tmp_path / "data"
    shutil.copytree(src, dst / src.name)
    shutil.copy(tiny_videos / "classes.txt", dst)
    (dst / src.name / "gt" / "gt.txt").write_text(gt)
    return dst


@pytest.mark.parametrize("gt, words", [
    ("1,1,5,5,10,10,1,1,1\n7,1,5,5,10,10,1,1,1\n", ["gt.txt:2", "frame 7", "1..6"]),
    ("1,1,5,5,10,-3,1,1,1\n", ["gt.txt:1", "negative size"]),
    ("1,1,5,5,10,10,1,1,1\n2,1,5,5,10,10,1,9,1\n", ["gt.txt:2", "class id 9"]),
    ("1,1,5,five,10,10,1,1,1\n", ["gt.txt:1", "expected"]),
])
def test_bad_gt_lines_are_named(tmp_path, tiny_videos, gt, words):
    root = _sequence(tmp_path, tiny_videos, gt)
    with pytest.raises(DataError) as err:
        read_mot(root)
    for w in words:
        assert w in str(err.value)
    spec = read_mot(root, on_error="skip")  # skip mode leaves the line out, keeps the frames
    assert len(spec.records) == 6 and spec.problems.errors


def test_corrupt_and_truncated_videos_are_named(tmp_path, tiny_videos):
    root = _sequence(tmp_path, tiny_videos, "1,1,5,5,10,10,1,1,1\n")
    video = next(root.glob("*/*.mp4"))
    data = video.read_bytes()
    video.write_bytes(b"\x00not a video at all" * 50)
    with pytest.raises(DataError, match=f"{video.name}.*not a readable video"):
        read_mot(root)
    # H.264 .mp4 written by PyAV keeps its index (moov) at the end: half a file has none
    video.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=video.name):
        read_mot(root)
    # index first, data cut: the header announces more frames than are stored
    moov, mdat = _split_mp4(data)
    assert moov is not None
    video.write_bytes(moov + mdat[: len(mdat) // 3])
    with pytest.raises(DataError, match=f"{video.name}: truncated video: the header announces 6 frames, [0-5] are stored"):
        read_mot(root)


def _split_mp4(data: bytes) -> tuple[bytes | None, bytes]:
    """(ftyp + moov boxes, mdat box) of a simple mp4, to build an index-first file by hand."""
    boxes, i = {}, 0
    while i + 8 <= len(data):
        size = int.from_bytes(data[i: i + 4], "big")
        kind = data[i + 4: i + 8].decode("latin-1")
        if size < 8:
            return None, b""
        boxes[kind] = data[i: i + size]
        i += size
    if not {"ftyp", "moov", "mdat"} <= boxes.keys():
        return None, b""
    return boxes["ftyp"] + boxes["moov"], boxes["mdat"]


def test_write_video_refuses_no_frames_and_mixed_sizes(tmp_path):
    with pytest.raises(ValueError, match="no frames"):
        write_video(tmp_path / "a.mp4", [], 10)
    with pytest.raises(ValueError, match="frame 1 has shape"):
        write_video(tmp_path / "b.mp4", [np.zeros((32, 32, 3), np.uint8), np.zeros((32, 30, 3), np.uint8)], 10)


def test_missing_class_names_and_missing_root(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_mot(tmp_path / "nope")
    (tmp_path / "s" / "gt").mkdir(parents=True)
    (tmp_path / "s" / "gt" / "gt.txt").write_text("")
    write_video(tmp_path / "s" / "v.mp4", [np.zeros((32, 32, 3), np.uint8)] * 2, 10)
    with pytest.raises(DataError, match="class names"):
        read_mot(tmp_path)


# ----------------------------------------------------------------------------- predict_video
@dataclass
class FakePrediction:
    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray


def test_predict_video_writes_every_frame(tmp_path):
    frames = [np.full((24, 32, 3), 10 * (t % 20), np.uint8) for t in range(100)]
    src = tmp_path / "in.mp4"
    assert write_video(src, frames, fps=25) == 100
    calls = []

    def fake(batch):
        calls.append(len(batch))
        return [FakePrediction(np.array([[2.0, 3.0, 12.0, 15.0], [0, 0, 5, 5]]), np.array([0.9, 0.1]),
                               np.array([1, 0])) for _ in batch]

    summary = predict_video(fake, ["a", "b"], src, tmp_path / "out", batch_size=16, threshold=0.5, progress=False)
    assert calls == [16] * 6 + [4]
    info = probe_video(summary["video"])
    assert (info.width, info.height, info.fps) == (32, 24, 25.0)
    assert count_frames(summary["video"]) == 100 == summary["frames"]
    js = json.loads(summary["json"].read_text())
    assert len(js["frames"]) == 100 and js["frames"][99]["frame"] == 99
    assert js["frames"][0]["detections"] == [{"box_xyxy": [2.0, 3.0, 12.0, 15.0], "score": 0.9, "label": 1,
                                              "class": "b"}]
    drawn = next(read_video_frames(summary["video"])[0])
    assert np.abs(drawn.astype(int) - frames[0]).max() > 50  # a box was drawn


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from onestage.config import load_config
    from onestage.engine.trainer import train

    out = tmp_path_factory.mktemp("run")
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "yolov1_shapes.yaml", [
        "model.input_size=64", "model.yolov1.hidden=16", "data.train.num_images=8", "data.val.num_images=2",
        "train.batch_size=4", "train.time_budget=null", "train.epochs=1", "schedule.warmup_steps=0",
        "precision.amp=true", f"train.out_dir={out}", "train.name=tiny",
    ])
    train(cfg, out / "tiny", progress=False)
    return out / "tiny" / "last.pt"


def test_cli_predict_on_a_video_writes_every_frame_with_the_api_detections(tmp_path, tiny_checkpoint):
    from onestage.api import load_detector
    from onestage.cli import main

    truth = render_video(np.random.default_rng(1), W, H, 100)
    src = tmp_path / "clip.mp4"
    write_video(src, truth.frames, fps=20)
    image = tmp_path / "still.png"
    import cv2

    cv2.imwrite(str(image), truth.frames[0][..., ::-1])
    out = tmp_path / "out"
    assert main(["predict", str(tiny_checkpoint), str(src), str(image), "--out", str(out), "--threshold", "0.01",
                 "--batch-size", "32", "eval.score_threshold=0"]) == 0
    video = out / "clip.annotated.mp4"
    info = probe_video(video)
    assert (info.width, info.height, info.fps, count_frames(video)) == (W, H, 20.0, 100)
    js = json.loads((out / "clip.detections.json").read_text())
    assert len(js["frames"]) == 100 and js["threshold"] == 0.01
    assert (out / "still.png").is_file()  # images next to videos keep working
    det = load_detector(tiny_checkpoint, overrides=["eval.score_threshold=0"])
    decoded = list(read_video_frames(src)[0])
    expected = det.predict(decoded[:3], threshold=0.01)
    for frame, pred in zip(js["frames"][:3], expected):
        assert [d["score"] for d in frame["detections"]] == [round(float(s), 4) for s in pred.scores]


def test_make_video_cli_and_eval_reports_stability(tmp_path, capsys):
    from onestage.build import build_detector, build_eval_dataset, read_dataset
    from onestage.cli import main
    from onestage.config import Config
    from onestage.engine.evaluate import evaluate
    from onestage.eval.evaluator import format_table, result_to_json
    from onestage.eval.stability_report import draw_worst_tracks

    assert main(["data", "make-video", "--out", str(tmp_path / "v"), "--videos", "1", "--frames", "5",
                 "--size", str(W), str(H)]) == 0
    cfg = Config.model_validate({
        "model": {"arch": "yolov1", "backbone": "tiny", "input_size": 64, "yolov1": {"grid": 2, "hidden": 16}},
        "data": {"val": {"format": "mot", "root": str(tmp_path / "v")}},
    })
    spec = read_dataset(cfg.data.val, cfg)
    ds = build_eval_dataset(cfg, spec, spec.class_names)
    detector = build_detector(cfg, spec.class_names)
    result, _ = evaluate(detector, ds, cfg, torch.device("cpu"), progress=False)
    for key in ("stability_fragment", "stability_center", "stability_scale_ratio", "stability_total"):
        assert key in result.metrics and key in result_to_json(result)
    assert len(result_to_json(result)["stability_per_threshold"]) == 9
    assert "stability error" in format_table(result)
    assert result.stability.num_tracks.sum() > 0
    paths = draw_worst_tracks(result.stability, tmp_path / "tracks", 2)
    assert paths and all(p.stat().st_size > 0 for p in paths)
