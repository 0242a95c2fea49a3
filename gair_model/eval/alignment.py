"""Geo-alignment benchmark: does the model know *where* inside its RS tile a street-view image was taken.

Three families of metrics, all on the samples of one or more shard sets (by default their ``test`` split):

* **Retrieval** among the samples (L2-normalised cosine): SV -> RS (gallery: the localised RS embeddings
  ``rs_local`` of all samples; a hit is the sample's own pair), RS -> SV, SV -> location and RS -> location
  (gallery: the location embeddings of all sample locations). Recall@1/5/10, median rank (1-based), the tile-level
  hit rate (the top item comes from the query's tile: several SV share a tile) and, for locations, the
  great-circle error of the best gallery location.
* **In-tile localisation**: the model's localiser is queried on a dense grid of positions inside the sample's own
  tile (cell centres of a ``grid x grid`` lattice, ``(x, y)`` in [0, 1] from the top-left); the position whose
  localised RS embedding is most similar to the SV embedding is the prediction. Errors in tile fractions, tile
  pixels and metres, next to the trivial baseline that always answers the tile centre.
* **Offset robustness**: the same metrics binned by the SV's distance from the tile centre (:data:`RING_EDGES`).

Ties are handled explicitly. Retrieval ranks use the expected rank under random tie-breaking (items within
:data:`TIE_TOL` of the positive's score count as tied), so a localiser that cannot tell positions apart gets chance
level, not a lucky rank 1. In-tile localisation takes the first maximum in row-major order, except when *all*
positions score within :data:`TIE_TOL` of each other (``mean``/``centre`` localisers): then it answers the tile
centre and flags the sample ``degenerate``.

:func:`run_alignment_benchmark` returns the JSON-ready summary; :func:`benchmark_alignment` also returns the
per-sample table and similarity maps (for plots, see :mod:`gair_model.eval.alignment_plots`);
:func:`evaluate_alignment` runs everything on embeddings that are already computed.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd
import torch
from pyproj import Geod
from torch import nn
from torch.nn import functional as F

from gair_model.eval.loading import LoadedModel, ShardEmbeddings, embed_shards
from gair_model.loader import resolve_shards
from gair_model.models.nili import NILI, GridSampleLocalizer, rel_xy_to_query

#: Ring edges of the offset-robustness bins: distance of the SV from the tile centre, in tile fractions.
RING_EDGES: tuple[float, ...] = (0.0, 0.1, 0.2, 0.3, 0.4, math.sqrt(0.5))
#: Scores closer than this are treated as tied.
TIE_TOL = 1e-6
#: Mean Earth radius (km) for great-circle distances.
EARTH_RADIUS_KM = 6371.0088
#: Recall cut-offs.
RECALL_KS: tuple[int, ...] = (1, 5, 10)

_GEOD = Geod(ellps="WGS84")
_UTM_ID = re.compile(r"-r(?P<res>[0-9]+(?:p[0-9]+)?)-p(?P<px>[0-9]+)-")


# ------------------------------------------------------------------------------------------------
# small helpers
# ------------------------------------------------------------------------------------------------
def _num(value: Any) -> float | None:
    """A JSON-safe float (``None`` for NaN/inf/None)."""
    if value is None:
        return None
    f = float(value)
    return f if math.isfinite(f) else None


def l2_normalise(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows of ``x`` scaled to unit L2 norm (zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


def cosine_scores(query: np.ndarray, gallery: np.ndarray) -> np.ndarray:
    """``Q x G`` cosine similarities between the rows of ``query`` and ``gallery``."""
    return l2_normalise(query) @ l2_normalise(gallery).T


def great_circle_km(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Haversine distance (km) between ``(lon, lat)`` degree pairs (rows of ``a`` and ``b``, broadcast)."""
    a, b = np.radians(np.asarray(a, dtype=np.float64)), np.radians(np.asarray(b, dtype=np.float64))
    dlon, dlat = b[..., 0] - a[..., 0], b[..., 1] - a[..., 1]
    h = np.sin(dlat / 2) ** 2 + np.cos(a[..., 1]) * np.cos(b[..., 1]) * np.sin(dlon / 2) ** 2
    return 2 * EARTH_RADIUS_KM * np.arcsin(np.sqrt(np.clip(h, 0.0, 1.0)))


