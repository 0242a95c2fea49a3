"""Wrong inputs get named: decimal commas, unparseable text kept, swapped lat/lon; rejects.parquet always written."""

import dataclasses

import dagster as dg
import pandas as pd
import pytest
from PIL import Image

from gair_dataset.samples import build_sample_json
from gair_dataset.streetview_points import load_table, swapped_coordinates, validate_points
from pipelines.common.storage import DataRoot
from pipelines.config import StreetViewSource
from pipelines.defs.streetview.assets import sv_points
from pipelines.defs.streetview.resources import StreetViewPoints
from tests.streetview.fake_apis import LUND, FakeApis


def _csv(tmp_path, text, name="p.csv"):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.jpg")
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_semicolon_csv_with_decimal_commas_is_parsed_and_bad_text_kept(tmp_path):
    path = _csv(tmp_path, "id;lon;lat;image_path;heading\n"
                          "a;13,19;55,70;a.jpg;90,5\n"
                          "b;13.20;55.71;a.jpg;\n"
                          "c;13,2,1;55,7;a.jpg;\n"
                          "d;1.234,5;n/a;a.jpg;\n")
    table = load_table(path)
    assert table.attrs["decimal_commas"] == 4  # 13,19 55,70 90,5 and row c's 55,7
    valid, rejects = validate_points(table)
    assert valid["sv_id"].tolist() == ["a", "b"]
    assert valid.loc[0, ["lon", "lat", "heading"]].tolist() == [13.19, 55.70, 90.5]
    assert rejects["reason"].tolist() == ["unparseable longitude: '13,2,1'", "unparseable longitude: '1.234,5'"]
    assert rejects["row"].tolist() == [3, 4]
    assert rejects["raw"].tolist() == ["c;13,2,1;55,7;a.jpg;", "d;1.234,5;n/a;a.jpg;"]


def test_comma_csv_with_unquoted_decimal_commas_names_the_line(tmp_path):
    path = _csv(tmp_path, "id,lon,lat,image_path\na,13.1,55.7,a.jpg\nb,13,2,55,7,a.jpg\n")
    with pytest.raises(ValueError, match=r"p\.csv: line 3 has 6 fields, the header 4 - decimal commas"):
        load_table(path)
    quoted = _csv(tmp_path, 'id,lon,lat,image_path\nb,"13,2","55,7",a.jpg\n', "q.csv")
    valid, rejects = validate_points(load_table(quoted))
    assert valid[["lon", "lat"]].values.tolist() == [[13.2, 55.7]] and rejects.empty


def test_parquet_nan_keeps_the_row_text(tmp_path):
    pd.DataFrame({"sv_id": ["a", "b"], "lon": [13.2, float("nan")], "lat": [55.7, 55.7],
                  "image_path": ["a.jpg", "a.jpg"]}).to_parquet(tmp_path / "p.parquet")
    _, rejects = validate_points(load_table(tmp_path / "p.parquet"))
    assert rejects["reason"].tolist() == ["non-finite coordinate"] and rejects["row"].tolist() == [2]
    assert '"sv_id": "b"' in rejects["raw"].iloc[0]


def test_swapped_coordinates_are_named():
    pts = pd.DataFrame({"sv_id": ["a", "b", "c"], "lon": [55.70, 55.71, 13.2], "lat": [13.19, 13.20, 55.7]})
    msg = swapped_coordinates(pts, LUND)
    assert msg and msg.startswith("lat/lon look swapped: 2 of 3 points fall outside") and "a: lon=55.7" in msg
    assert swapped_coordinates(pts.iloc[2:], LUND) is None


def test_sample_json_carries_licence_and_attribution():
    pair = {"sv_id": "mly-1", "lon": 13.2, "lat": 55.7, "tile_id": "t", "lon_min": 13, "lat_max": 56, "lon_max": 14,
            "lat_min": 55, "x": 0.5, "y": 0.5, "col": 1, "row": 1, "source": "mapillary", "license": "CC-BY-SA-4.0",
            "attribution": "user1, Mapillary", "source_url": "https://www.mapillary.com/app/?pKey=1"}
    meta = build_sample_json(pair, None, b"x", bands=["B04"], harmonized=True)
    assert meta["sv_license"] == "CC-BY-SA-4.0" and meta["sv_attribution"] == "user1, Mapillary"
    assert meta["sv_source"] == "mapillary" and meta["sv_source_url"].endswith("pKey=1")
    plain = build_sample_json({**pair, "source": None, "license": None, "attribution": None, "source_url": None},
                              None, b"x", bands=["B04"], harmonized=True)
    assert not any(k.startswith(("sv_source", "sv_license", "sv_attribution")) for k in plain)


