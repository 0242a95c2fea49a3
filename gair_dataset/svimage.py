"""Street-view image validation, normalisation and panorama-to-perspective crops.

* :func:`normalize_sv_image` validates bytes (``verify()`` then a full decode; truncated,
  non-image and zero-size data are rejected with a reason), keeps the original bytes when they
  already are a baseline RGB JPEG with no EXIF rotation within the size limits, and otherwise
  re-encodes (RGB, baseline, quality 90, EXIF orientation applied, optionally downscaled).
* :func:`is_equirectangular` detects 360 panoramas (XMP ``GPano:ProjectionType`` or a 2:1
  aspect ratio); :func:`perspective_crop` renders a pinhole view (field of view, heading, pitch,
  output size) by a vectorised gnomonic projection with bilinear sampling;
  :func:`panorama_crops` does both from JPEG bytes.
"""

from __future__ import annotations

import io
import math
import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

DEFAULT_QUALITY = 90
_ORIENTATION_TAG = 0x0112
_XMP_PROJECTION = re.compile(rb"ProjectionType(?:>|=\")\s*equirectangular", re.IGNORECASE)
_XMP_HEADING = re.compile(rb"PoseHeadingDegrees(?:>|=\")\s*(-?[0-9.]+)")


@dataclass
class SVImageResult:
    """A validated (and maybe re-encoded) street-view image.

    Attributes:
        jpeg: Baseline RGB JPEG bytes (None when rejected).
        width: Output width in pixels.
        height: Output height in pixels.
        reencoded: False when the original bytes were kept.
        reason: Why it was re-encoded (or None).
        rejected_reason: None if usable, else a short reason.
        source_format: PIL format of the input (``JPEG``, ``PNG``...).
        equirectangular: Whether the input looks like a 360 panorama.
    """

    jpeg: bytes | None
    width: int = 0
    height: int = 0
    reencoded: bool = False
    reason: str | None = None
    rejected_reason: str | None = None
    source_format: str | None = None
    equirectangular: bool = False

    @property
    def ok(self) -> bool:
        """True when the image is usable."""
        return self.rejected_reason is None


def read_image_uri(uri: str | os.PathLike[str], *, timeout: float = 30.0, max_bytes: int = 64 << 20) -> bytes:
    """Read image bytes from a local path, ``file://`` URI or http(s) URL.

    Args:
        uri: Where the image is.
        timeout: HTTP timeout in seconds.
        max_bytes: Refuse larger downloads.

    Returns:
        The raw bytes.

    Raises:
        OSError: If the file cannot be read or is too large.
    """
    s = str(uri)
    if s.startswith(("http://", "https://")):
        import requests

        with requests.get(s, timeout=timeout, stream=True) as r:
            r.raise_for_status()
            data = r.raw.read(max_bytes + 1, decode_content=True)
    else:
        path = Path(s[7:] if s.startswith("file://") else s)
        with open(path, "rb") as fh:
            data = fh.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise OSError(f"image larger than {max_bytes} bytes")
    return data


def _open_validated(data: bytes) -> tuple[Image.Image | None, str | None]:
    """Return a fully decoded image or a rejection reason."""
    if not data:
        return None, "empty: zero bytes"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            probe = Image.open(io.BytesIO(data))
            probe.verify()
            img = Image.open(io.BytesIO(data))
            img.load()
    except Image.DecompressionBombWarning as exn:
        return None, f"too_large: {exn}"
    except Image.UnidentifiedImageError:
        return None, "not_an_image: unidentified format"
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exn:
        return None, f"corrupt: {exn}"
    if img.width <= 0 or img.height <= 0:
        return None, "empty: zero-size image"
    return img, None


def image_problem(data: bytes) -> str | None:
    """Why ``data`` is not a usable image (empty, not an image, corrupt, too large), or None when it decodes."""
    img, reason = _open_validated(data)
    if img is not None:
        img.close()
    return reason


def is_equirectangular(img: Image.Image, *, aspect_tol: float = 0.01) -> bool:
    """Whether an image is a full 360 equirectangular panorama.

    True when its XMP says ``GPano:ProjectionType=equirectangular`` or, without XMP, when it has a
    2:1 aspect ratio.
    """
    xmp = img.info.get("xmp")
    if isinstance(xmp, str):
        xmp = xmp.encode("utf-8", "ignore")
    if xmp:
        return bool(_XMP_PROJECTION.search(xmp))
    return img.height > 0 and abs(img.width / img.height - 2.0) <= 2.0 * aspect_tol