# ------------------------------------------------------------------------------------------------
# retrieval
# ------------------------------------------------------------------------------------------------
def retrieval_ranks(scores: np.ndarray, positives: np.ndarray | None = None, *,
                    tol: float = TIE_TOL) -> tuple[np.ndarray, np.ndarray]:
    """How each query's positive ranks among the gallery.

    Args:
        scores: ``Q x G`` similarities.
        positives: Gallery index of each query's positive (default: ``arange(Q)``, the own pair).
        tol: Scores within ``tol`` of the positive's score count as tied.

    Returns:
        ``(better, tied)``: per query, the number of gallery items scoring strictly better than the positive and
        the number of *other* items tied with it. Under random tie-breaking the positive's rank is uniform on
        ``better + 1 .. better + tied + 1``.
    """
    scores = np.asarray(scores, dtype=np.float64)
    q = scores.shape[0]
    pos = np.arange(q) if positives is None else np.asarray(positives, dtype=np.int64)
    pos_score = scores[np.arange(q), pos][:, None]
    better = (scores > pos_score + tol).sum(axis=1)
    tied = (np.abs(scores - pos_score) <= tol).sum(axis=1) - 1
    return better.astype(np.int64), tied.astype(np.int64)


def recall_at_k(better: np.ndarray, tied: np.ndarray, k: int) -> np.ndarray:
    """Per-query probability that the positive is in the top ``k`` (random tie-breaking)."""
    return np.clip((k - better) / (tied + 1.0), 0.0, 1.0)


def expected_rank(better: np.ndarray, tied: np.ndarray) -> np.ndarray:
    """Per-query expected 1-based rank of the positive (random tie-breaking)."""
    return better + 1.0 + tied / 2.0


def top1_group_hit(scores: np.ndarray, query_groups: Sequence[Any], gallery_groups: Sequence[Any], *,
                   tol: float = TIE_TOL) -> tuple[np.ndarray, np.ndarray]:
    """Per query: whether the best gallery item is from the query's group (e.g. tile), and the chance level.

    Args:
        scores: ``Q x G`` similarities.
        query_groups: Group label of each query.
        gallery_groups: Group label of each gallery item.
        tol: Items within ``tol`` of the best score share the top (the hit is averaged over them).

    Returns:
        ``(hit, chance)``: the fraction of the top-scoring items from the query's group, and the fraction of the
        whole gallery from that group (what a random ranking would give).
    """
    scores = np.asarray(scores, dtype=np.float64)
    _, qg = np.unique(np.asarray(list(query_groups) + list(gallery_groups), dtype=object).astype(str),
                      return_inverse=True)
    qg, gg = qg[: scores.shape[0]], qg[scores.shape[0]:]
    same = qg[:, None] == gg[None, :]
    top = scores >= scores.max(axis=1, keepdims=True) - tol
    return (same & top).sum(axis=1) / top.sum(axis=1), same.mean(axis=1)


def summarise_ranks(better: np.ndarray, tied: np.ndarray, ks: Sequence[int] = RECALL_KS) -> dict[str, Any]:
    """Recall@k, median and mean rank of per-query ``(better, tied)`` counts (see :func:`retrieval_ranks`)."""
    n = int(len(better))
    if n == 0:
        return {"n": 0, **{f"recall@{k}": None for k in ks}, "median_rank": None, "mean_rank": None}
    ranks = expected_rank(better, tied)
    out: dict[str, Any] = {"n": n}
    out.update({f"recall@{k}": float(recall_at_k(better, tied, k).mean()) for k in ks})
    out["median_rank"] = float(np.median(ranks))
    out["mean_rank"] = float(ranks.mean())
    return out


def retrieval_metrics(query: np.ndarray, gallery: np.ndarray, *, positives: np.ndarray | None = None,
                      query_groups: Sequence[Any] | None = None, gallery_groups: Sequence[Any] | None = None,
                      ks: Sequence[int] = RECALL_KS, tol: float = TIE_TOL) -> dict[str, Any]:
    """Cross-modal retrieval metrics with L2-normalised cosine similarity.

    Args:
        query: ``Q x E`` query embeddings.
        gallery: ``G x E`` gallery embeddings.
        positives: Gallery index of each query's positive (default: the own pair, ``arange(Q)``).
        query_groups: Group (tile) of each query; with ``gallery_groups`` adds the group-level hit rate.
        gallery_groups: Group (tile) of each gallery item.
        ks: Recall cut-offs.
        tol: Tie tolerance on the scores.

    Returns:
        ``{"n", "recall@1", "recall@5", "recall@10", "median_rank", "mean_rank", "chance_recall@1"}`` plus
        ``"tile_hit@1"`` and ``"tile_chance@1"`` when groups are given.
    """
    scores = cosine_scores(query, gallery)
    better, tied = retrieval_ranks(scores, positives, tol=tol)
    out = summarise_ranks(better, tied, ks)
    out["chance_recall@1"] = 1.0 / scores.shape[1] if scores.shape[1] else None
    if query_groups is not None and gallery_groups is not None and len(better):
        hit, chance = top1_group_hit(scores, query_groups, gallery_groups, tol=tol)
        out["tile_hit@1"] = float(hit.mean())
        out["tile_chance@1"] = float(chance.mean())
    return out


