"""Fixtures for gair_dataset tests: a local HTTP server with Range support (``shared_data`` is in tests/conftest.py)."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest


@dataclass
class RangeServerState:
    """Files served and scripted failures of the test HTTP server."""

    root: Path
    # path -> list of status codes to answer (then served normally), e.g. {"/a/x.tif": [503]}
    fail_next: dict[str, list[int]] = field(default_factory=dict)
    # if set, a request must carry ?sig=<one of these> or it gets 403
    valid_sigs: set[str] | None = None
    log: list[tuple[str, str, str, int]] = field(default_factory=list)  # (method, path, query, status)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _make_handler(state: RangeServerState) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:  # silence stderr
            pass

        def _finish(self, status: int, query: str, body: bytes = b"", headers: dict | None = None) -> None:
            with state.lock:
                state.log.append((self.command, urlsplit(self.path).path, query, status))
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _serve(self) -> None:
            parts = urlsplit(self.path)
            path, query = parts.path, parts.query
            with state.lock:
                script = state.fail_next.get(path)
                status = script.pop(0) if script else None
            if status is not None:
                self._finish(status, query, b"scripted failure")
                return
            if state.valid_sigs is not None:
                sig = parse_qs(query).get("sig", [""])[0]
                if sig not in state.valid_sigs:
                    self._finish(403, query, b"AuthenticationFailed: signature expired")
                    return
            # any prefix folders are ignored (unique prefixes defeat GDAL's per-URL cache)
            file = state.root / Path(path).name
            if not file.is_file():
                self._finish(404, query, b"not found")
                return
            data = file.read_bytes()
            total = len(data)
            rng = self.headers.get("Range")
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng or "")
            if m:
                start = int(m.group(1))
                end = min(int(m.group(2)) if m.group(2) else total - 1, total - 1)
                if start >= total:
                    self._finish(416, query, b"", {"Content-Range": f"bytes */{total}"})
                    return
                self._finish(206, query, data[start:end + 1], {
                    "Content-Range": f"bytes {start}-{end}/{total}", "Accept-Ranges": "bytes",
                    "Content-Type": "image/tiff"})
            else:
                self._finish(200, query, data, {"Accept-Ranges": "bytes", "Content-Type": "image/tiff"})

        do_GET = _serve
        do_HEAD = _serve

    return Handler


@dataclass
class RangeServer:
    """A running server: ``url(name, prefix)`` builds a URL for a file under ``state.root``."""

    base: str
    state: RangeServerState

    def url(self, name: str, prefix: str = "p") -> str:
        return f"{self.base}/{prefix}/{name}"


@pytest.fixture
def range_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[RangeServer]:
    """A threaded HTTP server on 127.0.0.1 serving ``tmp_path/www`` with Range requests."""
    root = tmp_path / "www"
    root.mkdir()
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    state = RangeServerState(root=root)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(state))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield RangeServer(f"http://127.0.0.1:{server.server_address[1]}", state)
    finally:
        server.shutdown()
        server.server_close()