def pano_heading(img: Image.Image) -> float:
    """Compass heading of the panorama's centre column (XMP ``GPano:PoseHeadingDegrees``, else 0)."""
    xmp = img.info.get("xmp")
    if isinstance(xmp, str):
        xmp = xmp.encode("utf-8", "ignore")
    m = _XMP_HEADING.search(xmp or b"")
    return float(m.group(1)) if m else 0.0


def encode_jpeg(img: Image.Image, quality: int = DEFAULT_QUALITY) -> bytes:
    """Encode as a baseline RGB JPEG without metadata (deterministic for a given Pillow)."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality, optimize=False, progressive=False)
    return buf.getvalue()


def normalize_sv_image(data: bytes, *, max_side: int | None = 1024, max_bytes: int | None = 4 << 20,
                       quality: int = DEFAULT_QUALITY) -> SVImageResult:
    """Validate an SV image; keep the original JPEG bytes when possible, else re-encode.

    Original bytes are kept when the image is a baseline (non-progressive) RGB JPEG, without an
    EXIF rotation, with its longest side <= ``max_side`` and size <= ``max_bytes``.

    Args:
        data: Encoded image bytes.
        max_side: Downscale so that the longest side is at most this (None: never).
        max_bytes: Re-encode originals larger than this (None: no limit).
        quality: JPEG quality for re-encoding.

    Returns:
        An :class:`SVImageResult`.
    """
    img, reason = _open_validated(data)
    if img is None:
        return SVImageResult(None, rejected_reason=reason)
    fmt = img.format
    equirect = is_equirectangular(img)
    orientation = img.getexif().get(_ORIENTATION_TAG, 1)
    why = []
    if fmt != "JPEG":
        why.append(f"format {fmt}")
    if img.mode != "RGB":
        why.append(f"mode {img.mode}")
    if img.info.get("progressive") or img.info.get("progression"):
        why.append("progressive")
    if orientation not in (1, None):
        why.append(f"exif orientation {orientation}")
    if max_side is not None and max(img.size) > max_side:
        why.append(f"larger than {max_side} px")
    if max_bytes is not None and len(data) > max_bytes:
        why.append(f"larger than {max_bytes} bytes")
    if not why:
        return SVImageResult(data, img.width, img.height, source_format=fmt, equirectangular=equirect)
    out = ImageOps.exif_transpose(img) if orientation not in (1, None) else img
    if out.mode != "RGB":
        out = out.convert("RGB")
    if max_side is not None and max(out.size) > max_side:
        scale = max_side / max(out.size)
        size = (max(1, round(out.width * scale)), max(1, round(out.height * scale)))
        out = out.resize(size, Image.Resampling.LANCZOS)
    return SVImageResult(encode_jpeg(out, quality), out.width, out.height, reencoded=True,
                         reason=", ".join(why), source_format=fmt, equirectangular=equirect)


def perspective_crop(pano: np.ndarray, *, heading_deg: float, pitch_deg: float = 0.0,
                     fov_deg: float = 90.0, out_size: int | tuple[int, int] = 512,
                     pano_heading_deg: float = 0.0) -> np.ndarray:
    """Render a pinhole (gnomonic) view of an equirectangular panorama.

    The panorama's centre column looks at compass heading ``pano_heading_deg``; columns increase
    eastwards (clockwise seen from above), rows go from +90 (top) to -90 degrees (bottom).

    Args:
        pano: ``H x W x C`` array (uint8 or float), ``W == 2 H`` for a full sphere.
        heading_deg: Compass heading of the view centre.
        pitch_deg: Elevation of the view centre (positive looks up).
        fov_deg: Horizontal field of view.
        out_size: ``size`` or ``(width, height)`` of the output.
        pano_heading_deg: Compass heading of the panorama's centre column.

    Returns:
        ``height x width x C`` array of ``pano``'s dtype (bilinear, wrapping across the seam).
    """
    w_out, h_out = (out_size, out_size) if isinstance(out_size, int) else out_size
    h_in, w_in = pano.shape[:2]
    f = (w_out / 2.0) / math.tan(math.radians(fov_deg) / 2.0)
    xs = (np.arange(w_out, dtype=np.float64) + 0.5 - w_out / 2.0)
    ys = -(np.arange(h_out, dtype=np.float64) + 0.5 - h_out / 2.0)
    x, y = np.meshgrid(xs, ys)
    z = np.full_like(x, f)
    # pitch: rotate about the camera x axis, then yaw about the vertical axis
    p = math.radians(pitch_deg)
    y2 = y * math.cos(p) + z * math.sin(p)
    z2 = -y * math.sin(p) + z * math.cos(p)
    yaw = math.radians(heading_deg - pano_heading_deg)
    x3 = x * math.cos(yaw) + z2 * math.sin(yaw)
    z3 = -x * math.sin(yaw) + z2 * math.cos(yaw)
    lon = np.arctan2(x3, z3)  # 0 at the pano centre, + to the east
    lat = np.arctan2(y2, np.hypot(x3, z3))
    u = (lon / (2.0 * math.pi) + 0.5) * w_in - 0.5
    v = (0.5 - lat / math.pi) * h_in - 0.5
    return _bilinear(pano, u, v)


def _bilinear(img: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Sample ``img`` at float pixel coordinates (u: column, wrapping; v: row, clamped)."""
    h, w = img.shape[:2]
    v = np.clip(v, 0.0, h - 1.0)
    u0f = np.floor(u)
    v0f = np.floor(v)
    du = (u - u0f).astype(np.float32)[..., None]
    dv = (v - v0f).astype(np.float32)[..., None]
    u0 = u0f.astype(np.intp) % w
    u1 = (u0 + 1) % w
    v0 = v0f.astype(np.intp)
    v1 = np.minimum(v0 + 1, h - 1)
    src = img if img.ndim == 3 else img[..., None]
    top = src[v0, u0].astype(np.float32) * (1 - du) + src[v0, u1].astype(np.float32) * du
    bot = src[v1, u0].astype(np.float32) * (1 - du) + src[v1, u1].astype(np.float32) * du
    out = top * (1 - dv) + bot * dv
    if np.issubdtype(img.dtype, np.integer):
        info = np.iinfo(img.dtype)
        out = np.clip(np.rint(out), info.min, info.max)
    out = out.astype(img.dtype)
    return out if img.ndim == 3 else out[..., 0]


