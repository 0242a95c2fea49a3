"""Geo-alignment benchmark: retrieval, in-tile localisation, metres, rings, end to end on synthetic shards."""

import json
import math

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from gair_dataset.geo import xyz_tile_lonlat_bounds
from gair_model.eval import alignment_plots as plots
from gair_model.eval.alignment import (
    RING_EDGES,
    benchmark_alignment,
    centre_offset,
    dense_localised_embeddings,
    fraction_error_m,
    great_circle_km,
    localise_in_tile,
    location_retrieval,
    query_grid,
    retrieval_metrics,
    retrieval_ranks,
    ring_index,
    run_alignment_benchmark,
    tile_ground_size_m,
)
from gair_model.eval.loading import random_model
from gair_model.models.gair import preset
from gair_model.models.nili import NILI, GridSampleLocalizer, rel_xy_to_query
from tests.synthetic_shards import write_synthetic_shards

# ------------------------------------------------------------------------------------------------
# in-tile localisation
# ------------------------------------------------------------------------------------------------
H = W = 8


def one_hot_grids(targets):
    """Token grids whose cell tokens are the one-hot vectors e_(row*W+col), and SVs equal to the target's token."""
    tokens = torch.eye(H * W).T.reshape(H * W, H, W)  # token of cell (r, c) = e_(r*W + c)
    grids = tokens[None].repeat(len(targets), 1, 1, 1)
    sv = torch.stack([torch.eye(H * W)[r * W + c] for r, c in targets])
    return grids, sv


def identity_bilinear() -> GridSampleLocalizer:
    loc = GridSampleLocalizer(H * W, H * W, mode="bilinear")
    with torch.no_grad():
        loc.proj.weight.copy_(torch.eye(H * W))
        loc.proj.bias.zero_()
    return loc


def centre_token_nili() -> NILI:
    """A NILI whose decoder passes the centre token of the 3x3 unfold through (and ignores the offset)."""
    d = H * W
    loc = NILI(d, d)
    with torch.no_grad():
        loc.decoder.weight.zero_()
        loc.decoder.bias.zero_()
        loc.decoder.weight[torch.arange(d), torch.arange(d) * 9 + 4] = 1.0  # unfold layout: channel * 9 + kernel pos
    return loc


@pytest.mark.parametrize("make_localizer", [identity_bilinear, centre_token_nili], ids=["bilinear", "nili"])
def test_localise_finds_the_one_matching_cell(make_localizer):
    targets = [(2, 5), (0, 0), (7, 3)]
    grids, sv = one_hot_grids(targets)
    out = localise_in_tile(make_localizer(), grids, sv, grid=48, batch_size=2)
    assert out.scores.shape == (3, 48, 48)
    assert not out.degenerate.any()
    for (r, c), (px, py) in zip(targets, out.pred_xy, strict=True):
        assert (math.floor(px * W), math.floor(py * H)) == (c, r)
        if 0 < r < H - 1 and 0 < c < W - 1:
            # inside the grid the best lattice points are the 4 around the cell centre (half a step away in x
            # and y), tied: the first in row-major order wins. (In a border cell the border padding makes the
            # whole outer part of the cell score 1, so the first point there is the cell's outer corner.)
            assert (px, py) == pytest.approx(((c + 0.5) / W - 0.5 / 48, (r + 0.5) / H - 0.5 / 48))


def test_query_grid_is_row_major_cell_centres():
    q = query_grid(4)
    assert q.shape == (16, 2)
    np.testing.assert_allclose(q[0], [0.125, 0.125])
    np.testing.assert_allclose(q[1], [0.375, 0.125])  # x varies fastest
    np.testing.assert_allclose(q[4], [0.125, 0.375])


@pytest.mark.parametrize("kind", ["nili", "nili_nearest", "bilinear", "bicubic", "mean", "centre"])
def test_dense_fast_paths_match_the_module(kind):
    torch.manual_seed(0)
    d, e = 6, 5
    loc = NILI(d, e, local_ensemble=kind == "nili") if kind.startswith("nili") else GridSampleLocalizer(d, e, kind)
    grid = torch.randn(3, d, 4, 4)
    rel = torch.rand(7, 2)
    rel[0] = torch.tensor([0.0, 1.0])  # corners and edges too
    rel[1] = torch.tensor([0.5, 0.5])
    dense = dense_localised_embeddings(loc, grid, rel)
    assert dense.shape == (3, 7, e)
    with torch.no_grad():
        for b in range(3):
            ref = loc(grid[b : b + 1].expand(7, -1, -1, -1), rel_xy_to_query(rel))
            torch.testing.assert_close(dense[b], ref, rtol=1e-5, atol=1e-5)


def test_dense_generic_path_matches_fast_path():
    class Wrapped(torch.nn.Module):  # not a NILI instance: takes the generic path
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, grid, q):
            return self.inner(grid, q)

    torch.manual_seed(1)
    nili = NILI(4, 3)
    grid, rel = torch.randn(2, 4, 3, 3), torch.rand(10, 2)
    torch.testing.assert_close(dense_localised_embeddings(Wrapped(nili), grid, rel),
                               dense_localised_embeddings(nili, grid, rel), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["mean", "centre"])
