"""Writes the embedded sample: a local STAC catalog + street-view points for two synthetic regions.

**Everything written here is synthetic**: items carry ``"gair:synthetic": true``, every folder has a
``SYNTHETIC.md``. The catalog follows the Planetary Computer ``sentinel-2-l2a`` item schema (band assets as
COGs in a UTM CRS with ``proj:*`` fields, ``eo:cloud_cover``, ``s2:processing_baseline``, several dates), so
the same code reads it and the real catalog.

Usage::

    python -m gair_dataset.sample_region --out gair_data/sample
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import geopandas as gpd
import numpy as np
import rasterio
from rasterio.transform import from_origin
from shapely.geometry import Point, box, mapping

from gair_dataset.atomic import atomic_path, file_lock
from gair_dataset.geo import reproject, transformer
from gair_dataset.sample_scene import (
    S2_BANDS,
    Acquisition,
    encode_jpeg,
    make_land_cover,
    render_band,
    render_street_view,
    scl_from,
)

log = logging.getLogger(__name__)

GENERATOR_VERSION = 1
COLLECTION = "sentinel-2-l2a"
_COMMON = {"B01": "coastal", "B02": "blue", "B03": "green", "B04": "red", "B05": "rededge", "B06": "rededge",
           "B07": "rededge", "B08": "nir", "B8A": "nir08", "B09": "nir09", "B11": "swir16", "B12": "swir22"}
_WAVELENGTH = {"B01": 0.443, "B02": 0.49, "B03": 0.56, "B04": 0.665, "B05": 0.704, "B06": 0.74, "B07": 0.783,
               "B08": 0.842, "B8A": 0.865, "B09": 0.945, "B11": 1.61, "B12": 2.19}


@dataclass(frozen=True)
class SampleRegion:
    """One synthetic region: a square of ``size_m`` metres around a centre, in one UTM zone."""

    name: str
    lon: float
    lat: float
    epsg: int
    mgrs: str
    seed: int
    size_m: float = 6000.0
    margin_m: float = 1500.0
    n_points: int = 1200


SAMPLE_REGIONS: tuple[SampleRegion, ...] = (
    SampleRegion("sample-lund", 13.19, 55.70, 32633, "33UUB", seed=11),
    SampleRegion("sample-pontoise", 1.92, 49.01, 32631, "31UDQ", seed=23),
)

ACQUISITIONS: tuple[Acquisition, ...] = (
    Acquisition("2021-06-14T10:30:31.024000Z", "03.00", season=0.9, cloud_seed=None),
    Acquisition("2022-05-20T10:40:21.024000Z", "04.00", season=0.7, cloud_seed=7),
    Acquisition("2023-08-02T10:36:29.024000Z", "05.09", season=1.0, cloud_seed=None),
)


def region_utm_bounds(region: SampleRegion) -> tuple[float, float, float, float]:
    """The region square in its UTM CRS, snapped to a 10 m grid: ``(minx, miny, maxx, maxy)``."""
    cx, cy = transformer(4326, region.epsg).transform(region.lon, region.lat)
    half = region.size_m / 2
    return (round((cx - half) / 10) * 10, round((cy - half) / 10) * 10,
            round((cx + half) / 10) * 10, round((cy + half) / 10) * 10)


def region_bbox(region: SampleRegion) -> list[float]:
    """The region's bbox in EPSG:4326 ``[west, south, east, north]`` (what regions.yaml declares)."""
    geom = reproject(box(*region_utm_bounds(region)).segmentize(100), region.epsg, 4326)
    return [round(v, 6) for v in geom.bounds]


def _write_cog(path: Path, array: np.ndarray, transform, epsg: int, nodata: int | None) -> None:
    profile = {"driver": "COG", "dtype": array.dtype.name, "count": 1, "height": array.shape[0],
               "width": array.shape[1], "crs": f"EPSG:{epsg}", "transform": transform,
               "compress": "deflate", "blocksize": 256, "overview_resampling": "average"}
    if nodata is not None:
        profile["nodata"] = nodata
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(array, 1)


def _item_id(region: SampleRegion, acq: Acquisition) -> str:
    stamp = acq.date[:19].replace("-", "").replace(":", "")
    return f"S2B_MSIL2A_{stamp}_R108_T{region.mgrs}_SYNTHETIC"


