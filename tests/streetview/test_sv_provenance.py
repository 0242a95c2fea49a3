"""API points keep their licence and attribution through the slim pairs table into the sample JSON."""

import pandas as pd

from gair_dataset.samples import build_sample_json
from gair_dataset.streetview_points import with_provenance


def test_provenance_joined_by_sv_id_and_into_the_sample_json(tmp_path):
    points = pd.DataFrame({"sv_id": ["a", "b"], "lon": [13.2, 13.3], "lat": [55.7, 55.71],
                           "source": ["mapillary", None], "license": ["CC-BY-SA-4.0", None],
                           "attribution": ["user0, Mapillary", None], "source_url": ["https://m/a", None]})
    points.to_parquet(tmp_path / "points.parquet")
    pairs = pd.DataFrame({"sv_id": ["b", "a", "a2"], "tile_id": ["t1", "t1", "t2"]})
    joined = with_provenance(pairs, tmp_path / "points.parquet")
    assert joined["sv_id"].tolist() == ["b", "a", "a2"]  # order and rows kept
    assert joined.loc[joined.sv_id == "a", "license"].item() == "CC-BY-SA-4.0"
    assert joined.loc[joined.sv_id == "b", "license"].isna().all()

    file_points = points.drop(columns=["source", "license", "attribution", "source_url"])
    file_points.to_parquet(tmp_path / "old.parquet")
    assert with_provenance(pairs, tmp_path / "old.parquet") is pairs  # older points files: nothing to join

    row = {"sv_id": "a", "lon": 13.2, "lat": 55.7, "x": 0.5, "y": 0.5, "col": 48, "row": 48, "tile_id": "t1",
           "split": "train", "lon_min": 13.1, "lat_max": 55.8, "lon_max": 13.3, "lat_min": 55.6,
           "license": "CC-BY-SA-4.0", "attribution": "user0, Mapillary", "source": "mapillary",
           "source_url": "https://m/a"}
    item = {"id": "i", "collection": "sentinel-2-l2a", "properties": {"datetime": "2022-01-01T00:00:00Z"}}
    meta = build_sample_json(row, item, b"", bands=["B02"], harmonized=False, processing_baseline=None)
    assert (meta["sv_license"], meta["sv_attribution"]) == ("CC-BY-SA-4.0", "user0, Mapillary")
    missing = build_sample_json({**row, "license": pd.NA, "attribution": float("nan"), "source": None,
                                 "source_url": pd.NA}, item, b"", bands=["B02"], harmonized=False,
                                processing_baseline=None)
    assert not any(k.startswith("sv_") and k not in {"sv_id", "sv_bytes"} for k in missing)
