"""Embedding export (``python -m gair_model.embed``): GeoParquet rows, readers, bad CSV rows, atomic writes."""

import json
import logging

import geopandas as gpd
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import gair_model.embed as embed_mod
from gair_dataset.pairing import connect
from gair_model import checkpoint as ckpt
from gair_model.embed import export_point_embeddings, export_shard_embeddings, main
from gair_model.eval.loading import embed_shards, load_trained, random_model
from gair_model.models.gair import preset
from tests.synthetic_shards import write_synthetic_shards

torch.set_num_threads(1)
N_SAMPLES = 40  # 10 tiles: 8 train, 1 val, 1 test (4 samples each)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("embed_shards")
    write_synthetic_shards(out, N_SAMPLES, rs_size=32, sv_size=32, samples_per_shard=16, seed=0)
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random tiny model (32 px inputs) saved as a GAIR checkpoint (model config in the header)."""
    loaded = random_model(preset("tiny", rs_img_size=32, sv_img_size=32), seed=3)
    path = tmp_path_factory.mktemp("embed_ckpt") / "step_00000007.safetensors"
    ckpt.save_model(loaded.model, path, {"step": "7", "model_config": json.dumps(loaded.config.to_dict())})
    return path


@pytest.fixture(scope="module")
def loaded(checkpoint):
    return load_trained(checkpoint)


def _no_temp_files(folder):
    return not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_shard_export_cli_geopandas_and_duckdb(shards, checkpoint, loaded, tmp_path, capsys):
    out = tmp_path / "emb.parquet"
    result = main(["shards", "--checkpoint", str(checkpoint), "--shards", str(shards), "--out", str(out),
                   "--batch-size", "8", "--splits", "none"])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["n_rows"] == N_SAMPLES
    e, d = loaded.config.embed_dim, loaded.model.rs_encoder.embed_dim
    assert result["n_rows"] == N_SAMPLES and result["splits"] == {"train": 32, "val": 4, "test": 4}
    assert result["dims"] == {"sv_emb": e, "rs_local_emb": e, "rs_global_emb": d, "loc_emb": e}
    assert result["step"] == 7 and result["samples_per_s"] > 0

    schema = pq.read_schema(out)
    assert schema.field("sv_emb").type == pa.list_(pa.float32(), e)
    assert schema.field("rs_global_emb").type == pa.list_(pa.float32(), d)
    assert json.loads(schema.metadata[b"gair"])["step"] == 7

    gdf = gpd.read_parquet(out)
    assert len(gdf) == N_SAMPLES and gdf.crs.to_epsg() == 4326
    assert list(gdf.columns[:8]) == ["key", "sv_id", "tile_id", "split", "lon", "lat", "x", "y"]
    np.testing.assert_allclose(gdf.geometry.x, gdf.lon)
    np.testing.assert_allclose(gdf.geometry.y, gdf.lat)
    assert len(gdf.sv_emb.iloc[0]) == e and gdf.key.is_unique

    # The same numbers as the evaluation library's in-memory embedding, row for row.
    ref = embed_shards(loaded, str(shards), splits=None, batch_size=16)
    assert list(gdf.key) == ref.keys
    for col, arr in (("sv_emb", ref.sv), ("rs_local_emb", ref.rs_local), ("rs_global_emb", ref.rs_global),
                     ("loc_emb", ref.loc)):
        np.testing.assert_allclose(np.stack(gdf[col].to_numpy()), arr, rtol=1e-4, atol=1e-5)

    con = connect()  # spatial loaded offline from the pinned wheel
    n, width, x, y, typ = con.execute(
        f"SELECT count(*), max(len(sv_emb::FLOAT[])), max(ST_X(geometry)), min(ST_Y(geometry)), "
        f"any_value(typeof(geometry)) FROM read_parquet('{out}')").fetchone()
    assert (n, width, typ) == (N_SAMPLES, e, "GEOMETRY('EPSG:4326')")  # the CRS is read from the geo metadata
    assert x == pytest.approx(gdf.lon.max()) and y == pytest.approx(gdf.lat.min())
    assert _no_temp_files(tmp_path)


def test_shard_export_splits_max_samples_and_progress(shards, loaded, tmp_path):
    seen = []
    res = export_shard_embeddings(loaded, str(shards), tmp_path / "val.parquet", splits=["val"], batch_size=3,
                                  log=seen.append, log_every=1)
    assert res["n_rows"] == 4 and res["splits"] == {"val": 4} and res["n_batches"] == 2
    assert [s["rows"] for s in seen] == [3, 4, 4] and seen[-1]["done"] and not seen[0]["done"]
    assert set(gpd.read_parquet(tmp_path / "val.parquet").split) == {"val"}
    res = export_shard_embeddings(loaded, [str(shards)], tmp_path / "five.parquet", batch_size=4, max_samples=5)
    assert res["n_rows"] == 5 and pq.read_metadata(tmp_path / "five.parquet").num_rows == 5
    with pytest.raises(ValueError, match="no sample"):
        export_shard_embeddings(loaded, str(shards), tmp_path / "none.parquet", splits=["nope"])
    assert not (tmp_path / "none.parquet").exists() and _no_temp_files(tmp_path)


def test_point_export_reports_bad_rows(checkpoint, loaded, tmp_path, caplog):
    csv_path = tmp_path / "points.csv"
    csv_path.write_text(
        "name,longitude,latitude\n"
        "a,13.19,55.70\n"
        "b,abc,55.70\n"       # line 3: not a number
        "c,13.2,95\n"         # line 4: latitude out of range
        "d,,55.7\n"           # line 5: missing
        "e,2.07,49.03\n"
        "f,nan,1\n"           # line 7: not finite
    )  # fmt: skip
    out = tmp_path / "pts.parquet"
    with caplog.at_level(logging.WARNING, logger="gair_model.embed"):
        res = export_point_embeddings(loaded, csv_path, out, lon_col="longitude", lat_col="latitude")
    assert res["n_rows"] == 2 and res["n_bad"] == 4
    assert [b["line"] for b in res["bad_rows"]] == [3, 4, 5, 7]
    assert "line 3" in caplog.text and "not a number" in caplog.text and "outside" in caplog.text
    gdf = gpd.read_parquet(out)
    assert list(gdf.columns) == ["csv_line", "name", "lon", "lat", "loc_emb", "geometry"]
    assert list(gdf.csv_line) == [2, 6] and list(gdf.name) == ["a", "e"] and gdf.crs.to_epsg() == 4326
    expected = loaded.model.encode_location(torch.tensor([[13.19, 55.70], [2.07, 49.03]], dtype=torch.float64))
    np.testing.assert_allclose(np.stack(gdf.loc_emb.to_numpy()), expected.detach().numpy(), rtol=1e-5, atol=1e-6)

    # The CLI: the default column names; a column named like an output column is kept with a prefix.
    (tmp_path / "p2.csv").write_text("lon,lat,geometry\n1,2,POINT(1 2)\n")
    res = main(["points", "--checkpoint", str(checkpoint), "--csv", str(tmp_path / "p2.csv"),
                "--out", str(tmp_path / "p2.parquet")])
    assert res["n_rows"] == 1 and "src_geometry" in pq.read_schema(tmp_path / "p2.parquet").names


def test_point_export_all_bad_or_missing_column_writes_nothing(loaded, tmp_path):
    out = tmp_path / "pts.parquet"
    (tmp_path / "bad.csv").write_text("lon,lat\nx,1\n200,1\n")
    with pytest.raises(ValueError, match=r"no valid point \(2 bad rows: line 2: lon 'x' is not a number"):
        export_point_embeddings(loaded, tmp_path / "bad.csv", out)
    (tmp_path / "cols.csv").write_text("x,y\n1,2\n")
    with pytest.raises(ValueError, match="no column"):
        export_point_embeddings(loaded, tmp_path / "cols.csv", out)
    assert not out.exists() and _no_temp_files(tmp_path)


def test_failure_midway_leaves_no_partial_file(shards, loaded, tmp_path, monkeypatch):
    out = tmp_path / "emb.parquet"
    out.write_bytes(b"previous export")
    calls = {"n": 0}
    real = embed_mod.embed_batch

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(embed_mod, "embed_batch", failing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        export_shard_embeddings(loaded, str(shards), out, batch_size=4)
    assert out.read_bytes() == b"previous export" and _no_temp_files(tmp_path)
    monkeypatch.undo()
    new = tmp_path / "new.parquet"
    monkeypatch.setattr(embed_mod, "embed_batch", failing)
    calls["n"] = 0
    with pytest.raises(RuntimeError):
        export_shard_embeddings(loaded, str(shards), new, batch_size=4)
    assert not new.exists() and _no_temp_files(tmp_path)