def _write_item(region: SampleRegion, acq: Acquisition, cover, origin: tuple[float, float], size_px: int,
                item_dir: Path, seed: int) -> dict:
    item_id = _item_id(region, acq)
    item_dir.mkdir(parents=True, exist_ok=True)
    ox, oy = origin
    assets: dict[str, dict] = {}
    cloud20 = None
    for k, band in enumerate(S2_BANDS):
        res = S2_BANDS[band]
        dn, cloud = render_band(cover, band, acq, seed=seed * 100 + k)
        if res == 20:
            cloud20 = cloud
        transform = from_origin(ox, oy, res, res)
        _write_cog(item_dir / f"{band}.tif", dn, transform, region.epsg, nodata=0)
        assets[band] = {
            "href": f"./{band}.tif",
            "proj:bbox": [ox, oy - dn.shape[0] * res, ox + dn.shape[1] * res, oy],
            "proj:shape": list(dn.shape),
            "proj:transform": [float(res), 0.0, ox, 0.0, -float(res), oy],
            "gsd": float(res),
            "type": "image/tiff; application=geotiff; profile=cloud-optimized",
            "roles": ["data"],
            "title": f"Band {band[1:].lstrip('0')} - {_COMMON[band]} - {res}m (synthetic)",
            "eo:bands": [{"name": band, "common_name": _COMMON[band], "center_wavelength": _WAVELENGTH[band]}],
        }
    if cloud20 is None:
        raise RuntimeError("no 20 m band rendered: the SCL band needs the 20 m cloud mask")
    scl = scl_from(cover, cloud20)
    _write_cog(item_dir / "SCL.tif", scl, from_origin(ox, oy, 20, 20), region.epsg, nodata=0)
    assets["SCL"] = {
        "href": "./SCL.tif", "proj:shape": list(scl.shape), "proj:transform": [20.0, 0.0, ox, 0.0, -20.0, oy],
        "proj:bbox": [ox, oy - scl.shape[0] * 20, ox + scl.shape[1] * 20, oy], "gsd": 20.0,
        "type": "image/tiff; application=geotiff; profile=cloud-optimized", "roles": ["data"],
        "title": "Scene classification map (SCL) (synthetic)",
    }
    extent = size_px * cover.resolution
    footprint_utm = box(ox, oy - extent, ox + extent, oy).segmentize(200)
    footprint = reproject(footprint_utm, region.epsg, 4326)
    cloud_cover = round(float(cloud20.mean() * 100), 4)
    item = {
        "type": "Feature",
        "stac_version": "1.0.0",
        "stac_extensions": [
            "https://stac-extensions.github.io/eo/v1.0.0/schema.json",
            "https://stac-extensions.github.io/projection/v1.1.0/schema.json",
            "https://stac-extensions.github.io/sat/v1.0.0/schema.json",
        ],
        "id": item_id,
        "collection": COLLECTION,
        "bbox": [round(v, 7) for v in footprint.bounds],
        "geometry": mapping(footprint),
        "properties": {
            "datetime": acq.date,
            "platform": "Sentinel-2B",
            "constellation": "Sentinel 2",
            "instruments": ["msi"],
            "proj:epsg": region.epsg,
            "proj:code": f"EPSG:{region.epsg}",
            "s2:mgrs_tile": region.mgrs,
            "s2:processing_baseline": acq.processing_baseline,
            "s2:product_type": "S2MSI2A",
            "eo:cloud_cover": cloud_cover,
            "sat:orbit_state": "descending",
            "sat:relative_orbit": 108,
            "gair:synthetic": True,
            "gair:region": region.name,
        },
        "links": [
            {"rel": "root", "href": "../../catalog.json", "type": "application/json"},
            {"rel": "parent", "href": "../collection.json", "type": "application/json"},
            {"rel": "collection", "href": "../collection.json", "type": "application/json"},
        ],
        "assets": assets,
    }
    item["geometry"] = json.loads(json.dumps(item["geometry"]))  # tuples -> lists
    (item_dir / f"{item_id}.json").write_text(json.dumps(item, indent=1))
    return item