def location_retrieval(query: np.ndarray, loc_gallery: np.ndarray, lonlat: np.ndarray, *,
                       ks: Sequence[int] = RECALL_KS, tol: float = TIE_TOL) -> tuple[dict[str, Any], np.ndarray]:
    """Geolocate each query by its most similar location embedding among the sample locations.

    Args:
        query: ``N x E`` query embeddings (SV or localised RS); query ``i`` belongs at ``lonlat[i]``.
        loc_gallery: ``N x E`` location embeddings of ``lonlat``.
        lonlat: ``N x 2`` (lon, lat) degrees of the gallery (and true query) locations.
        ks: Recall cut-offs (the own location is the positive).
        tol: Tie tolerance (the predicted location is the first of tied maxima).

    Returns:
        ``(summary, error_km)``: recall@k, ranks, ``median_error_km``, ``mean_error_km``, ``within_1km``
        (share of queries whose predicted location is at most 1 km away), ``chance_median_error_km`` (a random
        gallery pick) and ``best_constant_median_error_km`` (the one gallery location closest, in median, to all
        queries: an encoder that ignores its input can score this); and the per-query errors.
    """
    scores = cosine_scores(query, loc_gallery)
    better, tied = retrieval_ranks(scores, tol=tol)
    out = summarise_ranks(better, tied, ks)
    if not len(better):
        return {**out, "median_error_km": None, "mean_error_km": None, "within_1km": None}, np.zeros(0)
    lonlat = np.asarray(lonlat, dtype=np.float64)
    err = great_circle_km(lonlat, lonlat[scores.argmax(axis=1)])
    # Chance levels on this gallery: a random gallery pick, and the best single answer given to every query.
    n = len(lonlat)
    sub = np.arange(n) if n <= 4000 else np.random.default_rng(0).choice(n, 4000, replace=False)
    dist = great_circle_km(lonlat[sub][:, None, :], lonlat[sub][None, :, :])
    out.update({"median_error_km": float(np.median(err)), "mean_error_km": float(err.mean()),
                "within_1km": float((err <= 1.0).mean()),
                "chance_median_error_km": float(np.median(dist)),
                "best_constant_median_error_km": float(np.median(dist, axis=0).min())})
    return out, err


# ------------------------------------------------------------------------------------------------
# tile geometry
# ------------------------------------------------------------------------------------------------
def _utm_pixel_geometry(meta: Mapping[str, Any]) -> tuple[float, float, float] | None:
    """``(width_px, height_px, resolution_m)`` of a UTM tile from explicit fields or its tile id."""
    res = meta.get("resolution")
    w_px = meta.get("tile_px") or meta.get("rs_width")
    h_px = meta.get("tile_px") or meta.get("rs_height")
    m = _UTM_ID.search(str(meta.get("tile_id", "")))
    if m and res is None:
        res = float(m["res"].replace("p", "."))
    if m and w_px is None:
        w_px = h_px = int(m["px"])
    if res is None or w_px is None or h_px is None:
        return None
    return float(w_px), float(h_px), float(res)


def _is_utm(meta: Mapping[str, Any]) -> bool:
    crs = str(meta.get("crs") or "").upper()
    return meta.get("grid") == "utm" or bool(re.fullmatch(r"EPSG:32[67][0-9]{2}", crs))


def tile_ground_size_m(meta: Mapping[str, Any]) -> tuple[float, float]:
    """Ground width and height (metres) of a sample's RS tile.

    * UTM tiles (``grid == "utm"`` or a UTM ``crs``): ``tile_px x resolution``, from the sample's ``tile_px`` /
      ``rs_width`` / ``rs_height`` and ``resolution`` fields or from the UTM tile id (``...-r10-p96-...``); the CRS
      units are metres.
    * Otherwise (XYZ Web-Mercator tiles in EPSG:3857, or lon/lat tiles) the tile is axis-aligned in lon/lat: the
      WGS84 geodesic length of the bbox's mid-latitude parallel (width) and mid-longitude meridian (height), i.e.
      the Mercator size times ``cos(latitude)`` up to the ellipsoid's ~0.3 %. A UTM tile without pixel
      information also lands here (its lon/lat bbox slightly overestimates it).

    Args:
        meta: The sample JSON (``bbox`` = ``[lon_min, lat_max, lon_max, lat_min]``, ``crs``, ``grid``, ...).

    Returns:
        ``(width_m, height_m)``; ``(nan, nan)`` when the sample has no usable geometry.
    """
    if _is_utm(meta):
        geom = _utm_pixel_geometry(meta)
        if geom is not None:
            w_px, h_px, res = geom
            return w_px * res, h_px * res
    bbox = meta.get("bbox")
    if not bbox or len(bbox) != 4:
        return math.nan, math.nan
    lon_min, lat_max, lon_max, lat_min = (float(v) for v in bbox)
    lat_c, lon_c = (lat_max + lat_min) / 2.0, (lon_min + lon_max) / 2.0
    width = _GEOD.inv(lon_min, lat_c, lon_max, lat_c)[2]
    height = _GEOD.inv(lon_c, lat_min, lon_c, lat_max)[2]
    return float(width), float(height)