def test_position_free_localiser_is_degenerate_and_answers_the_centre(mode):
    torch.manual_seed(0)
    loc = GridSampleLocalizer(6, 5, mode)
    out = localise_in_tile(loc, torch.randn(4, 6, 4, 4), torch.randn(4, 5), grid=12)
    assert out.degenerate.all()
    np.testing.assert_allclose(out.pred_xy, 0.5)


# ------------------------------------------------------------------------------------------------
# retrieval
# ------------------------------------------------------------------------------------------------
def test_retrieval_perfect_pairs():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(20, 8))
    out = retrieval_metrics(emb, emb * 3.0)  # scale does not matter (cosine)
    assert out["recall@1"] == out["recall@5"] == 1.0
    assert out["median_rank"] == 1.0
    assert out["chance_recall@1"] == pytest.approx(1 / 20)


def test_retrieval_known_ranks():
    n = 12
    eye = np.eye(n)
    gallery = 0.5 * eye + np.roll(eye, 1, axis=1)  # gallery j = 0.5 e_j + e_(j+1): query i prefers gallery i-1
    out = retrieval_metrics(eye, gallery)
    assert out["recall@1"] == 0.0
    assert out["recall@5"] == 1.0
    assert out["median_rank"] == 2.0
    # a swap: queries 0 and 1 find each other's item first and tie with the 2 others; 2 and 3 are exact
    swapped = np.eye(4)[[1, 0, 2, 3]]
    better, tied = retrieval_ranks(np.eye(4) @ swapped.T)
    np.testing.assert_array_equal(better, [1, 1, 0, 0])
    np.testing.assert_array_equal(tied, [2, 2, 0, 0])
    out = retrieval_metrics(np.eye(4), swapped)
    assert out["recall@1"] == 0.5
    assert out["median_rank"] == 2.0  # ranks 3, 3, 1, 1 (expected rank under random tie-breaking)


def test_retrieval_ties_give_chance_not_luck_and_tile_hits():
    # 2 tiles x 3 SV; the RS gallery holds one embedding per tile (what a mean localiser produces)
    tiles = ["a"] * 3 + ["b"] * 3
    sv = np.array([[1, 0.1, 0], [1, 0, 0.1], [1, 0.05, 0.05], [0, 1, 0.1], [0.1, 1, 0], [0.05, 1, 0.05]])
    rs = np.array([[1.0, 0, 0]] * 3 + [[0, 1.0, 0]] * 3)
    out = retrieval_metrics(sv, rs, query_groups=tiles, gallery_groups=tiles)
    assert out["recall@1"] == pytest.approx(1 / 3)
    assert out["median_rank"] == 2.0
    assert out["tile_hit@1"] == 1.0
    assert out["tile_chance@1"] == 0.5


def test_location_retrieval_error_km():
    lonlat = np.array([[13.0, 55.0], [13.0, 56.0], [2.0, 49.0]])
    emb = np.eye(3)
    out, err = location_retrieval(emb, emb, lonlat)
    assert out["recall@1"] == 1.0 and out["median_error_km"] == 0.0 and out["within_1km"] == 1.0
    out, err = location_retrieval(emb, emb[[1, 0, 2]], lonlat)  # the first two swap their locations
    assert err[0] == pytest.approx(111.19, abs=0.01)  # one degree of latitude
    assert out["within_1km"] == pytest.approx(1 / 3)
    assert great_circle_km(np.array([0.0, 0.0]), np.array([1.0, 0.0])) == pytest.approx(111.195, abs=1e-3)


# ------------------------------------------------------------------------------------------------
# rings and metres
# ------------------------------------------------------------------------------------------------
def test_ring_binning():
    offsets = np.array([0.0, 0.05, 0.1, 0.25, 0.39999, 0.4, 0.6, math.sqrt(0.5)])
    np.testing.assert_array_equal(ring_index(offsets), [0, 0, 1, 2, 3, 4, 4, 4])
    assert len(RING_EDGES) == 6
    corners = np.array([[0.0, 0.0], [1.0, 1.0], [0.5, 0.5], [0.5, 0.75]])
    np.testing.assert_allclose(centre_offset(corners), [math.sqrt(0.5), math.sqrt(0.5), 0.0, 0.25])
    np.testing.assert_array_equal(ring_index(centre_offset(corners)), [4, 4, 0, 2])


