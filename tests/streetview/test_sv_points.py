"""Street-view point sources: EXIF on real geotagged photos, tables, validation with reasons."""

import math

import pandas as pd
import pytest

from gair_dataset.streetview_points import (
    load_exif_folder,
    load_table,
    read_exif_point,
    sanitize_id,
    validate_points,
)
from tests.conftest import shared_path


def test_exif_gps_of_real_lund_photos():
    folder = shared_path("streetview", "exif_photos", "lund")
    points, rejects = load_exif_folder(folder)
    assert len(points) == 29 and rejects.empty
    assert points["lat"].between(55.69, 55.71).all()
    assert points["lon"].between(13.19, 13.20).all()
    assert points["sv_id"].tolist() == sorted(points["sv_id"]) and points["sv_id"].is_unique
    assert all("." not in i for i in points["sv_id"])


def test_exif_berlin_and_panoramas():
    berlin, _ = load_exif_folder(shared_path("streetview", "exif_photos", "berlin"))
    assert len(berlin) == 3 and berlin["lat"].between(52.5, 52.53).all() and berlin["lon"].between(13.39, 13.41).all()
    pano = read_exif_point(shared_path("streetview", "panoramas", "1.jpg"))
    assert math.isclose(pano["lat"], 49.0069, abs_tol=1e-3) and math.isclose(pano["lon"], 1.9192, abs_tol=1e-3)
    assert pano["captured_at"].startswith("2021-07-29")


def test_unreadable_and_gps_less_images_are_rejected_with_reason(tmp_path):
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "no_gps.jpg")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    src = shared_path("streetview", "exif_photos", "lund", "01.jpg")
    (tmp_path / "ok.jpg").write_bytes(src.read_bytes())
    points, rejects = load_exif_folder(tmp_path)
    assert points["sv_id"].tolist() == ["ok"]
    reasons = dict(zip(rejects["sv_id"], rejects["reason"], strict=True))
    assert reasons["no_gps"] == "no GPS position in EXIF"
    assert reasons["broken"].startswith("unreadable image")


def test_place_pulse_csv_table():
    csv = shared_path("eval", "streetview", "place_pulse_1", "streetwise_data_320.csv")
    table = load_table(csv, image_root=shared_path("eval", "streetview", "place_pulse_1", "images320"))
    assert len(table) == len(pd.read_csv(csv)) > 2000
    valid, rejects = validate_points(table)
    assert len(valid) + len(rejects) == len(table)
    assert valid["lat"].between(40, 49).all()
    assert valid["image_uri"].str.endswith(".jpg").all()


def test_validation_reasons():
    df = pd.DataFrame({
        "sv_id": ["a", "b", "c", "d", "e", "a", None, "g.h"],
        "lon": [10.0, float("nan"), 200.0, 10.0, 0.0, 10.0, 10.0, 11.0],
        "lat": [50.0, 50.0, 50.0, -95.0, 0.0, 50.0, 50.0, 51.0],
        "image_uri": ["x.jpg"] * 8, "heading": [None] * 8, "captured_at": [None] * 8,
    })
    valid, rejects = validate_points(df)
    assert valid["sv_id"].tolist() == ["a", "g-h"]
    assert dict(zip(rejects["sv_id"], rejects["reason"], strict=True)) == {
        "b": "non-finite coordinate", "c": "longitude out of range [-180, 180]",
        "d": "latitude out of range [-90, 90]", "e": "null island (0, 0)", "a": "duplicate id", "": "missing id"}


@pytest.mark.parametrize("raw,clean", [("lund/01", "lund-01"), ("img.2021.jpg", "img-2021-jpg"), ("a_b-C9", "a_b-C9")])
def test_sanitize_id(raw, clean):
    assert sanitize_id(raw) == clean