def fraction_error_m(dxy: np.ndarray, size_m: np.ndarray) -> np.ndarray:
    """Metres of a tile-fraction error ``(dx, dy)`` on tiles of ``(width_m, height_m)``: ``hypot(dx*W, dy*H)``."""
    dxy, size_m = np.asarray(dxy, dtype=np.float64), np.asarray(size_m, dtype=np.float64)
    return np.hypot(dxy[..., 0] * size_m[..., 0], dxy[..., 1] * size_m[..., 1])


def read_tile_pixels(shards: str | os.PathLike[str] | Sequence[str]) -> dict[str, tuple[int, int]]:
    """``key -> (rs_width, rs_height)`` from the ``manifest.parquet`` beside the shards (when present)."""
    out: dict[str, tuple[int, int]] = {}
    spec = shards if isinstance(shards, (str, os.PathLike)) else list(shards)
    folders = dict.fromkeys(Path(p).parent for p in resolve_shards(spec) if "://" not in p)
    for folder in folders:
        path = folder / "manifest.parquet"
        if not path.is_file():
            continue
        try:
            df = pd.read_parquet(path, columns=["key", "rs_width", "rs_height"])
        except (ValueError, KeyError, OSError):
            continue
        out.update({str(k): (int(w), int(h)) for k, w, h in df.itertuples(index=False)})
    return out


def tile_pixel_sizes(meta: Sequence[Mapping[str, Any]], keys: Sequence[str],
                     manifest: Mapping[str, tuple[int, int]] | None,
                     default_px: int | None) -> tuple[np.ndarray, str]:
    """``N x 2`` tile sizes in pixels ``(width, height)`` and where they came from.

    Order of preference per sample: the sample JSON's ``rs_width``/``rs_height``, the manifest, ``default_px``
    (the chip size fed to the model), NaN. The source is ``"sample"``, ``"manifest"``, ``"model_input"``,
    ``"unknown"`` or ``"mixed"``.
    """
    sizes = np.zeros((len(keys), 2), dtype=np.float64)
    sources = set()
    for i, (k, m) in enumerate(zip(keys, meta, strict=True)):
        if m.get("rs_width") and m.get("rs_height"):
            sizes[i], src = (m["rs_width"], m["rs_height"]), "sample"
        elif manifest and k in manifest:
            sizes[i], src = manifest[k], "manifest"
        elif default_px:
            sizes[i], src = (default_px, default_px), "model_input"
        else:
            sizes[i], src = (math.nan, math.nan), "unknown"
        sources.add(src)
    return sizes, (sources.pop() if len(sources) == 1 else "mixed" if sources else "none")


# ------------------------------------------------------------------------------------------------
# in-tile localisation
# ------------------------------------------------------------------------------------------------
def query_grid(n: int = 48) -> np.ndarray:
    """Cell centres of an ``n x n`` lattice over the tile: ``(n*n) x 2`` (x, y) in [0, 1], row-major (y outer)."""
    c = (np.arange(n, dtype=np.float64) + 0.5) / n
    yy, xx = np.meshgrid(c, c, indexing="ij")
    return np.stack([xx.ravel(), yy.ravel()], axis=-1)