def _sample_points(region: SampleRegion, roads, rng: np.random.Generator) -> list[tuple[float, float, float]]:
    """(x, y, heading) of SV cameras: mostly along roads looking along or across them, some anywhere."""
    minx, miny, maxx, maxy = region_utm_bounds(region)
    out: list[tuple[float, float, float]] = []
    lengths = np.array([len(r[0]) for r in roads], dtype=float)
    while len(out) < region.n_points:
        if rng.random() < 0.85:
            r = rng.choice(len(roads), p=lengths / lengths.sum())
            rx, ry = roads[r]
            i = int(rng.integers(1, len(rx)))
            ang = math.degrees(math.atan2(rx[i] - rx[i - 1], ry[i] - ry[i - 1]))
            x = rx[i] + rng.normal(0, 2.0)
            y = ry[i] + rng.normal(0, 2.0)
            heading = (ang + rng.choice([0, 90, 180, 270]) + rng.normal(0, 10)) % 360
        else:
            x, y = rng.uniform(minx, maxx), rng.uniform(miny, maxy)
            heading = rng.uniform(0, 360)
        if minx <= x < maxx and miny <= y < maxy:
            out.append((float(x), float(y), float(heading)))
    return out


def _write_region(region: SampleRegion, root: Path) -> dict:
    t0 = time.perf_counter()
    minx, _miny, maxx, maxy = region_utm_bounds(region)
    origin = (minx - region.margin_m, maxy + region.margin_m)
    size_px = int((region.size_m + 2 * region.margin_m) / 10)
    cover, roads = make_land_cover(region.seed, origin[0], origin[1], size_px, 10.0, region.epsg)

    coll_dir = root / "catalog" / COLLECTION
    items = []
    for k, acq in enumerate(ACQUISITIONS):
        item = _write_item(region, acq, cover, origin, size_px, coll_dir / _item_id(region, acq),
                           seed=region.seed * 10 + k)
        items.append(item)

    rng = np.random.default_rng(region.seed + 1000)
    cams = _sample_points(region, roads, rng)
    to_ll = transformer(region.epsg, 4326)
    sv_dir = root / "streetview" / region.name
    img_dir = sv_dir / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    prefix = region.name.replace("sample-", "")
    rows = []
    for i, (x, y, heading) in enumerate(cams):
        sv_id = f"{prefix}-{i:05d}"
        date = ("2021-07-02", "2022-06-11", "2023-09-15")[i % 3]
        rgb = render_street_view(cover, x, y, heading, seed=region.seed * 100000 + i,
                                 sky_brightness=(0.95, 1.0, 1.08)[i % 3])
        (img_dir / f"{sv_id}.jpg").write_bytes(encode_jpeg(rgb))
        lon, lat = to_ll.transform(x, y)
        rows.append({"sv_id": sv_id, "lon": lon, "lat": lat, "image_path": f"images/{sv_id}.jpg",
                     "heading": round(heading, 2), "captured_at": f"{date}T12:00:00Z"})
        if (i + 1) % 500 == 0:
            log.info("%s: rendered %d/%d street-view images", region.name, i + 1, len(cams))
    # A few points far outside every tile (they must be reported, not paired).
    for j in range(10):
        x, y = maxx + 20000 + 150 * j, maxy + 15000
        lon, lat = to_ll.transform(x, y)
        sv_id = f"{prefix}-far{j:02d}"
        rgb = render_street_view(cover, x, y, 0.0, seed=j)
        (img_dir / f"{sv_id}.jpg").write_bytes(encode_jpeg(rgb))
        rows.append({"sv_id": sv_id, "lon": lon, "lat": lat, "image_path": f"images/{sv_id}.jpg",
                     "heading": 0.0, "captured_at": "2022-06-11T12:00:00Z"})
    # Deliberately bad rows, to exercise validation: NaN, out of range, a duplicate id.
    rows.append({"sv_id": f"{prefix}-bad-nan", "lon": float("nan"), "lat": region.lat,
                 "image_path": "images/missing.jpg", "heading": None, "captured_at": None})
    rows.append({"sv_id": f"{prefix}-bad-lat", "lon": region.lon, "lat": 95.0,
                 "image_path": "images/missing.jpg", "heading": None, "captured_at": None})
    rows.append(dict(rows[0]))
    gdf = gpd.GeoDataFrame(rows, geometry=[Point(r["lon"], r["lat"]) for r in rows], crs="EPSG:4326")
    gdf.to_parquet(sv_dir / "points.parquet", index=False)
    (sv_dir / "SYNTHETIC.md").write_text("Synthetic street-view images rendered from the sample land cover.\n")
    log.info("%s: %d items, %d SV points in %.1fs", region.name, len(items), len(rows), time.perf_counter() - t0)
    return {"region": region.name, "items": [it["id"] for it in items], "points": len(rows),
            "bbox": region_bbox(region), "epsg": region.epsg}


