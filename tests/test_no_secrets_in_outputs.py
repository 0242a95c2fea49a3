"""No SAS token of a signed-URL run ends up in any output: files, shards, parquet, the Dagster event log or logs.

The region's catalog (an ndjson of Earth Search-shaped items over real pixels) has asset hrefs on a local HTTP
server that carry a Planetary Computer-style SAS query (``...&skoid=SECRETSKOID...&sig=SECRETSIG_CATALOG``). The
run reads chips through a signer that appends a *different* token (``sig=SECRETSIG_READ``), and the server
refuses any request without that signature, so every chip read really went through the signer. The code
location runs in a subprocess (its regions, catalog and data root are read when it loads) with an on-disk Dagster
instance; afterwards every file under the data root and the Dagster home (tar shards and other binaries as bytes,
parquet decoded cell by cell, gzip decompressed), the run's event log (materialization and check metadata
included) and the subprocess's stdout/stderr are searched for the secret markers and ``sig=``.
"""

from __future__ import annotations

import gzip
import json
import threading
from http.server import ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from tests.conftest import shared_path
from tests.dataset.conftest import RangeServerState, _make_handler
from tests.run_helpers import CHECKS_EXIT, run_python
from tests.stac.test_earth_search import BBOX, FIXTURES, write_rasters

CATALOG_QUERY = ("st=2024-01-01T00%3A00%3A00Z&se=2099-01-01T00%3A00%3A00Z&sp=rl&sv=2021-06-08&sr=c"
                 "&skoid=SECRETSKOID-0000&sktid=SECRETSKTID&sig=SECRETSIG_CATALOG%2Babc%3D")
READ_QUERY = "st=2024-01-01&se=2099-01-01&sp=rl&sv=2021-06-08&sr=c&skoid=SECRETSKOID-1111&sig=SECRETSIG_READ"
MARKERS = (b"SECRETSIG", b"SECRETSKOID", b"SECRETSKTID", b"sig=")

RUN = """
import json, sys
import dagster as dg
from pipelines.definitions import defs
from pipelines.defs.resources import resources
from pipelines.defs.shards.resources import RasterAccess

READ_QUERY = sys.argv[1]


class SigningRasterAccess(RasterAccess):
    def signer(self):
        return lambda href: href.split("?", 1)[0] + "?" + READ_QUERY


res = dict(resources().resources)
res["raster_access"] = SigningRasterAccess()
instance = dg.DagsterInstance.local_temp(tempdir=sys.argv[2])
region_assets = {"stac_items", "tile_grid", "sv_points", "pairs", "shards"}
assets = [a for a in defs.assets if any(k.to_user_string() in region_assets for k in a.keys)]
result = dg.materialize([*assets, *defs.asset_checks], selection=sorted(region_assets), resources=res,
                        partition_key="signed-region", instance=instance, raise_on_error=False)
with open(sys.argv[3], "w") as fh:  # the whole event log of the run, metadata included
    fh.write(dg.serialize_value(list(instance.all_logs(result.run_id))))
""" + CHECKS_EXIT


@pytest.fixture
def signed_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    root = tmp_path / "www"
    root.mkdir()
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    state = RangeServerState(root=root, valid_sigs={"SECRETSIG_READ"})
    server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(state))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", state
    finally:
        server.shutdown()
        server.server_close()


def _signed_catalog(folder: Path, base: str) -> Path:
    items = [json.loads((FIXTURES / n).read_text()) for n in ("s2_l2a_v1_item.json", "landsat_c2_l2_item.json")]
    for it in items:
        for asset in it["assets"].values():
            if asset["href"].startswith("./"):
                asset["href"] = f"{base}/p/{asset['href'][2:]}?{CATALOG_QUERY}"
        for link in it.get("links", []):
            link["href"] = link["href"].split("?", 1)[0] + "?" + CATALOG_QUERY
    path = folder / "items.ndjson"
    path.write_text("".join(json.dumps(it) + "\n" for it in items))
    assert "SECRETSIG_CATALOG" in path.read_text()
    return path


def _parquet_text(path: Path) -> bytes:
    table = pq.read_table(path)
    meta = table.schema.metadata or {}
    cells = json.dumps(table.to_pylist(), default=repr)
    return cells.encode() + b"".join(k + v for k, v in meta.items())


