"""SV image validation, re-encoding and panorama crops (gair_dataset.svimage)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gair_dataset.svimage import (
    is_equirectangular,
    normalize_sv_image,
    pano_heading,
    panorama_crops,
    perspective_crop,
)


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def streetview(shared_data: Path) -> Path:
    return shared_data / "streetview"


def test_baseline_jpeg_kept_byte_identical(streetview: Path) -> None:
    data = (streetview / "exif_photos" / "lund" / "01.jpg").read_bytes()
    res = normalize_sv_image(data, max_side=1024)
    assert res.ok and not res.reencoded and res.jpeg is data
    assert (res.width, res.height) == (1024, 768) and not res.equirectangular


def test_large_photo_downscaled_and_reencoded(streetview: Path) -> None:
    data = (streetview / "exif_photos" / "berlin" / "01.jpg").read_bytes()
    res = normalize_sv_image(data, max_side=800)
    assert res.ok and res.reencoded and "800" in res.reason
    img = Image.open(io.BytesIO(res.jpeg))
    assert img.format == "JPEG" and img.mode == "RGB" and max(img.size) == 800
    assert img.size == (800, 600) and not img.info.get("progressive")


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda b: b[: len(b) // 3], "corrupt"),
        (lambda b: b"", "empty"),
        (lambda b: b"<html>not an image</html>" * 10, "not_an_image"),
        (lambda b: b[:2] + b"\x00" * 64, "not_an_image"),
    ],
)
def test_invalid_images_rejected(streetview: Path, mutate, reason: str) -> None:
    data = mutate((streetview / "exif_photos" / "lund" / "02.jpg").read_bytes())
    res = normalize_sv_image(data)
    assert not res.ok and res.jpeg is None and res.rejected_reason.startswith(reason), res.rejected_reason


def test_png_progressive_cmyk_reencoded() -> None:
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 48, 3), dtype=np.uint8), "RGB")
    png = io.BytesIO()
    rgb.save(png, "PNG")
    for data, why in ((png.getvalue(), "format PNG"), (_jpeg(rgb, progressive=True), "progressive"),
                      (_jpeg(rgb.convert("CMYK")), "mode CMYK"), (_jpeg(rgb.convert("L")), "mode L")):
        res = normalize_sv_image(data)
        assert res.ok and res.reencoded and why in res.reason, (why, res.reason)
        out = Image.open(io.BytesIO(res.jpeg))
        assert out.format == "JPEG" and out.mode == "RGB" and out.size == (48, 32)
        assert not out.info.get("progressive")


def test_exif_orientation_applied() -> None:
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = (255, 0, 0)  # left half red
    arr[:, 20:] = (0, 0, 255)  # right half blue
    img = Image.fromarray(arr, "RGB")
    exif = img.getexif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    res = normalize_sv_image(_jpeg(img, exif=exif.tobytes(), quality=95))
    assert res.reencoded and "orientation 6" in res.reason
    out = np.asarray(Image.open(io.BytesIO(res.jpeg)))
    assert out.shape == (40, 20, 3)  # portrait after rotation
    assert out[5, 10, 0] > 200 and out[5, 10, 2] < 60  # red is on top after a 90 cw turn
    assert out[35, 10, 2] > 200 and out[35, 10, 0] < 60
    assert Image.open(io.BytesIO(res.jpeg)).getexif().get(0x0112) in (None, 1)


def test_real_panoramas_detected(streetview: Path) -> None:
    for p in sorted((streetview / "panoramas").glob("*.jpg")):
        img = Image.open(p)
        assert is_equirectangular(img) and pano_heading(img) == 0.0
    assert not is_equirectangular(Image.open(streetview / "exif_photos" / "lund" / "01.jpg"))
    assert is_equirectangular(Image.new("RGB", (200, 100)))  # 2:1 without XMP
    assert not is_equirectangular(Image.new("RGB", (200, 120)))


def _lonlat_pano(w: int = 720) -> np.ndarray:
    """A float 'pano' whose two channels hold each pixel centre's lon and lat in degrees."""
    h = w // 2
    lon = (np.arange(w) + 0.5) / w * 360.0 - 180.0
    lat = 90.0 - (np.arange(h) + 0.5) / h * 180.0
    lo, la = np.meshgrid(lon, lat)
    return np.stack([lo, la], axis=-1).astype(np.float32)


@pytest.mark.parametrize(("heading", "pitch"), [(0, 0), (90, 0), (-45, 30), (135, -20)])
def test_perspective_crop_geometry(heading: float, pitch: float) -> None:
    pano = _lonlat_pano()
    view = perspective_crop(pano, heading_deg=heading, pitch_deg=pitch, fov_deg=90, out_size=(64, 48))
    assert view.shape == (48, 64, 2)
    centre = view[23:25, 31:33].mean(axis=(0, 1))
    assert centre[0] == pytest.approx(heading, abs=1.0)
    assert centre[1] == pytest.approx(pitch, abs=1.0)
    # horizontal fov: at pitch 0 the left/right edge centres are +-45 degrees from the heading
    if pitch == 0:
        assert view[24, 0, 0] == pytest.approx(heading - 45 + 90 / 64 / 2, abs=1.0)
        assert view[24, -1, 0] == pytest.approx(heading + 45 - 90 / 64 / 2, abs=1.0)


def test_crop_across_seam_is_continuous() -> None:
    rng = np.random.default_rng(0)
    smooth = np.cumsum(rng.normal(size=(100, 200, 3)), axis=1)
    smooth -= np.linspace(0, 1, 200)[None, :, None] * (smooth[:, -1:, :] - smooth[:, :1, :])  # periodic
    pano = np.clip(smooth * 5 + 128, 0, 255).astype(np.uint8)
    view = perspective_crop(pano, heading_deg=180, fov_deg=60, out_size=40).astype(np.float32)
    jumps = np.abs(np.diff(view, axis=1)).max()
    assert jumps < 40  # no tear where the pano wraps


def test_real_panorama_crops(streetview: Path) -> None:
    data = (streetview / "panoramas" / "1.jpg").read_bytes()
    crops = panorama_crops(data, headings=(0, 90, 180, 270), fov_deg=90, out_size=256)
    assert [h for h, _ in crops] == [0, 90, 180, 270]
    full = Image.open(io.BytesIO(data))
    full.draft("RGB", (720, 360))
    pano = np.asarray(full.convert("RGB")).astype(np.float32)
    H, W = pano.shape[:2]
    for heading, jpg in crops:
        img = Image.open(io.BytesIO(jpg))
        assert img.format == "JPEG" and img.size == (256, 256) and img.mode == "RGB"
        # the crop centre shows the pano at the heading's column on the horizon
        col = int(((heading + 180) % 360) / 360 * W)
        cols = np.arange(col - 3, col + 3) % W  # wraps at the seam (heading 180)
        ref = pano[H // 2 - 3:H // 2 + 3][:, cols].mean(axis=(0, 1))
        got = np.asarray(img, np.float32)[124:132, 124:132].mean(axis=(0, 1))
        assert np.abs(got - ref).max() < 25, (heading, got, ref)
    with pytest.raises(ValueError):
        panorama_crops((streetview / "exif_photos" / "lund" / "01.jpg").read_bytes())