def test_tile_ground_size_xyz_zoom14_near_lund():
    lon_min, lat_min, lon_max, lat_max = xyz_tile_lonlat_bounds(8790, 5124, 14)
    meta = {"bbox": [lon_min, lat_max, lon_max, lat_min], "crs": "EPSG:3857", "grid": "xyz"}
    width, height = tile_ground_size_m(meta)
    lat_c = math.radians((lat_min + lat_max) / 2)  # 55.7209 deg
    # Web-Mercator tile size at zoom 14 times cos(latitude): the spherical estimate, 1377.64 m
    assert width == pytest.approx(2445.98 * math.cos(lat_c), rel=5e-3)
    assert height == pytest.approx(2445.98 * math.cos(lat_c), rel=5e-3)
    # exactly: the WGS84 parallel arc N(lat) cos(lat) dlon and the meridian arc M(lat) dlat
    a, e2 = 6378137.0, 0.00669437999014
    n_rad = a / math.sqrt(1 - e2 * math.sin(lat_c) ** 2)
    m_rad = a * (1 - e2) / (1 - e2 * math.sin(lat_c) ** 2) ** 1.5
    assert width == pytest.approx(n_rad * math.cos(lat_c) * math.radians(360 / 2**14), rel=1e-6)  # 1380.80 m
    assert height == pytest.approx(m_rad * math.radians(lat_max - lat_min), rel=1e-6)  # 1377.85 m


def test_tile_ground_size_utm():
    meta = {"grid": "utm", "crs": "EPSG:32633", "tile_id": "utm32633-r10-p96-x3512-y-64418",
            "bbox": [13.0, 55.01, 13.02, 55.0]}
    assert tile_ground_size_m(meta) == (960.0, 960.0)
    explicit = {"crs": "EPSG:32633", "tile_id": "t", "tile_px": 64, "resolution": 2.5}
    assert tile_ground_size_m(explicit) == (160.0, 160.0)
    half_res = {"grid": "utm", "crs": "EPSG:32633", "tile_id": "utm32633-r2p5-p256-x1-y2"}
    assert tile_ground_size_m(half_res) == (640.0, 640.0)
    assert all(math.isnan(v) for v in tile_ground_size_m({"crs": "EPSG:3857"}))
    np.testing.assert_allclose(fraction_error_m(np.array([[0.1, 0.0], [0.3, 0.4]]), np.array([[960, 960]] * 2)),
                               [96.0, 480.0])


# ------------------------------------------------------------------------------------------------
# end to end on synthetic shards
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    torch.set_num_threads(2)
    out = tmp_path_factory.mktemp("align") / "shards"
    write_synthetic_shards(out, 80, rs_size=64, sv_size=64, samples_per_shard=32, seed=3)  # tiles 9 and 19: test
    loaded = random_model(preset("tiny"))
    return loaded, str(out), benchmark_alignment(loaded, str(out), grid=24, batch_size=16)


def test_benchmark_end_to_end(synthetic_run):
    _loaded, _shards, result = synthetic_run
    s = result.summary
    assert set(s) == {"n_samples", "n_tiles", "localizer", "model", "splits", "retrieval", "localisation", "rings",
                      "timing", "wall_s"}
    json.dumps(s, allow_nan=False)
    assert (s["n_samples"], s["n_tiles"], s["localizer"]) == (8, 2, "nili")
    assert set(s["retrieval"]) == {"sv_to_rs", "rs_to_sv", "sv_to_loc", "rs_to_loc"}
    assert 0 <= s["retrieval"]["sv_to_rs"]["recall@1"] <= 1
    lz = s["localisation"]
    assert (lz["grid"], lz["token_cells"], lz["tile_px"]["source"]) == (24, 8, "manifest")
    assert lz["tile_px"]["median_width"] == 64
    assert lz["tile_m"]["median_width"] == pytest.approx(1113.2, rel=1e-2)  # 0.01 deg at the equator
    assert lz["model"]["degenerate"] is False
    assert lz["centre_baseline"]["median_frac"] is not None
    assert [r["ring"] for r in s["rings"]] == [0, 1, 2, 3, 4]
    assert sum(r["n"] for r in s["rings"]) == 8
    assert all(r["model"] is None for r in s["rings"] if r["empty"])
    table = result.per_sample
    assert len(table) == 8 and result.scores.shape == (8, 24, 24)
    np.testing.assert_allclose(table["err_px"], table["err_frac"] * 64, rtol=1e-9)  # square 64 px tiles
    np.testing.assert_allclose(table["centre_err_frac"], table["offset"])


def test_benchmark_empty_split_is_a_clear_error(synthetic_run):
    loaded, shards, _ = synthetic_run
    with pytest.raises(ValueError, match=r"no samples of split\(s\) \['nowhere'\] in shards"):
        run_alignment_benchmark(loaded, shards, splits=("nowhere",))


def test_plots_return_figures(synthetic_run):
    loaded, shards, result = synthetic_run
    assert isinstance(plots.plot_offset_rings(result.summary), Figure)
    assert isinstance(plots.plot_offset_rings({"nili": result.summary, "other": result.summary},
                                              metric="median_px"), Figure)
    fig = plots.plot_localisation_examples(loaded, shards, result, n=3, heatmap=True)
    assert isinstance(fig, Figure)
    assert len(plots.pick_examples(result, 3)) == 3
    assert isinstance(plots.plot_similarity_heatmap(result, result.per_sample["key"].iloc[1]), Figure)