def panorama_crops(data: bytes, *, headings: Sequence[float] = (0.0, 90.0, 180.0, 270.0),
                   pitch_deg: float = 0.0, fov_deg: float = 90.0, out_size: int = 512,
                   quality: int = DEFAULT_QUALITY, relative: bool = False) -> list[tuple[float, bytes]]:
    """Cut perspective JPEG views out of an equirectangular panorama.

    The panorama is decoded at the smallest JPEG DCT scale that still resolves the output.

    Args:
        data: Panorama JPEG bytes.
        headings: View headings in degrees (compass, or relative to the pano centre when
            ``relative``).
        pitch_deg: View elevation.
        fov_deg: Horizontal field of view.
        out_size: Output side length (square views).
        quality: JPEG quality.
        relative: Interpret ``headings`` relative to the panorama centre instead of using the
            XMP ``PoseHeadingDegrees``.

    Returns:
        ``(heading, jpeg_bytes)`` per heading.

    Raises:
        ValueError: If the bytes are not a valid equirectangular panorama.
    """
    img, reason = _open_validated(data)
    if img is None:
        raise ValueError(f"invalid panorama: {reason}")
    if not is_equirectangular(img):
        raise ValueError(f"not an equirectangular panorama ({img.width}x{img.height})")
    heading0 = 0.0 if relative else pano_heading(img)
    # the output samples the sphere at fov/out_size degrees per pixel: the pano needs >= that
    need_w = math.ceil(out_size * 360.0 / fov_deg)
    if img.format in ("JPEG", "MPO") and img.width > need_w:
        img = Image.open(io.BytesIO(data))
        img.draft("RGB", (need_w, need_w // 2))
    arr = np.asarray(img.convert("RGB"))
    out = []
    for h in headings:
        view = perspective_crop(arr, heading_deg=h, pitch_deg=pitch_deg, fov_deg=fov_deg, out_size=out_size,
                                pano_heading_deg=heading0)
        out.append((float(h), encode_jpeg(Image.fromarray(view, "RGB"), quality)))
    return out
