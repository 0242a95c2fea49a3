"""The live STAC client against a real STAC API (rustac, in-memory) on 127.0.0.1 behind a fault injector."""

import http.client
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from gair_dataset.stac_catalog import SearchParams, StacSearchError, search_live
from tests.conftest import shared_path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rustac() -> str:
    exe = shutil.which("rustac") or str(Path(sys.executable).parent / "rustac")
    if not Path(exe).exists():
        pytest.skip("rustac is not installed (pip install -e '.[dev]')")
    return exe


class FaultProxy(ThreadingHTTPServer):
    """Forwards to the STAC server; answers the scripted statuses first (e.g. 429 then 503) for POST /search."""

    daemon_threads = True

    def __init__(self, port: int, upstream: int):
        self.upstream = upstream
        self.faults: list[int] = []
        self.log: list[tuple[str, str, int]] = []
        super().__init__(("127.0.0.1", port), _Handler)


class _Handler(BaseHTTPRequestHandler):
    server: FaultProxy

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _forward(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        if self.command == "POST" and self.path.endswith("/search") and self.server.faults:
            status = self.server.faults.pop(0)
            self.server.log.append((self.command, self.path, status))
            payload = json.dumps({"code": "injected", "description": f"injected {status}"}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            if status == 429:
                self.send_header("Retry-After", "1")
            self.end_headers()
            self.wfile.write(payload)
            return
        conn = http.client.HTTPConnection("127.0.0.1", self.server.upstream, timeout=10)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
        conn.request(self.command, self.path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        self.server.log.append((self.command, self.path, resp.status))
        self.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = _forward


@pytest.fixture(scope="module")
def stac_api(tmp_path_factory):
    """rustac serving 22 real Sentinel-2 L2A items (two odc-stac item collections), behind FaultProxy."""
    items = []
    for name in ("odc-stac__site1-20200606-tall-strip-africa.geojson", "odc-stac__site2-2020_jun_jul-35MNM.geojson"):
        items += json.loads(shared_path("stac", "items", name).read_text())["features"]
    uniq = {it["id"]: it for it in items}
    path = tmp_path_factory.mktemp("stac") / "items.json"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": list(uniq.values())}))
    rustac, proxy_port, server_port = _rustac(), _free_port(), _free_port()
    # Its log goes to a file, not to a pipe that nobody drains.
    log = path.with_name("rustac.log")
    with open(log, "wb") as log_fh:
        proc = subprocess.Popen([rustac, "serve", "--create-collections", "--addr", f"http://127.0.0.1:{proxy_port}",
                                 "--bind", f"127.0.0.1:{server_port}", str(path)],
                                stdout=log_fh, stderr=subprocess.STDOUT)
    proxy = FaultProxy(proxy_port, server_port)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        deadline = time.time() + 30
        while True:
            try:
                c = http.client.HTTPConnection("127.0.0.1", server_port, timeout=1)
                c.request("GET", "/")
                if c.getresponse().status == 200:
                    break
            except OSError:
                pass
            if time.time() > deadline or proc.poll() is not None:
                out = log.read_text(errors="replace")
                pytest.fail(f"rustac serve did not start: {out[-2000:]}")
            time.sleep(0.2)
        yield f"http://127.0.0.1:{proxy_port}", proxy, len(uniq)
    finally:
        proxy.shutdown()
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:  # seen once: the server had inherited an ignored SIGTERM from the run
            proc.kill()
            proc.wait(timeout=10)


def test_search_pages_through_real_server(stac_api):
    url, proxy, n = stac_api
    proxy.faults = []
    params = SearchParams(collections=("sentinel-2-l2a",), bbox=(-180, -90, 180, 90), limit=5, max_items=None)
    items = search_live(url, params, max_retries=2, backoff_factor=0.01)
    assert len(items) == n == 21  # 9 + 13 items, one id in both collections
    pages = [e for e in proxy.log if e[0] == "POST" or "/search" in e[1]]
    assert len(pages) >= 5  # 22 items at 5 per page


def test_retries_survive_429_and_503(stac_api):
    url, proxy, _ = stac_api
    proxy.log.clear()
    proxy.faults = [429, 503]
    params = SearchParams(collections=("sentinel-2-l2a",), bbox=(-180, -90, 180, 90),
                          datetime="2020-06-01/2020-06-30", limit=50, max_items=None)
    items = search_live(url, params, max_retries=3, backoff_factor=0.01)
    statuses = [s for m, p, s in proxy.log if m == "POST"]
    assert statuses[:3] == [429, 503, 200]
    assert items and all(it["properties"]["datetime"].startswith("2020-06") for it in items)


def test_bbox_and_cloud_filter(stac_api):
    url, proxy, _ = stac_api
    proxy.faults = []
    everything = search_live(url, SearchParams(collections=("sentinel-2-l2a",), bbox=(-180, -90, 180, 90),
                                               max_items=None), max_retries=0)
    north = max(it["bbox"][3] for it in everything)
    part = search_live(url, SearchParams(collections=("sentinel-2-l2a",), bbox=(-180, north - 0.01, 180, 90),
                                         max_items=None), max_retries=0)
    assert all(it["bbox"][3] >= north - 0.01 for it in part)
    assert 0 < len(part) < len(everything)
    clear = search_live(url, SearchParams(collections=("sentinel-2-l2a",), bbox=(-180, -90, 180, 90),
                                          max_cloud_cover=10, max_items=None), max_retries=0)
    assert all(it["properties"]["eo:cloud_cover"] <= 10 for it in clear)


def test_empty_search_returns_nothing_not_an_error(stac_api):
    url, proxy, _ = stac_api
    proxy.faults = []
    params = SearchParams(collections=("sentinel-2-l2a",), bbox=(10, 10, 10.1, 10.1), max_items=None)
    assert search_live(url, params, max_retries=0) == []


def test_persistent_503_is_a_clear_error(stac_api):
    url, proxy, _ = stac_api
    proxy.faults = [503] * 5
    params = SearchParams(collections=("sentinel-2-l2a",), bbox=(-180, -90, 180, 90), max_items=5)
    with pytest.raises(StacSearchError, match="failed"):
        search_live(url, params, max_retries=2, backoff_factor=0.01)
    proxy.faults = []


def test_unreachable_catalog_is_a_clear_error():
    params = SearchParams(collections=("sentinel-2-l2a",), bbox=(0, 0, 1, 1))
    with pytest.raises(StacSearchError, match="failed"):
        search_live(f"http://127.0.0.1:{_free_port()}", params, max_retries=1, backoff_factor=0.01, timeout=2)