def _dense_nili(loc: NILI, grid: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """NILI at every query for every grid, using the linearity of its decoder (``B x Q x E``)."""
    _, d, h, w = grid.shape
    feat = NILI.unfold(grid).flatten(2)  # B x 9D x HW
    weight, bias = loc.decoder.weight, loc.decoder.bias
    w_z, w_d = weight[:, : 9 * d], weight[:, 9 * d:]
    cell_pred = torch.einsum("ek,bkn->bne", w_z.to(feat.dtype), feat)  # B x HW x E: Linear(z) of every cell
    q = q.to(feat.dtype)
    neighbours = loc.neighbours(q, h, w)
    preds = []
    for col, row, off in neighbours:
        offset_term = off.to(feat.dtype) @ w_d.T.to(feat.dtype)
        if bias is not None:
            offset_term = offset_term + bias.to(feat.dtype)
        preds.append(cell_pred[:, row * w + col] + offset_term[None])  # B x Q x E
    if not loc.local_ensemble:
        return preds[0]
    weights = loc.blend_weights([off for _, _, off in neighbours]).to(feat.dtype)  # Q x 4
    # typeshed's sum() adds the int start (0) to the result type; preds is never empty here.
    return cast(torch.Tensor, sum(pred * weights[None, :, i : i + 1] for i, pred in enumerate(preds)))


def _dense_grid_sample(loc: GridSampleLocalizer, grid: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """A grid-sample baseline at every query for every grid (``B x Q x E``)."""
    b = grid.shape[0]
    if loc.mode in ("mean", "centre"):  # position-free: one embedding per grid
        emb = loc(grid, torch.zeros(b, 2, dtype=grid.dtype, device=grid.device))
        return emb[:, None, :].expand(b, q.shape[0], emb.shape[-1])
    # Bilinear/bicubic weights sum to one, so projecting the tokens first gives the same result, cheaper.
    proj = torch.einsum("ed,bdhw->behw", loc.proj.weight.to(grid.dtype), grid)
    qq = q.to(grid.dtype).view(1, 1, -1, 2).expand(b, 1, q.shape[0], 2)
    out = F.grid_sample(proj, qq, mode=loc.mode, padding_mode="border", align_corners=False)[:, :, 0]
    out = out.transpose(1, 2)
    return out + loc.proj.bias.to(grid.dtype) if loc.proj.bias is not None else out


def _dense_generic(loc: nn.Module, grid: torch.Tensor, q: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Any ``(grid, q) -> embedding`` localiser, one grid copy per query (slow, always correct)."""
    outs = []
    for g in grid:
        parts = [loc(g[None].expand(len(qc), *g.shape), qc) for qc in q.split(chunk)]
        outs.append(torch.cat(parts))
    return torch.stack(outs)


@torch.no_grad()
def dense_localised_embeddings(localizer: nn.Module, grid: torch.Tensor, rel_xy: torch.Tensor) -> torch.Tensor:
    """The localiser's embedding of every grid at every position.

    :class:`~gair_model.models.nili.NILI` and :class:`~gair_model.models.nili.GridSampleLocalizer` use exact fast
    paths (each grid's tokens are projected once and reused for all positions); any other module is called on one
    copy of the grid per position.

    Args:
        localizer: The model's localiser, ``(B x D x H x W, B x 2 in [-1, 1]) -> B x E``.
        grid: ``B x D x H x W`` token grids.
        rel_xy: ``Q x 2`` positions ``(x, y)`` in [0, 1] from the tile's top-left (the same for every grid).

    Returns:
        ``B x Q x E`` localised embeddings.
    """
    q = rel_xy_to_query(rel_xy.to(grid.device))
    if isinstance(localizer, NILI) and isinstance(localizer.decoder, nn.Linear):
        return _dense_nili(localizer, grid, q)
    if isinstance(localizer, GridSampleLocalizer) and isinstance(localizer.proj, nn.Linear):
        return _dense_grid_sample(localizer, grid, q)
    return _dense_generic(localizer, grid, q)


@dataclass
class Localisation:
    """In-tile localisation of a set of SV images.

    Attributes:
        pred_xy: ``N x 2`` predicted positions ``(x, y)`` in [0, 1] from the tile's top-left.
        degenerate: ``N`` flags: every position scored the same (the prediction is the tile centre).
        scores: ``N x grid x grid`` cosine similarity maps (row = y, column = x).
    """

    pred_xy: np.ndarray
    degenerate: np.ndarray
    scores: np.ndarray


@torch.no_grad()
def localise_in_tile(localizer: nn.Module, grid_tokens: np.ndarray | torch.Tensor, sv: np.ndarray | torch.Tensor, *,
                     grid: int = 48, batch_size: int = 16, tol: float = TIE_TOL,
                     device: torch.device | str | None = None) -> Localisation:
    """Find each SV image inside its own tile by querying the localiser on a dense grid of positions.

    For sample ``i`` the localiser is evaluated on ``grid_tokens[i]`` at the ``grid x grid`` cell centres
    (:func:`query_grid`); the cosine similarity with ``sv[i]`` gives a score map whose maximum is the prediction
    (first maximum in row-major order). When all scores lie within ``tol`` of each other the localiser carries no
    position information (e.g. ``mean``/``centre``): the answer is the tile centre and the sample is flagged.

    Args:
        localizer: The model's localiser (``model.localizer``).
        grid_tokens: ``N x D x Hg x Wg`` RS token grids.
        sv: ``N x E`` SV embeddings.
        grid: Positions per tile side.
        batch_size: Samples per pass.
        tol: Score tolerance of the degenerate case.
        device: Where to compute (default: the localiser's device).

    Returns:
        The predictions, degenerate flags and score maps.
    """
    if device is None:
        param = next(localizer.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    tokens = torch.as_tensor(grid_tokens, dtype=torch.float32)
    sv_t = F.normalize(torch.as_tensor(sv, dtype=torch.float32), dim=-1)
    n = tokens.shape[0]
    positions = query_grid(grid)
    pos_t = torch.as_tensor(positions, dtype=torch.float32, device=device)
    scores = np.zeros((n, grid * grid), dtype=np.float32)
    for start in range(0, n, batch_size):
        emb = dense_localised_embeddings(localizer, tokens[start : start + batch_size].to(device), pos_t)
        emb = F.normalize(emb.float(), dim=-1)
        s = torch.einsum("bqe,be->bq", emb, sv_t[start : start + batch_size].to(device))
        scores[start : start + len(s)] = s.cpu().numpy()
    degenerate = (scores.max(axis=1) - scores.min(axis=1)) <= tol if n else np.zeros(0, dtype=bool)
    pred = positions[scores.argmax(axis=1)] if n else np.zeros((0, 2))
    pred[degenerate] = 0.5
    return Localisation(pred_xy=pred, degenerate=degenerate, scores=scores.reshape(n, grid, grid))


def localisation_summary(err_frac: np.ndarray, err_px: np.ndarray, err_m: np.ndarray,
                         err_cells: np.ndarray) -> dict[str, Any]:
    """Median / 90th percentile / mean errors and the share within one token cell.

    Args:
        err_frac: Euclidean errors in tile fractions.
        err_px: Errors in tile pixels.
        err_m: Errors in metres (NaN where unknown).
        err_cells: Errors in token cells (``hypot(dx * Wg, dy * Hg)``); within one cell means ``<= 1``.

    Returns:
        ``{"n", "median_frac", "p90_frac", "median_px", "p90_px", "mean_px", "median_m", "p90_m", "mean_m",
        "within_cell"}`` (``None`` for what cannot be computed).
    """
    n = int(len(err_frac))
    out: dict[str, Any] = {"n": n}
    for unit, err in (("frac", err_frac), ("px", err_px), ("m", err_m)):
        ok = np.asarray(err, dtype=np.float64)
        ok = ok[np.isfinite(ok)]
        out[f"median_{unit}"] = _num(np.median(ok)) if len(ok) else None
        out[f"p90_{unit}"] = _num(np.percentile(ok, 90)) if len(ok) else None
        if unit != "frac":
            out[f"mean_{unit}"] = _num(ok.mean()) if len(ok) else None
    out["within_cell"] = _num((np.asarray(err_cells) <= 1.0 + 1e-9).mean()) if n else None
    return out


# ------------------------------------------------------------------------------------------------
# offset rings
# ------------------------------------------------------------------------------------------------
def centre_offset(rel_xy: np.ndarray) -> np.ndarray:
    """Distance of each position from the tile centre (0.5, 0.5), in tile fractions."""
    rel_xy = np.asarray(rel_xy, dtype=np.float64)
    return np.hypot(rel_xy[:, 0] - 0.5, rel_xy[:, 1] - 0.5)


def ring_index(offset: np.ndarray, edges: Sequence[float] = RING_EDGES) -> np.ndarray:
    """Ring of each centre offset: ``i`` for ``edges[i] <= offset < edges[i + 1]`` (the last ring is closed)."""
    idx = np.searchsorted(np.asarray(edges, dtype=np.float64), np.asarray(offset, dtype=np.float64), side="right") - 1
    return np.clip(idx, 0, len(edges) - 2)


# ------------------------------------------------------------------------------------------------
# the benchmark
# ------------------------------------------------------------------------------------------------
@dataclass
class AlignmentResult:
    """Everything the benchmark computed.

    Attributes:
        summary: The JSON-ready summary (see :func:`run_alignment_benchmark`).
        per_sample: One row per sample: ``key, tile_id, lon, lat, x, y, pred_x, pred_y, degenerate, offset, ring,
            err_frac, err_px, err_m, centre_err_frac, centre_err_px, centre_err_m, tile_w_px, tile_h_px, tile_w_m,
            tile_h_m, sv_to_rs_rank, sv_to_rs_hit1, rs_to_sv_rank, sv_to_loc_error_km``.
        scores: ``N x grid x grid`` similarity maps of the in-tile localisation (row = y, column = x).
        embeddings: The embeddings the metrics were computed on.
    """

    summary: dict[str, Any]
    per_sample: pd.DataFrame
    scores: np.ndarray
    embeddings: ShardEmbeddings


def evaluate_alignment(emb: ShardEmbeddings, localizer: nn.Module, *, grid: int = 48, batch_size: int = 16,
                       tile_px: np.ndarray | None = None, tile_px_source: str = "given",
                       ring_edges: Sequence[float] = RING_EDGES) -> AlignmentResult:
    """Run every alignment metric on precomputed embeddings.

    Args:
        emb: Embeddings with token grids (``embed_shards(..., keep_grid=True)``), at least one sample.
        localizer: The localiser that produced ``emb.rs_local`` (``model.localizer``).
        grid: Localisation positions per tile side.
        batch_size: Samples per localisation pass.
        tile_px: ``N x 2`` tile sizes in pixels (width, height); default: the sample JSON's ``rs_width`` /
            ``rs_height`` (pixel errors are ``None`` where unknown).
        tile_px_source: Where ``tile_px`` came from (recorded in the summary).
        ring_edges: Offset ring edges.

    Returns:
        The summary (without model and timing fields), per-sample table and score maps.
    """
    n = len(emb)
    if n == 0:
        raise ValueError("no samples to evaluate")
    if emb.rs_grid is None:
        raise ValueError("the embeddings have no token grids: embed with keep_grid=True")
    hg, wg = emb.rs_grid.shape[2:]
    if tile_px is None:
        tile_px, tile_px_source = tile_pixel_sizes(emb.meta, emb.keys, None, None)
    tile_px = np.asarray(tile_px, dtype=np.float64)
    tiles = [str(m.get("tile_id", "")) for m in emb.meta]
    tile_m = np.array([tile_ground_size_m(m) for m in emb.meta], dtype=np.float64).reshape(n, 2)

    # retrieval
    sv_rs = cosine_scores(emb.sv, emb.rs_local)
    sv_better, sv_tied = retrieval_ranks(sv_rs)
    retrieval = {
        "sv_to_rs": retrieval_metrics(emb.sv, emb.rs_local, query_groups=tiles, gallery_groups=tiles),
        "rs_to_sv": retrieval_metrics(emb.rs_local, emb.sv, query_groups=tiles, gallery_groups=tiles),
    }
    retrieval["sv_to_loc"], loc_err = location_retrieval(emb.sv, emb.loc, emb.lonlat)
    retrieval["rs_to_loc"], _ = location_retrieval(emb.rs_local, emb.loc, emb.lonlat)
    rs_better, rs_tied = retrieval_ranks(sv_rs.T)

    # in-tile localisation
    loc = localise_in_tile(localizer, emb.rs_grid, emb.sv, grid=grid, batch_size=batch_size)
    true_xy = np.asarray(emb.rel_xy, dtype=np.float64)
    cells = np.array([wg, hg], dtype=np.float64)

    def errors(pred: np.ndarray) -> dict[str, np.ndarray]:
        d = pred - true_xy
        return {"frac": np.hypot(d[:, 0], d[:, 1]), "px": np.hypot(*(d * tile_px).T),
                "m": fraction_error_m(d, tile_m), "cells": np.hypot(*(d * cells).T)}

    model_err = errors(loc.pred_xy)
    centre_err = errors(np.full_like(true_xy, 0.5))
    model_summary = localisation_summary(model_err["frac"], model_err["px"], model_err["m"], model_err["cells"])
    model_summary.update({"degenerate": bool(loc.degenerate.all()), "n_degenerate": int(loc.degenerate.sum())})
    localisation = {
        "model": model_summary,
        "centre_baseline": localisation_summary(centre_err["frac"], centre_err["px"], centre_err["m"],
                                                centre_err["cells"]),
        "grid": int(grid), "token_cells": int(hg), "token_grid": [int(hg), int(wg)],
        "tile_px": {"median_width": _num(np.median(tile_px[:, 0])), "median_height": _num(np.median(tile_px[:, 1])),
                    "source": tile_px_source},
        "tile_m": {"median_width": _num(np.nanmedian(tile_m[:, 0])) if np.isfinite(tile_m).any() else None,
                   "median_height": _num(np.nanmedian(tile_m[:, 1])) if np.isfinite(tile_m).any() else None},
    }

    # offset rings
    offset = centre_offset(true_xy)
    ring = ring_index(offset, ring_edges)
    hit1 = recall_at_k(sv_better, sv_tied, 1)
    rings = []
    for i in range(len(ring_edges) - 1):
        sel = ring == i
        k = int(sel.sum())
        entry: dict[str, Any] = {"ring": i, "lo": float(ring_edges[i]), "hi": float(ring_edges[i + 1]), "n": k,
                                 "empty": k == 0}
        if k:
            entry["model"] = localisation_summary(*(model_err[x][sel] for x in ("frac", "px", "m", "cells")))
            entry["model"]["n_degenerate"] = int(loc.degenerate[sel].sum())
            entry["centre_baseline"] = localisation_summary(*(centre_err[x][sel] for x in ("frac", "px", "m", "cells")))
            entry["sv_to_rs_recall@1"] = float(hit1[sel].mean())
        else:
            entry.update({"model": None, "centre_baseline": None, "sv_to_rs_recall@1": None})
        rings.append(entry)

    per_sample = pd.DataFrame({
        "key": emb.keys, "tile_id": tiles, "lon": emb.lonlat[:, 0], "lat": emb.lonlat[:, 1],
        "x": true_xy[:, 0], "y": true_xy[:, 1], "pred_x": loc.pred_xy[:, 0], "pred_y": loc.pred_xy[:, 1],
        "degenerate": loc.degenerate, "offset": offset, "ring": ring,
        "err_frac": model_err["frac"], "err_px": model_err["px"], "err_m": model_err["m"],
        "centre_err_frac": centre_err["frac"], "centre_err_px": centre_err["px"], "centre_err_m": centre_err["m"],
        "tile_w_px": tile_px[:, 0], "tile_h_px": tile_px[:, 1], "tile_w_m": tile_m[:, 0], "tile_h_m": tile_m[:, 1],
        "sv_to_rs_rank": expected_rank(sv_better, sv_tied), "sv_to_rs_hit1": hit1,
        "rs_to_sv_rank": expected_rank(rs_better, rs_tied), "sv_to_loc_error_km": loc_err,
    })
    summary = {
        "n_samples": n, "n_tiles": len(set(tiles)),
        "retrieval": retrieval, "localisation": localisation,
        "rings": rings,
    }
    return AlignmentResult(summary, per_sample, loc.scores, emb)


def benchmark_alignment(loaded: LoadedModel, shards: str | Sequence[str], *, splits: Sequence[str] | None = ("test",),
                        grid: int = 48, batch_size: int = 64,
                        log: Callable[[str], None] | None = None) -> AlignmentResult:
    """Embed a shard set and run the alignment benchmark, keeping the per-sample results.

    Args:
        loaded: The model (trained or random).
        shards: Shard specification (folder(s), glob, list; see :func:`gair_model.loader.resolve_shards`).
        splits: Splits to evaluate (``None``: all samples).
        grid: Localisation positions per tile side.
        batch_size: Samples per forward pass (embedding and localisation).
        log: Called with progress messages (e.g. ``print`` or a logger's ``info``).

    Returns:
        The result; its ``summary`` is what :func:`run_alignment_benchmark` returns.

    Raises:
        ValueError: When the shards hold no sample of ``splits``.
    """
    say = log or (lambda _msg: None)
    t0 = time.perf_counter()
    emb = embed_shards(loaded, shards, splits=splits, batch_size=batch_size, keep_grid=True)
    if len(emb) == 0:
        raise ValueError(f"no samples of split(s) {list(splits) if splits is not None else 'any'} in shards {shards!r}")
    t_embed = time.perf_counter() - t0
    say(f"alignment: embedded {len(emb)} samples in {t_embed:.1f}s")
    tile_px, source = tile_pixel_sizes(emb.meta, emb.keys, read_tile_pixels(shards), loaded.config.rs_img_size)
    result = evaluate_alignment(emb, loaded.model.localizer, grid=grid, batch_size=max(1, min(batch_size, 16)),
                                tile_px=tile_px, tile_px_source=source)
    wall = time.perf_counter() - t0
    s = result.summary
    result.summary = {
        "n_samples": s["n_samples"], "n_tiles": s["n_tiles"], "localizer": loaded.config.localizer,
        "model": {"label": loaded.label, "checkpoint": loaded.checkpoint, "step": loaded.step},
        "splits": list(splits) if splits is not None else None,
        "retrieval": s["retrieval"], "localisation": s["localisation"], "rings": s["rings"],
        "timing": {"embed_s": round(t_embed, 3), "metrics_s": round(wall - t_embed, 3)},
        "wall_s": round(wall, 3),
    }
    r, lz = s["retrieval"], s["localisation"]
    say(f"alignment: SV->RS R@1 {r['sv_to_rs']['recall@1']:.3f}, in-tile median error "
        f"{lz['model']['median_frac']:.3f} of the tile (centre baseline {lz['centre_baseline']['median_frac']:.3f}), "
        f"{wall:.1f}s")
    return result


def run_alignment_benchmark(loaded: LoadedModel, shards: str | Sequence[str], *,
                            splits: Sequence[str] | None = ("test",), grid: int = 48, batch_size: int = 64,
                            log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The geo-alignment benchmark of a model on a shard set, as a JSON-serialisable dict.

    Args:
        loaded: The model (:func:`~gair_model.eval.loading.load_trained` or ``random_model``).
        shards: Shard specification.
        splits: Splits to evaluate (``None``: all samples).
        grid: Localisation positions per tile side (``grid x grid`` cell centres).
        batch_size: Samples per forward pass.
        log: Called with progress messages.

    Returns:
        ``{"n_samples", "n_tiles", "localizer", "model", "splits", "retrieval", "localisation", "rings",
        "timing", "wall_s"}``. ``retrieval`` holds ``sv_to_rs``, ``rs_to_sv`` (recall@1/5/10, median/mean rank,
        chance, ``tile_hit@1``), ``sv_to_loc`` and ``rs_to_loc`` (plus ``median_error_km``, ``within_1km``).
        ``localisation`` holds ``model`` and ``centre_baseline`` error summaries (fractions, tile pixels, metres,
        ``within_cell``; ``model`` adds ``degenerate``), ``grid``, ``token_cells``, ``tile_px``, ``tile_m``.
        ``rings`` lists the offset rings with their counts and metrics (``empty: true`` for rings without
        samples). Use :func:`benchmark_alignment` for the per-sample predictions.

    Raises:
        ValueError: When the shards hold no sample of ``splits``.
    """
    return benchmark_alignment(loaded, shards, splits=splits, grid=grid, batch_size=batch_size, log=log).summary
