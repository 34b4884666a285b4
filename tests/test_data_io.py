"""Image reading (every PIL mode, EXIF orientation, lying extensions, bad files) and safe_join."""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image

from onestage.data.record import ImageRecord
from onestage.data.io import image_size, load_image, load_record_image, safe_join
from onestage.data.problems import DataError

DATASETS = Path(__file__).resolve().parents[1] / ".." / "shared" / "datasets"


def _quadrants(width: int = 40, height: int = 20) -> np.ndarray:
    """Left half red, right half blue: orientation changes are visible in the corners."""
    rgb = np.zeros((height, width, 3), dtype=np.uint8)
    rgb[:, : width // 2] = (255, 0, 0)
    rgb[:, width // 2 :] = (0, 0, 255)
    return rgb


def _save_with_orientation(path: Path, rgb: np.ndarray, orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(rgb).save(path, format="JPEG", quality=95, exif=exif.tobytes())


# --------------------------------------------------------------------------- modes
def test_rgb_png_round_trips_exactly(tmp_path: Path) -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (7, 9, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    out = load_image(tmp_path / "a.png")
    assert out.dtype == np.uint8 and out.shape == (7, 9, 3)
    np.testing.assert_array_equal(out, rgb)


def test_grayscale_is_repeated_on_three_channels(tmp_path: Path) -> None:
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    Image.fromarray(gray, mode="L").save(tmp_path / "g.png")
    out = load_image(tmp_path / "g.png")
    assert out.shape == (3, 4, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], gray)


def test_palette_image_gives_palette_colours(tmp_path: Path) -> None:
    img = Image.new("P", (4, 2))
    img.putpalette([255, 0, 0, 0, 255, 0] + [0] * (256 * 3 - 6))
    img.putdata([0, 1, 1, 0, 1, 1, 0, 0])
    img.save(tmp_path / "p.png")
    out = load_image(tmp_path / "p.png")
    assert out[0, 0].tolist() == [255, 0, 0]
    assert out[0, 1].tolist() == [0, 255, 0]
    assert out[1, 3].tolist() == [255, 0, 0]


def test_palette_with_transparency_reads_without_warning(tmp_path: Path) -> None:
    img = Image.new("P", (3, 3), 1)
    img.putpalette([10, 20, 30, 200, 100, 50] + [0] * (256 * 3 - 6))
    img.info["transparency"] = 0
    img.save(tmp_path / "pt.png", transparency=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = load_image(tmp_path / "pt.png")
    assert out[1, 1].tolist() == [200, 100, 50]


def test_rgba_drops_alpha_keeping_colour(tmp_path: Path) -> None:
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[..., :3] = (12, 34, 56)
    rgba[0, 0, 3] = 0  # fully transparent pixel keeps its stored colour, as cv2.imread does
    rgba[1, 1, 3] = 255
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    out = load_image(tmp_path / "a.png")
    assert out.shape == (2, 2, 3)
    assert out[0, 0].tolist() == [12, 34, 56] and out[1, 1].tolist() == [12, 34, 56]


def test_cmyk_converts_to_rgb(tmp_path: Path) -> None:
    # CMYK (0, 255, 255, 0) is pure red; (0, 0, 0, 255) is black.
    cmyk = np.array([[[0, 255, 255, 0], [0, 0, 0, 255]]], dtype=np.uint8)
    Image.fromarray(cmyk, mode="CMYK").save(tmp_path / "c.tif")
    out = load_image(tmp_path / "c.tif")
    assert out[0, 0].tolist() == [255, 0, 0]
    assert out[0, 1].tolist() == [0, 0, 0]


def test_16bit_grayscale_is_scaled_not_clipped(tmp_path: Path) -> None:
    # round(v * 255 / 65535): 0 -> 0, 128 -> 0, 129 -> 1, 257 * 100 -> 100, 65535 -> 255.
    values = np.array([[0, 128, 129, 25700, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "d.png")
    assert Image.open(tmp_path / "d.png").mode.startswith("I")
    out = load_image(tmp_path / "d.png")
    assert out[0, :, 0].tolist() == [0, 0, 1, 100, 255]
    np.testing.assert_array_equal(out[..., 0], out[..., 2])


@settings(max_examples=25, deadline=None)
@given(arrays(np.uint16, st.tuples(st.integers(1, 5), st.integers(1, 5))))
def test_16bit_scaling_property(tmp_path_factory: pytest.TempPathFactory, values: np.ndarray) -> None:
    path = tmp_path_factory.mktemp("u16") / "x.png"
    Image.fromarray(values).save(path)
    out = load_image(path)[..., 0].astype(np.float64)
    assert np.abs(out - values.astype(np.float64) * 255 / 65535).max() <= 0.5 + 1e-9


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    rgb = _quadrants(40, 20)  # stored 40 wide, 20 high; left red, right blue
    _save_with_orientation(tmp_path / "r6.jpg", rgb, 6)  # 6: display rotated 90 deg clockwise
    assert image_size(tmp_path / "r6.jpg") == (20, 40)
    out = load_image(tmp_path / "r6.jpg")
    assert out.shape == (40, 20, 3)
    # Rotating clockwise brings the stored left (red) to the top, the right (blue) to the bottom.
    assert out[5, 10, 0] > 200 and out[5, 10, 2] < 60
    assert out[35, 10, 2] > 200 and out[35, 10, 0] < 60

    _save_with_orientation(tmp_path / "r3.jpg", rgb, 3)  # 3: rotated 180 deg, size unchanged
    assert image_size(tmp_path / "r3.jpg") == (40, 20)
    out3 = load_image(tmp_path / "r3.jpg")
    assert out3.shape == (20, 40, 3)
    assert out3[10, 5, 2] > 200 and out3[10, 35, 0] > 200  # left is now blue, right red


def test_extension_that_lies_reads_by_content(tmp_path: Path) -> None:
    rgb = _quadrants(16, 8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=95)
    (tmp_path / "really_a_jpeg.png").write_bytes(buf.getvalue())
    (tmp_path / "honest.jpg").write_bytes(buf.getvalue())
    out = load_image(tmp_path / "really_a_jpeg.png")
    np.testing.assert_array_equal(out, load_image(tmp_path / "honest.jpg"))
    assert image_size(tmp_path / "really_a_jpeg.png") == (16, 8)


@pytest.mark.datasets
def test_real_grayscale_photo_reads_as_rgb() -> None:
    # raccoon holds 3 grayscale JPEGs; whichever the first is, it must come back (H, W, 3).
    images = sorted((DATASETS / "raccoon" / "images").glob("*.jpg"))
    gray = next(p for p in images if Image.open(p).mode == "L")
    out = load_image(gray)
    w, h = Image.open(gray).size
    assert out.shape == (h, w, 3)
    np.testing.assert_array_equal(out[..., 0], out[..., 1])


# --------------------------------------------------------------------------- bad files
def test_missing_file_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope\.jpg: image file not found"):
        load_image(tmp_path / "nope.jpg")
    with pytest.raises(DataError, match=r"nope\.jpg: image file not found"):
        image_size(tmp_path / "nope.jpg")


def test_garbage_bytes_name_the_file(tmp_path: Path) -> None:
    (tmp_path / "bad.jpg").write_bytes(b"this is not an image at all" * 10)
    with pytest.raises(DataError, match=r"bad\.jpg: not a readable image"):
        load_image(tmp_path / "bad.jpg")


def test_truncated_jpeg_fails_on_decode_not_on_header(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, format="JPEG")
    (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    # The header is intact: the cheap size read succeeds (it does not decode pixels)...
    assert image_size(tmp_path / "cut.jpg") == (64, 64)
    # ...and the full decode names the file and the problem.
    with pytest.raises(DataError, match=r"cut\.jpg: corrupt image \(JPEG data\)"):
        load_image(tmp_path / "cut.jpg")


def test_training_set_skips_an_image_truncated_after_its_header(tmp_path: Path) -> None:
    from onestage.data.base import DetectionDataset
    from onestage.data.transforms import EvalTransform

    rng = np.random.default_rng(2)
    records = []
    for name in ("a", "cut", "c"):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(buf, format="JPEG")
        data = buf.getvalue()
        (tmp_path / f"{name}.jpg").write_bytes(data[: len(data) // 2] if name == "cut" else data)
        records.append(ImageRecord(image_id=name, width=64, height=48, boxes=[[1, 2, 30, 40]], labels=[0],
                                   path=tmp_path / f"{name}.jpg"))
    strict = DetectionDataset(records, ["x"], EvalTransform(32))
    with pytest.raises(DataError, match=r"cut\.jpg: corrupt image"):
        strict[1]
    lenient = DetectionDataset(records, ["x"], EvalTransform(32), skip_unreadable=True)
    with pytest.warns(UserWarning, match=r"cut\.jpg: corrupt image .*skipped \(data\.on_error: skip\)"):
        sample = lenient[1]
    assert sample["index"] == 2  # the next readable image stands in, and says which it is
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per file, not every epoch
        assert lenient[1]["index"] == 2 and lenient[0]["index"] == 0
    all_bad = DetectionDataset(records[1:2], ["x"], EvalTransform(32), skip_unreadable=True)
    with pytest.warns(UserWarning), pytest.raises(DataError, match="no readable image left"):
        all_bad[0]


def test_load_record_image(tmp_path: Path) -> None:
    held = np.full((2, 3, 3), 7, dtype=np.uint8)
    rec = ImageRecord(image_id=0, width=3, height=2, boxes=np.zeros((0, 4)), labels=np.zeros(0), image=held)
    assert load_record_image(rec) is held

    Image.fromarray(_quadrants(10, 6)).save(tmp_path / "q.png")
    empty = {"boxes": np.zeros((0, 4)), "labels": np.zeros(0), "path": tmp_path / "q.png"}
    ok = ImageRecord(image_id="q", width=10, height=6, **empty)
    assert load_record_image(ok).shape == (6, 10, 3)
    stale = ImageRecord(image_id="q", width=6, height=10, **empty)
    with pytest.raises(DataError, match=r"q\.png: image is 10x6 but its record says 6x10"):
        load_record_image(stale)


# --------------------------------------------------------------------------- safe_join
def test_safe_join_accepts_paths_inside(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    assert safe_join(tmp_path, "a/x.jpg") == (tmp_path / "a" / "x.jpg").resolve()
    assert safe_join(tmp_path, "a/../b.jpg") == (tmp_path / "b.jpg").resolve()


@pytest.mark.parametrize("bad", ["../x.jpg", "a/../../x.jpg", "/etc/passwd", "..\\..\\x.jpg", "C:/x.jpg"])
def test_safe_join_refuses_escapes(tmp_path: Path, bad: str) -> None:
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(DataError, match=str(root.name)) as info:
        safe_join(root, bad)
    assert repr(bad) in str(info.value)  # the message quotes the offending path
    assert "outside the dataset root" in str(info.value) or "absolute" in str(info.value)


def test_safe_join_refuses_symlink_out(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "secret.jpg").write_bytes(b"x")
    os.symlink(tmp_path / "secret.jpg", root / "link.jpg")
    os.symlink(root / "inside.jpg", root / "ok_link.jpg")
    with pytest.raises(DataError, match="outside the dataset root"):
        safe_join(root, "link.jpg")
    assert safe_join(root, "ok_link.jpg") == (root / "inside.jpg").resolve()
