"""The one WebDataset loader for GAIR training samples (shared by the trainer and evaluation).

A batch is a dict::

    {"rs": float32 B x C x rs_size x rs_size,   # per-band clip to mean +- 2 std, rescaled to [0, 1]
     "sv": float32 B x 3 x sv_size x sv_size,   # ImageNet mean/std normalised RGB
     "lonlat": float32 B x 2,                   # (lon, lat) degrees
     "rel_xy": float32 B x 2,                   # (x, y) in [0, 1] from the tile's top-left
     "key": list[str], "meta": list[dict]}

Only ``rs.npy`` (``np.load(..., allow_pickle=False)``), ``sv.jpg`` (PIL) and ``json`` members
are read; every other member (``.pyd``, ``.pth``, ``.pickle``...) is skipped before its bytes
are even read, so nothing is ever unpickled or ``torch.load``-ed from a shard.

Geometry is never augmented on RS (no flips/rotations: they would break the geo-alignment);
optional RS colour jitter (``rs_train_aug``). SV training augmentation: horizontal flip and colour
jitter (``sv_train_aug``). SV images are resized (shorter side) and centre-cropped to
``sv_size``; JPEGs much larger than the target are decoded at reduced DCT scale
(``Image.draft``), which dominates the speed-up.

Object storage: a shard-set location may be any fsspec URL (``s3://bucket/prefix/<region>/``, see
:mod:`gair_dataset.object_store`): its ``shards.json`` is read through fsspec (no ``shards.json``: no set) and each
tar is streamed through fsspec, credentials from the environment.

Epochs: with ``resampled=True`` (training) the stream is infinite: pass ``epoch_samples`` to
make each ``iter(loader)`` yield ``ceil(epoch_samples / batch_size / max(1, num_workers))``
batches per worker (the open_clip arithmetic); ``loader.num_batches`` says how many that is in
total. Multi-GPU: each rank reads a different shard stream (``wds.split_by_node`` and
rank-dependent seeds); with ``resampled=False`` give at least ``world_size * max(1,
num_workers)`` shards or some workers see none.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import math
import os
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import webdataset as wds
from PIL import Image

from gair_dataset import object_store
from gair_dataset.bands import default_stats
from gair_dataset.contract import (  # decode_npy, SampleDecodeError: also part of the loader API
    JSON_MEMBER,
    MEMBER_SUFFIXES,
    RS_MEMBER,
    SV_MEMBER,
    SampleDecodeError,
    UnsafeMemberError,
    check_member_name,
    decode_npy,
)

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ALLOWED_MEMBERS = MEMBER_SUFFIXES


class LoaderConfigError(ValueError):
    """The loader configuration does not fit the data (e.g. band count); never skipped."""


# --------------------------------------------------------------------------------------------
# shard list
# --------------------------------------------------------------------------------------------
def resolve_shards(shards: str | os.PathLike[str] | Sequence[str]) -> list[str]:
    """Expand a shard specification into a list of shard URLs/paths.

    Args:
        shards: A folder (its ``shards.json`` if complete, else its ``*.tar``); a published shard set
            (``s3://bucket/prefix/<region>/``, any fsspec URL not ending in ``.tar``: its ``shards.json``, which
            must exist); a glob (``dir/train-*.tar``); a brace pattern (``dir/train-{000000..000009}.tar``); a
            path/URL; or a list of any of these (e.g. the shard-set folders of several regions).

    Returns:
        Shard paths/URLs in a deterministic order.

    Raises:
        FileNotFoundError: If the specification matches no shard.
    """
    if not isinstance(shards, (str, os.PathLike)):
        out = [path for spec in shards for path in resolve_shards(spec)]
    else:
        spec = str(shards)
        if os.path.isdir(spec):
            sj = Path(spec) / "shards.json"
            if sj.exists():
                out = [str(Path(spec) / s["path"]) for s in json.loads(sj.read_text())["shards"]]
            else:
                out = sorted(glob.glob(os.path.join(spec, "*.tar")))
        elif any(c in spec for c in "*?[") and "://" not in spec:
            out = sorted(glob.glob(spec))
        elif object_store.is_url(spec) and not spec.endswith(".tar") and "{" not in spec:
            out = object_store.shard_urls(spec)  # FileNotFoundError when no set is published there
        else:
            out = list(wds.shardlists.expand_urls(spec))
    if not out:
        raise FileNotFoundError(f"no shards found for {shards!r}")
    return out


class _FsspecOpen(wds.cache.StreamingOpen):
    """WebDataset's opener stage, with remote URLs (``s3://`` and every other fsspec scheme) streamed by fsspec.

    Local paths and ``pipe:`` specs go to WebDataset as before. Each remote stream is closed once its shard has
    been read; an open error goes to the dataset's handler like any other shard error.
    """

    def __call__(self, urls: Iterator[Any]) -> Iterator[dict[str, Any]]:
        for item in urls:
            url = item["url"] if isinstance(item, dict) else item
            if not object_store.is_url(url):
                yield from super().__call__([url])
                continue
            try:
                stream = object_store.open_url(url)
            except OSError as exn:  # open_url reports every failure as an OSError, credentials masked
                if self.handler(exn):
                    continue
                break
            try:
                yield {"url": url, "stream": stream}
            finally:
                stream.close()


def _webdataset(urls: list[str], **kw: Any) -> wds.WebDataset:
    """``wds.WebDataset(urls, **kw)`` whose shards are opened by :class:`_FsspecOpen`."""
    ds = wds.WebDataset(urls, **kw)
    handler = kw.get("handler", wds.reraise_exception)
    openers = [i for i, stage in enumerate(ds.pipeline) if type(stage) is wds.cache.StreamingOpen]
    if len(openers) != 1:  # a WebDataset release that builds its pipeline differently
        raise RuntimeError(f"expected one StreamingOpen stage in the WebDataset pipeline, found {len(openers)}")
    ds.pipeline[openers[0]] = _FsspecOpen(handler=handler)
    return ds


def _select_member(fname: str, allowed: Sequence[str] = ALLOWED_MEMBERS) -> bool:
    """Tar member filter: only bare ``<key>.rs.npy``, ``<key>.sv.jpg``, ``<key>.json`` names are read.

    A name with a folder, an absolute path, a ``..`` component or a key off ``[A-Za-z0-9_-]+``
    (:func:`gair_dataset.contract.check_member_name`) is refused with a warning before its bytes are read.
    Links (hard or symbolic), devices and other non-regular members never reach this filter: WebDataset drops
    them, and the sample they belonged to is then skipped as incomplete (``missing members``). Nothing is
    extracted to disk either way.
    """
    try:
        _, suffix = check_member_name(fname)
    except UnsafeMemberError as exn:
        log.warning("skipping bad tar member: %s", exn)
        return False
    return suffix.lower() in allowed


def _select_stats_member(fname: str) -> bool:
    return _select_member(fname, (RS_MEMBER, JSON_MEMBER))


def _skip_bad_sample(exn: Exception) -> bool:
    """WebDataset handler: log and skip data errors, re-raise configuration errors."""
    if isinstance(exn, LoaderConfigError):
        raise exn
    log.warning("skipping bad sample/shard: %s: %s", type(exn).__name__, exn)
    return True


# --------------------------------------------------------------------------------------------
# decoding
# --------------------------------------------------------------------------------------------
SV_RESIZE_MODES: tuple[str, ...] = ("crop", "full")
"""``sv_resize`` values: ``crop`` (shorter side + centre crop, ours) or ``full`` (whole image, the authors')."""


def decode_sv(data: bytes, size: int, *, flip: bool = False, mode: str = "crop") -> np.ndarray:
    """Decode a JPEG into a ``size x size x 3`` uint8 array.

    ``mode="crop"`` (ours): shorter-side resize + centre crop, the aspect ratio is kept and the
    sides of a wide image are lost. ``mode="full"`` (the authors'): the whole image is resized to
    ``size x size`` (aspect not kept, nothing cropped). Large JPEGs are decoded at a reduced DCT
    scale (``Image.draft``) that still keeps both sides >= ``size``, then resized with PIL's
    antialiasing bilinear filter in one step (with the crop box for ``crop``).

    Args:
        data: Encoded image bytes.
        size: Output side length.
        flip: Mirror horizontally.
        mode: ``crop`` or ``full``.

    Returns:
        ``H x W x 3`` uint8 RGB array.
    """
    if mode not in SV_RESIZE_MODES:
        raise LoaderConfigError(f"sv_resize must be one of {SV_RESIZE_MODES}, got {mode!r}")
    try:
        img: Image.Image = Image.open(io.BytesIO(data))
        if img.format == "JPEG":
            img.draft("RGB", (size, size))
        if img.mode != "RGB":
            img = img.convert("RGB")
        w, h = img.size
        if mode == "full":
            img = img.resize((size, size), Image.Resampling.BILINEAR)
        else:
            s = min(w, h)
            left, top = (w - s) / 2.0, (h - s) / 2.0
            img = img.resize((size, size), Image.Resampling.BILINEAR, box=(left, top, left + s, top + s))
        if flip:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return np.asarray(img)
    except Exception as exn:
        raise SampleDecodeError(f"bad sv.jpg: {exn}") from exn


class RSNormalizer:
    """Per-band clip to ``mean +- 2 std`` and rescale to [0, 1].

    With explicit ``stats`` the same bounds apply to every sample; otherwise bounds come from
    :data:`gair_dataset.bands.DEFAULT_BAND_STATS` looked up by the sample's band names.
    """

    def __init__(self, n_bands: int, stats: Mapping[str, Sequence[float]] | None = None) -> None:
        """Set up the normaliser.

        Args:
            n_bands: Expected number of bands.
            stats: ``{"mean": [...], "std": [...]}`` with ``n_bands`` values each, or None.
        """
        self.n_bands = n_bands
        self._fixed = self._bounds(stats["mean"], stats["std"]) if stats is not None else None
        self._cache: dict[tuple[str, ...], tuple[np.ndarray, np.ndarray]] = {}

    def _bounds(self, mean: Sequence[float], std: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
        mean_a = np.asarray(mean, dtype=np.float32).reshape(-1, 1, 1)
        std_a = np.asarray(std, dtype=np.float32).reshape(-1, 1, 1)
        if mean_a.shape[0] != self.n_bands or std_a.shape[0] != self.n_bands:
            raise LoaderConfigError(
                f"rs_stats have {mean_a.shape[0]} means / {std_a.shape[0]} stds, expected {self.n_bands}"
            )
        if np.any(std_a <= 0):
            raise LoaderConfigError("rs_stats std must be > 0")
        lo = mean_a - 2.0 * std_a
        return lo, (1.0 / (4.0 * std_a)).astype(np.float32)

    def __call__(self, rs: np.ndarray, bands: Sequence[str] | None) -> np.ndarray:
        """Normalise a ``C x H x W`` array to float32 in [0, 1]."""
        if rs.ndim != 3 or rs.shape[0] != self.n_bands:
            raise LoaderConfigError(f"rs has shape {rs.shape}, expected {self.n_bands} bands (rs_bands)")
        if self._fixed is not None:
            lo, scale = self._fixed
        else:
            if not bands:
                raise LoaderConfigError("sample has no 'bands' and no rs_stats were given")
            key = tuple(bands)
            if key not in self._cache:
                try:
                    st = default_stats(key)
                except KeyError as exn:
                    raise LoaderConfigError(str(exn)) from None
                self._cache[key] = self._bounds(st["mean"], st["std"])
            lo, scale = self._cache[key]
        out = rs.astype(np.float32)
        out -= lo
        out *= scale
        np.clip(out, 0.0, 1.0, out=out)
        return out


RS_RESIZE_MODES: tuple[str, ...] = ("bilinear", "bicubic")
"""``rs_resize`` values: ``bilinear`` (ours) or ``bicubic`` (the authors')."""


def resize_rs(x: np.ndarray, size: int, mode: str = "bilinear") -> np.ndarray:
    """Resize a ``C x H x W`` float32 array to ``C x size x size`` (``F.interpolate``, antialiased when shrinking).

    ``bilinear`` (ours) keeps values inside the input range; ``bicubic`` (the authors') is
    sharper but can overshoot [0, 1] slightly near edges (not clipped, as torchvision's bicubic
    ``Resize`` of float tensors). A chip already at ``size`` is returned unchanged.

    Args:
        x: ``C x H x W`` float32 array.
        size: Output side length.
        mode: ``bilinear`` or ``bicubic``.

    Returns:
        ``C x size x size`` float32 array.
    """
    if mode not in RS_RESIZE_MODES:
        raise LoaderConfigError(f"rs_resize must be one of {RS_RESIZE_MODES}, got {mode!r}")
    if x.shape[1] == size and x.shape[2] == size:
        return x
    t = torch.from_numpy(x)[None]
    antialias = size < x.shape[1] or size < x.shape[2]
    return F.interpolate(t, size=(size, size), mode=mode, align_corners=False,
                         antialias=antialias)[0].numpy()


def _worker_rng(seed: int, epoch: int, salt: int) -> np.random.Generator:
    rank, _, worker, _ = wds.utils.pytorch_worker_info()
    return np.random.default_rng([seed, rank, worker, epoch, salt])


class _SeededStage(wds.PipelineStage):
    """Pipeline stage whose RNG depends on (seed, rank, worker, epoch): reproducible, not repeated."""

    def __init__(self, fn: Callable[[Iterator[dict], np.random.Generator], Iterator[Any]], seed: int,
                 salt: int) -> None:
        self.fn, self.seed, self.salt, self.epoch = fn, seed, salt, -1

    def run(self, src: Iterator[dict]) -> Iterator[Any]:
        self.epoch += 1
        return self.fn(src, _worker_rng(self.seed, self.epoch, self.salt))


MAX_CONSECUTIVE_SKIPS = 50_000
"""A resampled (infinite) stream that skips this many samples in a row raises instead of hanging."""


def _parse_and_select(splits: tuple[str, ...] | None,
                      max_skips: int | None = None) -> Callable[[Iterator[dict]], Iterator[dict]]:
    """Stage: check members, parse the json, keep only the requested splits."""
    wanted = set(splits) if splits is not None else None

    def stage(src: Iterator[dict]) -> Iterator[dict]:
        skipped = 0
        for raw in src:
            if max_skips is not None and skipped >= max_skips:
                raise LoaderConfigError(
                    f"{skipped} samples in a row were skipped (bad, or not in splits={splits}): "
                    "no usable samples in these shards?"
                )
            skipped += 1
            key = raw.get("__key__", "?")
            try:
                missing = [m for m in ALLOWED_MEMBERS if m not in raw]
                if missing:
                    raise SampleDecodeError(f"{key}: missing members {missing} (links, devices and unsafe "
                                            "names are never read)")
                meta = json.loads(raw[JSON_MEMBER])
                if not isinstance(meta, dict):
                    raise SampleDecodeError(f"{key}: json is not an object")
            except (SampleDecodeError, ValueError, UnicodeDecodeError) as exn:
                _skip_bad_sample(exn)
                continue
            if wanted is not None and meta.get("split") not in wanted:
                continue
            skipped = 0
            yield {"__key__": key, "rs": raw[RS_MEMBER], "sv": raw[SV_MEMBER], "meta": meta}

    return stage


RS_JITTER_MODES: tuple[str, ...] = ("all_bands", "three_bands")
"""``rs_jitter`` values: ``all_bands`` (ours) or ``three_bands`` (the authors')."""

RS_JITTER_STRENGTHS: tuple[float, float, float] = (0.4, 0.4, 0.4)
"""Brightness / contrast / saturation strengths of ``three_bands`` (DESIGN.md gives none: torchvision's usual 0.4)."""


def _color_jitter_rs(x: np.ndarray, rng: np.random.Generator, strength: float = 0.2, *, mode: str = "all_bands",
                     bands: Sequence[str] | None = None, p: float = 0.7) -> np.ndarray:
    """Colour jitter of a normalised ``C x H x W`` RS chip in [0, 1] (never a geometry change).

    * ``all_bands`` (ours): brightness and contrast (``+-strength``) of every band, always applied.
    * ``three_bands`` (the authors'): with probability ``p``, a torchvision-style ``ColorJitter``
      (brightness, contrast, saturation, strengths :data:`RS_JITTER_STRENGTHS`, in a random order,
      clamped to [0, 1] after each) of the RGB bands only: ``B04``/``B03``/``B02`` (or
      ``red``/``green``/``blue``) found in the sample's band names, else the first three bands
      read as ``B02, B03, B04`` (the GAIR band order). Every other band is left untouched.

    Args:
        x: Normalised chip (modified in place for ``all_bands``).
        rng: The stage's seeded generator.
        strength: ``all_bands`` strength.
        mode: ``all_bands`` or ``three_bands``.
        bands: The sample's band names (``three_bands``), or None.
        p: Probability of applying ``three_bands`` (``all_bands`` always applies).

    Returns:
        The jittered chip.
    """
    if mode == "all_bands":
        b = rng.uniform(1 - strength, 1 + strength)
        c = rng.uniform(1 - strength, 1 + strength)
        m = x.mean(axis=(1, 2), keepdims=True)
        x = (x - m) * c + m * b
        return np.clip(x, 0.0, 1.0, out=x)
    if mode != "three_bands":
        raise LoaderConfigError(f"rs_jitter must be one of {RS_JITTER_MODES}, got {mode!r}")
    if rng.random() >= p:
        return x
    names = [str(n) for n in bands] if bands else []
    idx: list[int] = []
    for aliases in (("B04", "red"), ("B03", "green"), ("B02", "blue")):
        idx.extend(names.index(a) for a in aliases if a in names)
    if len(idx) != 3:
        idx = [2, 1, 0]  # first three bands, in the GAIR order B02, B03, B04
    rgb = x[idx].astype(np.float32)  # R, G, B copy
    factors = [rng.uniform(max(0.0, 1 - s), 1 + s) for s in RS_JITTER_STRENGTHS]
    weights = np.array([0.2989, 0.587, 0.114], dtype=np.float32).reshape(3, 1, 1)  # torchvision rgb_to_grayscale
    for op in rng.permutation(3):
        f = np.float32(factors[op])
        if op == 0:  # brightness
            rgb = rgb * f
        elif op == 1:  # contrast: blend with the mean grey level
            rgb = f * rgb + (1 - f) * (rgb * weights).sum(axis=0).mean()
        else:  # saturation: blend with the grey image
            rgb = f * rgb + (1 - f) * (rgb * weights).sum(axis=0, keepdims=True)
        np.clip(rgb, 0.0, 1.0, out=rgb)
    out = x.copy()
    out[idx] = rgb
    return out


def _select_date(rs: np.ndarray, meta: dict, rng: np.random.Generator, draw: bool) -> tuple[np.ndarray, dict]:
    """One date of a multi-date ``rs.npy`` (``D x C x H x W``, see ``gair_dataset.contract.rs_dates``).

    Training (``draw``) draws the date with the stage's seeded ``rng`` (one draw per multi-date sample);
    otherwise date 0 (the least cloudy). A single-date ``C x H x W`` array and its meta pass unchanged
    (nothing is drawn); a multi-date sample's meta gains ``date_index`` and ``date`` (that date's entry of
    the json ``dates`` list, or None).
    """
    if rs.ndim != 4:
        return rs, meta
    if rs.shape[0] < 1:
        raise SampleDecodeError(f"rs.npy has no date: shape {rs.shape}")
    i = int(rng.integers(rs.shape[0])) if draw else 0
    dates = meta.get("dates")
    date = dates[i] if isinstance(dates, list) and i < len(dates) else None
    return rs[i], {**meta, "date_index": i, "date": date}


def _make_decoder(rs_size: int, sv_size: int, normalizer: RSNormalizer, sv_train_aug: bool,
                  rs_train_aug: bool, *, rs_resize: str = "bilinear", rs_jitter: str = "all_bands",
                  rs_jitter_p: float = 0.7,
                  sv_resize: str = "crop") -> Callable[[Iterator[dict], np.random.Generator], Iterator[dict]]:
    for name, value, allowed in (("rs_resize", rs_resize, RS_RESIZE_MODES), ("rs_jitter", rs_jitter, RS_JITTER_MODES),
                                 ("sv_resize", sv_resize, SV_RESIZE_MODES)):
        if value not in allowed:
            raise LoaderConfigError(f"{name} must be one of {allowed}, got {value!r}")
    if not 0.0 <= rs_jitter_p <= 1.0:
        raise LoaderConfigError(f"rs_jitter_p must be in [0, 1], got {rs_jitter_p}")

    def stage(src: Iterator[dict], rng: np.random.Generator) -> Iterator[dict]:
        for s in src:
            key, meta = s["__key__"], s["meta"]
            try:
                try:
                    lonlat = (float(meta["lon"]), float(meta["lat"]))
                    rel_xy = (float(meta["x"]), float(meta["y"]))
                except (KeyError, TypeError, ValueError) as exn:
                    raise SampleDecodeError(f"{key}: json lacks lon/lat/x/y: {exn}") from None
                rs = decode_npy(s["rs"])
                if rs.dtype.kind not in "ui":
                    raise SampleDecodeError(f"{key}: rs.npy dtype {rs.dtype} is not integer")
                rs, meta = _select_date(rs, meta, rng, rs_train_aug)  # D x C x H x W: one date per read
                rs_f = resize_rs(normalizer(rs, meta.get("bands")), rs_size, rs_resize)
                if rs_train_aug:
                    rs_f = _color_jitter_rs(rs_f, rng, mode=rs_jitter, bands=meta.get("bands"), p=rs_jitter_p)
                flip = bool(sv_train_aug and rng.random() < 0.5)
                sv = decode_sv(s["sv"], sv_size, flip=flip, mode=sv_resize)
            except SampleDecodeError as exn:
                _skip_bad_sample(exn)
                continue
            yield {"key": key, "meta": meta, "rs": rs_f, "sv": sv, "lonlat": lonlat, "rel_xy": rel_xy}

    return stage


class _Collate:
    """Stack samples; SV uint8 -> float, optional colour jitter, ImageNet normalisation, once per batch."""

    def __init__(self, sv_train_aug: bool, seed: int) -> None:
        self.sv_train_aug = sv_train_aug
        self.seed = seed
        self._rng: np.random.Generator | None = None
        self.mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1)

    def _jitter(self, sv: torch.Tensor) -> None:
        if self._rng is None:
            self._rng = _worker_rng(self.seed, 0, 7)
        b = sv.shape[0]
        f = torch.from_numpy(self._rng.uniform(0.6, 1.4, size=(3, b)).astype(np.float32)).view(3, b, 1, 1, 1)
        sv.mul_(f[0])  # brightness
        gray = (0.299 * sv[:, 0] + 0.587 * sv[:, 1] + 0.114 * sv[:, 2]).unsqueeze(1)
        m = gray.mean(dim=(2, 3), keepdim=True)
        sv.sub_(m).mul_(f[1]).add_(m)  # contrast
        gray = (0.299 * sv[:, 0] + 0.587 * sv[:, 1] + 0.114 * sv[:, 2]).unsqueeze(1)
        sv.sub_(gray).mul_(f[2]).add_(gray)  # saturation
        sv.clamp_(0.0, 1.0)

    def __call__(self, samples: list[dict]) -> dict[str, Any]:
        sv_u8 = torch.from_numpy(np.stack([s["sv"] for s in samples]))  # B H W 3
        sv = torch.empty((sv_u8.shape[0], 3, sv_u8.shape[1], sv_u8.shape[2]), dtype=torch.float32)
        sv.copy_(sv_u8.permute(0, 3, 1, 2))
        if self.sv_train_aug:
            sv.mul_(1.0 / 255.0)
            self._jitter(sv)
            sv.sub_(self.mean).div_(self.std)
        else:
            sv.mul_(1.0 / (255.0 * self.std)).sub_(self.mean / self.std)
        return {
            "rs": torch.from_numpy(np.stack([s["rs"] for s in samples])),
            "sv": sv,
            "lonlat": torch.tensor([s["lonlat"] for s in samples], dtype=torch.float32),
            "rel_xy": torch.tensor([s["rel_xy"] for s in samples], dtype=torch.float32),
            "key": [s["key"] for s in samples],
            "meta": [s["meta"] for s in samples],
        }


def _shuffle_stage(bufsize: int) -> Callable[[Iterator[dict], np.random.Generator], Iterator[dict]]:
    def stage(src: Iterator[dict], rng: np.random.Generator) -> Iterator[dict]:
        py_rng = random.Random(int(rng.integers(0, 2**63 - 1)))
        return wds.filters._shuffle(src, bufsize, min(bufsize, 100), py_rng)

    return stage


def _identity(batch: Any) -> Any:
    return batch


# --------------------------------------------------------------------------------------------
# public builder
# --------------------------------------------------------------------------------------------
def build_dataset(shards: str | list[str], *, batch_size: int, rs_size: int, sv_size: int, rs_bands: int = 10,
                  resampled: bool = True, shuffle_buffer: int = 1000, seed: int = 0,
                  splits: tuple[str, ...] | None = None, rs_stats: dict | None = None,
                  sv_train_aug: bool = False, rs_train_aug: bool = False,
                  batches_per_worker: int | None = None, split_by_node: bool = True,
                  rs_resize: str = "bilinear", rs_jitter: str = "all_bands", rs_jitter_p: float = 0.7,
                  sv_resize: str = "crop") -> wds.WebDataset:
    """Build the batched WebDataset pipeline behind :func:`build_loader` (see there for arguments).

    Args:
        shards: Shard specification (see :func:`resolve_shards`).
        batch_size: Samples per batch.
        rs_size: Output RS side length.
        sv_size: Output SV side length.
        rs_bands: Expected number of RS bands.
        resampled: Sample shards with replacement forever (training) instead of one pass.
        shuffle_buffer: Sample shuffle buffer (0 or 1 disables shuffling).
        seed: Seed for shard order, sample shuffling and augmentation.
        splits: Keep only samples whose json ``split`` is in this tuple.
        rs_stats: ``{"mean": [...], "std": [...]}`` per band, or None for the defaults.
        sv_train_aug: SV horizontal flip + colour jitter.
        rs_train_aug: RS colour jitter (never geometry), as ``rs_jitter`` says.
        batches_per_worker: If set, each worker yields exactly this many batches per epoch.
        split_by_node: Give each distributed rank its own shards (training); ``False`` reads every shard
            whatever ``RANK``/``WORLD_SIZE`` say (evaluation must see the whole set).
        rs_resize: RS resize filter, ``bilinear`` (ours) or ``bicubic`` (the authors').
        rs_jitter: RS colour jitter with ``rs_train_aug``: ``all_bands`` (ours) or ``three_bands`` (the authors').
        rs_jitter_p: Probability of the ``three_bands`` jitter (the authors: 0.7).
        sv_resize: ``crop`` (ours) or ``full`` (the authors'), see :func:`decode_sv`.

    Returns:
        A ``wds.WebDataset`` yielding collated batch dicts.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    urls = resolve_shards(shards)
    shuffle_on = shuffle_buffer > 1
    ds = _webdataset(
        urls,
        handler=_skip_bad_sample,
        resampled=resampled,
        # Resampling already randomises the shard stream; otherwise shuffle the shard list per epoch.
        shardshuffle=False if (resampled or not shuffle_on) else max(len(urls), 1),
        detshuffle=True,
        nodesplitter=wds.split_by_node if split_by_node else None,
        workersplitter=wds.split_by_worker,
        select_files=_select_member,
        empty_check=False,
        seed=seed,
    )
    if resampled:
        # Replace WebDataset's time-seeded resampler by a reproducible one: the stream depends
        # only on (seed, rank, worker, epoch).
        ds.pipeline[0] = wds.ResampledShards(urls, seed=seed, deterministic=True)
    normalizer = RSNormalizer(rs_bands, rs_stats)
    ds.append(_parse_and_select(tuple(splits) if splits is not None else None,
                                MAX_CONSECUTIVE_SKIPS if resampled else None))
    if shuffle_on:
        ds.append(_SeededStage(_shuffle_stage(shuffle_buffer), seed, salt=1))
    ds.append(_SeededStage(_make_decoder(rs_size, sv_size, normalizer, sv_train_aug, rs_train_aug,
                                         rs_resize=rs_resize, rs_jitter=rs_jitter, rs_jitter_p=rs_jitter_p,
                                         sv_resize=sv_resize),
                           seed, salt=2))
    ds.append(wds.batched(batch_size, collation_fn=_Collate(sv_train_aug, seed), partial=not resampled))
    if batches_per_worker is not None:
        ds = ds.with_epoch(batches_per_worker)
    return ds


def build_loader(shards: str | list[str], *, batch_size: int, rs_size: int, sv_size: int, rs_bands: int = 10,
                 resampled: bool = True, shuffle_buffer: int = 1000, num_workers: int = 0, seed: int = 0,
                 splits: tuple[str, ...] | None = None, epoch_samples: int | None = None,
                 rs_stats: dict | None = None, sv_train_aug: bool = False,
                 rs_train_aug: bool = False, split_by_node: bool = True, rs_resize: str = "bilinear",
                 rs_jitter: str = "all_bands", rs_jitter_p: float = 0.7, sv_resize: str = "crop") -> wds.WebLoader:
    """Build the training/evaluation loader over GAIR WebDataset shards.

    Args:
        shards: Shard paths/URLs, a brace pattern, a glob, or a shard-set folder.
        batch_size: Samples per batch (batching happens inside the workers).
        rs_size: RS chips are resized (``rs_resize``, antialiased) to ``rs_size x rs_size``.
        sv_size: SV images are resized to ``sv_size x sv_size`` (``sv_resize``).
        rs_bands: Expected number of RS bands (checked on every sample).
        resampled: Training mode: infinite stream of shards drawn with replacement, partial
            batches dropped. ``False``: one pass over the shards, last partial batch kept.
        shuffle_buffer: Sample shuffle buffer size (<= 1: no shuffling, shards read in order).
        num_workers: DataLoader worker processes.
        seed: Seed for shard order, shuffling and augmentation (per rank/worker/epoch).
        splits: Keep only these splits, e.g. ``("train",)``.
        epoch_samples: Samples per epoch for this rank (rounded up to whole batches per worker);
            required to end an epoch when ``resampled=True``.
        rs_stats: ``{"mean": [...], "std": [...]}`` (``rs_bands`` values each, DN units); None
            uses the documented Sentinel-2 L2A defaults selected by the samples' band names.
        sv_train_aug: SV horizontal flip + colour jitter.
        rs_train_aug: RS colour jitter (``rs_jitter``); never flips or rotations.
        split_by_node: Split the shards between distributed ranks (``False`` for evaluation: every shard).
        rs_resize: ``bilinear`` (ours, default) or ``bicubic`` (the authors'), see :func:`resize_rs`.
        rs_jitter: ``all_bands`` (ours, default: brightness/contrast of every band, always) or
            ``three_bands`` (the authors': colour jitter of the RGB bands with probability
            ``rs_jitter_p``), see :func:`_color_jitter_rs`. Only with ``rs_train_aug``.
        rs_jitter_p: Probability of the ``three_bands`` jitter (0.7, the authors').
        sv_resize: ``crop`` (ours, default: shorter side + centre crop, aspect kept) or ``full``
            (the authors': the whole image to ``sv_size x sv_size``, aspect not kept).

    Returns:
        A ``wds.WebLoader`` of batch dicts (``rs``, ``sv``, ``lonlat``, ``rel_xy``, ``key``,
        ``meta``); ``loader.num_batches``/``loader.num_samples`` are set when
        ``epoch_samples`` is given (else None).
    """
    per_worker = None
    n_batches = None
    if epoch_samples is not None:
        workers = max(1, num_workers)
        per_worker = max(1, math.ceil(epoch_samples / (batch_size * workers)))
        n_batches = per_worker * workers
    ds = build_dataset(
        shards, batch_size=batch_size, rs_size=rs_size, sv_size=sv_size, rs_bands=rs_bands,
        resampled=resampled, shuffle_buffer=shuffle_buffer, seed=seed, splits=splits, rs_stats=rs_stats,
        sv_train_aug=sv_train_aug, rs_train_aug=rs_train_aug, batches_per_worker=per_worker,
        split_by_node=split_by_node, rs_resize=rs_resize, rs_jitter=rs_jitter, rs_jitter_p=rs_jitter_p,
        sv_resize=sv_resize,
    )
    kw: dict[str, Any] = {}
    if num_workers > 0:
        kw.update(persistent_workers=True, prefetch_factor=2)
    # batches are collated inside the dataset: no DataLoader collation/conversion on top
    loader = wds.WebLoader(ds, batch_size=None, shuffle=False, num_workers=num_workers,
                           collate_fn=_identity, **kw)
    loader.num_batches = n_batches
    loader.num_samples = None if n_batches is None else n_batches * batch_size
    return loader


def compute_rs_stats(shards: str | list[str], *, max_samples: int = 2000, bands: int | None = None,
                     splits: Sequence[str] | None = ("train",)) -> dict[str, list[float]]:
    """Per-band mean and std (DN) over the ``rs.npy`` members of some shards.

    Use the result as ``rs_stats`` in :func:`build_loader`. Nodata pixels (0) are ignored. Only samples of
    ``splits`` count (the train split by default: statistics of held-out samples must not shape training).

    Args:
        shards: Shard specification (see :func:`resolve_shards`).
        max_samples: Stop after this many samples (shards are read in order).
        bands: Expected band count (checked) or None.
        splits: Samples whose json ``split`` is one of these (``None``: every sample).

    Returns:
        ``{"mean": [...], "std": [...]}``.
    """
    wanted = set(splits) if splits is not None else None
    ds = _webdataset(resolve_shards(shards), shardshuffle=False, nodesplitter=None, workersplitter=None,
                        select_files=_select_stats_member, handler=_skip_bad_sample,
                        empty_check=False)
    if wanted is not None:
        ds = ds.select(lambda raw: JSON_MEMBER in raw and json.loads(raw[JSON_MEMBER]).get("split") in wanted)
    total: np.ndarray | None = None
    sq = cnt = np.zeros(0)  # sized with ``total`` at the first sample
    for i, raw in enumerate(ds):
        if i >= max_samples:
            break
        if RS_MEMBER not in raw:
            continue
        a = decode_npy(raw[RS_MEMBER]).astype(np.float64)
        if a.ndim == 4:  # D x C x H x W (several dates): every date's pixels count
            a = a.swapaxes(0, 1)
        if bands is not None and a.shape[0] != bands:
            raise LoaderConfigError(f"{raw['__key__']}: {a.shape[0]} bands, expected {bands}")
        a = a.reshape(a.shape[0], -1)
        valid = a > 0
        if total is None:
            total, sq, cnt = (np.zeros(a.shape[0]) for _ in range(3))
        total += np.where(valid, a, 0).sum(1)
        sq += np.where(valid, a * a, 0).sum(1)
        cnt += valid.sum(1)
    if total is None:
        raise ValueError(f"no rs.npy members found (splits {list(splits) if splits is not None else 'any'})")
    cnt = np.maximum(cnt, 1)
    mean = total / cnt
    std = np.sqrt(np.maximum(sq / cnt - mean**2, 1e-6))
    return {"mean": mean.tolist(), "std": std.tolist()}