def _leaks(path: Path) -> list[str]:
    data = path.read_bytes()
    blobs = [data, str(path).encode()]
    if path.suffix == ".parquet":
        blobs.append(_parquet_text(path))
    if data[:2] == b"\x1f\x8b":
        blobs.append(gzip.decompress(data))
    return [f"{path}: {m.decode()}" for m in MARKERS for b in blobs if m in b]


def test_scanner_finds_tokens_in_text_parquet_and_gzip(tmp_path: Path) -> None:
    """The scan itself: a token in a compressed parquet cell or a gzip file is found."""
    href = f"https://acct.blob.core.windows.net/c/B04.tif?{CATALOG_QUERY}"
    pd.DataFrame({"href": [href] * 50}).to_parquet(tmp_path / "t.parquet", compression="zstd")
    (tmp_path / "t.gz").write_bytes(gzip.compress(href.encode() * 10))
    for name in ("t.parquet", "t.gz"):
        assert any("SECRETSIG" in hit for hit in _leaks(tmp_path / name)), name


@pytest.mark.slow
def test_signed_run_leaks_no_token(tmp_path: Path, signed_server) -> None:
    base, state = signed_server
    write_rasters(state.root)
    catalog = _signed_catalog(tmp_path, base)
    photos = sorted(shared_path("streetview", "exif_photos", "lund").glob("*.jpg"))
    rng = np.random.default_rng(0)
    n = 30
    pd.DataFrame({"id": [f"sg{i:03d}" for i in range(n)],
                  "lon": rng.uniform(BBOX[0], BBOX[2], n), "lat": rng.uniform(BBOX[1], BBOX[3], n),
                  "image_path": [str(photos[i % len(photos)]) for i in range(n)]}).to_csv(tmp_path / "points.csv",
                                                                                        index=False)
    (tmp_path / "regions.yaml").write_text(f"""
regions:
  signed-region:
    bbox: [{BBOX[0]}, {BBOX[1]}, {BBOX[2]}, {BBOX[3]}]
    collections: [sentinel-2-l2a, landsat-c2-l2]
    datetime: 2020-01-01/2025-12-31
    max_cloud_cover: 30
    tile_grid: {{kind: utm, tile_px: 32, resolution: 10.0, items_per_tile: 2}}
    split: {{block_tiles: 1, val_fraction: 0.2, test_fraction: 0.2, seed: 0}}
    streetview: {{kind: table, path: points.csv}}
""")
    data, home, events = tmp_path / "data", tmp_path / "dagster_home", tmp_path / "events.json"
    home.mkdir()
    env = {"GAIR_REGIONS": str(tmp_path / "regions.yaml"), "GAIR_DATA_ROOT": str(data),
           "GAIR_STAC_CATALOG": str(catalog), "DAGSTER_HOME": str(home), "NO_PROXY": "127.0.0.1,localhost"}
    proc = run_python(RUN, READ_QUERY, str(home), str(events), env=env)

    # the chips really were read through the signer: signed requests served, none refused
    served = [(q, s) for _, _, q, s in state.log]
    assert any("sig=SECRETSIG_READ" in q and s in (200, 206) for q, s in served), served[:5]
    assert not any(s == 403 for _, s in served), [x for x in served if x[1] == 403][:5]
    shards = sorted((data / "shards" / "signed-region").glob("*.tar"))
    assert shards and pd.read_parquet(data / "shards" / "signed-region" / "manifest.parquet").shape[0] > 0

    files = [p for root in (data, home) for p in root.rglob("*") if p.is_file()] + [events]
    assert len(files) > 10 and any(p.suffix == ".parquet" for p in files)
    leaks = [hit for p in files for hit in _leaks(p)]
    out = (proc.stdout + proc.stderr).encode()
    leaks += [f"subprocess output: {m.decode()}" for m in MARKERS if m in out]
    assert not leaks, leaks
    # the event log does hold the run's materializations and checks (the scan had something to scan)
    text = events.read_text()
    assert "ASSET_MATERIALIZATION" in text and "ASSET_CHECK_EVALUATION" in text and "items_json" in text