def _write_catalog_json(root: Path, items: list[str]) -> None:
    cat = root / "catalog"
    catalog = {
        "type": "Catalog", "stac_version": "1.0.0", "id": "gair-sample",
        "description": "SYNTHETIC sample catalog generated by gair_dataset.sample_region (not real data).",
        "links": [{"rel": "root", "href": "./catalog.json", "type": "application/json"},
                  {"rel": "child", "href": f"./{COLLECTION}/collection.json", "type": "application/json"}],
    }
    (cat / "catalog.json").write_text(json.dumps(catalog, indent=1))
    collection = {
        "type": "Collection", "stac_version": "1.0.0", "id": COLLECTION,
        "description": "SYNTHETIC Sentinel-2 L2A-like items (PC item schema) for the GAIR sample region.",
        "license": "CC0-1.0",
        "extent": {"spatial": {"bbox": [[-180, -90, 180, 90]]},
                   "temporal": {"interval": [[ACQUISITIONS[0].date, ACQUISITIONS[-1].date]]}},
        "links": [{"rel": "root", "href": "../catalog.json", "type": "application/json"},
                  {"rel": "parent", "href": "../catalog.json", "type": "application/json"}]
        + [{"rel": "item", "href": f"./{i}/{i}.json", "type": "application/json"} for i in sorted(items)],
    }
    (cat / COLLECTION / "collection.json").write_text(json.dumps(collection, indent=1))


def generate_sample(out: Path) -> dict:
    """Generate the whole sample into ``out`` atomically (a temporary folder renamed at the end).

    Returns:
        A summary dict (also written to ``out/SYNTHETIC.json``).
    """
    with atomic_path(Path(out)) as tmp:  # a folder of this call only; replaces ``out`` when complete
        tmp.mkdir()
        # One process per region: the two regions are independent and rendering is CPU-bound.
        with ProcessPoolExecutor(max_workers=min(len(SAMPLE_REGIONS), os.cpu_count() or 1)) as pool:
            summaries = list(pool.map(_write_region, SAMPLE_REGIONS, [tmp] * len(SAMPLE_REGIONS)))
        _write_catalog_json(tmp, [i for s in summaries for i in s["items"]])
        summary = {"synthetic": True, "generator_version": GENERATOR_VERSION, "regions": summaries}
        (tmp / "SYNTHETIC.json").write_text(json.dumps(summary, indent=1))
        (tmp / "SYNTHETIC.md").write_text(
            "# SYNTHETIC sample data\n\nGenerated by `gair_dataset.sample_region`; not real imagery.\n")
    return summary


def ensure_sample(out: Path) -> Path:
    """Generate the sample into ``out`` unless a current version is already there (safe across processes)."""
    out = Path(out)
    stamp = out / "SYNTHETIC.json"

    def current() -> bool:
        try:
            return json.loads(stamp.read_text()).get("generator_version") == GENERATOR_VERSION
        except (OSError, ValueError):
            return False

    if current():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(out.parent / f".{out.name}.lock"):
        if not current():
            log.info("generating the synthetic sample region into %s", out)
            generate_sample(out)
    return out


def main(argv: list[str] | None = None) -> None:
    """CLI: generate the sample region."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(os.environ.get("GAIR_DATA_ROOT", "gair_data"), "sample"))
    parser.add_argument("--force", action="store_true", help="regenerate even if present")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.force:
        print(json.dumps(generate_sample(Path(args.out)), indent=1))
    else:
        ensure_sample(Path(args.out))
        print(Path(args.out, "SYNTHETIC.json").read_text())


if __name__ == "__main__":
    main()