def test_streetview_config_is_checked():
    with pytest.raises(ValueError, match=r"region 'x'.*needs 'token_env'"):
        StreetViewSource.from_config("x", {"kind": "mapillary"})
    with pytest.raises(ValueError, match=r"token_env must be an environment variable NAME"):
        StreetViewSource.from_config("x", {"kind": "mapillary", "token_env": "MLY|123|abc"})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['path'\]"):
        StreetViewSource.from_config("x", {"kind": "panoramax", "path": "p"})
    src = StreetViewSource.from_config("x", {"kind": "panoramax", "url": "http://127.0.0.1:1/api/", "page_size": 5})
    assert src.is_api and src.url == "http://127.0.0.1:1/api" and "token" not in str(src.describe().values())


def _materialize(monkeypatch, tmp_path, source):
    import pipelines.partitions as parts

    monkeypatch.setitem(parts.REGIONS, "sample-lund", dataclasses.replace(parts.REGIONS["sample-lund"],
                                                                         streetview=source, base_dir=tmp_path))
    resources = {"data_root": DataRoot(root=str(tmp_path / "data")),
                 "streetview": StreetViewPoints(backoff_s=0.01, max_retries=2)}
    return dg.materialize([sv_points], partition_key="sample-lund", resources=resources, raise_on_error=False)


@pytest.fixture
def fake():
    server = FakeApis(n_points=12).start()
    yield server
    server.stop()


def test_asset_with_mapillary_and_panoramax(monkeypatch, tmp_path, fake):
    monkeypatch.setenv("MAPILLARY_TOKEN", "GOOD")
    out = tmp_path / "data" / "streetview" / "sample-lund"
    src = StreetViewSource.from_config("sample-lund", {"kind": "mapillary", "token_env": "MAPILLARY_TOKEN",
                                                       "url": f"{fake.base}/mapillary"})
    result = _materialize(monkeypatch, tmp_path, src)
    assert result.success
    points = pd.read_parquet(out / "points.parquet")
    assert len(points) == 11 and points["license"].eq("CC-BY-SA-4.0").all()
    assert len(pd.read_parquet(out / "rejects.parquet")) == 1
    assert "GOOD" not in (out / "points.parquet").read_bytes().decode("latin-1")
    src = StreetViewSource.from_config("sample-lund", {"kind": "panoramax", "url": f"{fake.base}/panoramax/api"})
    assert _materialize(monkeypatch, tmp_path, src).success
    assert pd.read_parquet(out / "points.parquet")["source"].eq("panoramax").all()


def test_asset_failures_still_write_rejects(monkeypatch, tmp_path, fake):
    out = tmp_path / "data" / "streetview" / "sample-lund"
    monkeypatch.setenv("MAPILLARY_TOKEN", "EXPIRED")
    src = StreetViewSource.from_config("sample-lund", {"kind": "mapillary", "token_env": "MAPILLARY_TOKEN",
                                                       "url": f"{fake.base}/mapillary"})
    result = _materialize(monkeypatch, tmp_path, src)
    assert not result.success and (out / "rejects.parquet").exists()
    failure = result.get_step_failure_events()[0].step_failure_data.error.message
    assert "MAPILLARY_TOKEN" in failure and "EXPIRED" not in failure.replace("MAPILLARY_TOKEN", "")
    # Every row rejected: the run fails, and rejects.parquet lists them with their text.
    bad = _csv(tmp_path, "id;lon;lat;image_path\na;x;55,7;a.jpg\nb;13,2;?;a.jpg\n")
    result = _materialize(monkeypatch, tmp_path, StreetViewSource(kind="table", path=str(bad)))
    assert not result.success
    rejects = pd.read_parquet(out / "rejects.parquet")
    assert rejects["reason"].tolist() == ["unparseable longitude: 'x'", "unparseable latitude: '?'"]
    # Swapped lat/lon: named with the region.
    swapped = _csv(tmp_path, "id;lon;lat;image_path\na;55,70;13,19;a.jpg\nb;55,71;13,20;a.jpg\n", "s.csv")
    result = _materialize(monkeypatch, tmp_path, StreetViewSource(kind="table", path=str(swapped)))
    failure = result.get_step_failure_events()[0].step_failure_data.error.message
    assert "region sample-lund" in failure and "lat/lon look swapped" in failure
    assert pd.read_parquet(out / "rejects.parquet").empty
