"""Loopback servers that misbehave on cue, for the fault-injection tests and ``bench/faults_bench.py``.

* :class:`FaultyStacApi`: a real STAC API (``rustac serve``, in memory) behind a proxy that answers the next
  ``POST /search`` requests with a scripted fault: ``429`` (with ``Retry-After``), ``503``, ``stall`` (no answer
  until released, longer than any client timeout) or ``malformed`` (HTTP 200 with half of the real page).
* :class:`FaultyRasterServer`: GeoTIFFs over HTTP range requests, Azure-SAS style: every read needs a
  ``se=<expiry>&sig=<signature>`` query whose expiry is in the future by the server's clock, and ``/token`` hands
  out such tokens (like the Planetary Computer's SAS API). Faults: :meth:`FaultyRasterServer.expire_tokens` (every
  token issued so far is expired: 403 until re-signed with a fresh token), :meth:`FaultyRasterServer.cut_next`
  (the next range answers stop mid-body and drop the connection) and :meth:`FaultyRasterServer.hold_reads` (reads
  wait until released, so a test can act while a build is in the middle of its shards step). Not a fault:
  ``latency_s`` (default 0) delays every file answer, like an object store's time to first byte
  (``bench/refresh_bench.py``), and ``state.range_bytes_served`` counts the bytes of range answers.
* :class:`LoopbackSigner`: the client side of ``/token``: caches one token per token URL for the process (as
  ``planetary_computer`` does) and drops it on ``refresh`` (what the chip reader calls after a 403).

Only the standard library (and the ``rustac`` executable of the dev extra) is used.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import re
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import parse_qs, urlsplit

#: How long a stalled or held request waits for its release at most (seconds): far beyond any client timeout.
MAX_HOLD_S = 60.0


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _QuietServer(ThreadingHTTPServer):
    """A threaded server that does not print the broken connections of clients that stop reading (GDAL does)."""

    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)


def _serve(server: ThreadingHTTPServer) -> threading.Thread:
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    return thread


# -- STAC API ---------------------------------------------------------------------------------------------------

STAC_FAULTS = ("429", "503", "stall", "malformed")


class _StacProxy(_QuietServer):
    def __init__(self, port: int, upstream: int, api: FaultyStacApi) -> None:
        self.upstream = upstream
        self.api = api
        super().__init__(("127.0.0.1", port), _StacHandler)


class _StacHandler(BaseHTTPRequestHandler):
    server: _StacProxy
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:  # keep test output clean
        pass

    def _send(self, status: int, body: bytes, headers: dict[str, str]) -> None:
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _upstream(self, body: bytes | None) -> tuple[int, bytes, dict[str, str]]:
        conn = http.client.HTTPConnection("127.0.0.1", self.server.upstream, timeout=30)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
        conn.request(self.command, self.path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        kept = {k: v for k, v in resp.getheaders()
                if k.lower() not in ("transfer-encoding", "connection", "content-length")}
        return resp.status, data, kept

    def _handle(self) -> None:
        api = self.server.api
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        fault = api._next_fault(self.command, self.path)
        if fault == "stall":
            api._record(self.command, self.path, "stall")
            api._stalled.set()
            api.release.wait(MAX_HOLD_S)
            self.close_connection = True
            return  # never answers: the client's read timeout fires first
        if fault in ("429", "503"):
            api._record(self.command, self.path, fault)
            payload = json.dumps({"code": "injected", "description": f"injected {fault}"}).encode()
            extra = {"Retry-After": str(api.retry_after_s)} if fault == "429" else {}
            self._send(int(fault), payload, {"Content-Type": "application/json", **extra})
            return
        status, data, headers = self._upstream(body)
        if fault == "malformed":
            api._record(self.command, self.path, "malformed")
            self._send(200, data[: len(data) // 2], headers)  # a page cut in half: not JSON
            return
        api._record(self.command, self.path, str(status))
        self._send(status, data, headers)

    do_GET = do_POST = _handle


class FaultyStacApi:
    """``rustac serve`` with the given items behind a fault-injecting proxy on 127.0.0.1.

    Use as a context manager; ``url`` is the API root (links in its answers point at the proxy).
    """

    def __init__(self, items: list[dict[str, Any]], folder: Path, *, retry_after_s: int = 1) -> None:
        """Write the items into ``folder`` and prepare the servers (started by ``__enter__``)."""
        self.items_path = folder / "stac_items.json"
        self.items_path.write_text(json.dumps({"type": "FeatureCollection", "features": items}))
        self.retry_after_s = retry_after_s
        self.upstream_port = free_port()
        self.port = 0  # the proxy's, bound when it starts (port 0: no race with another process for a free port)
        self.url = ""
        self.log_path = folder / "rustac.log"  # a file, not a pipe nobody drains
        self.release = threading.Event()
        self.log: list[tuple[float, str, str, str]] = []  # (monotonic time, method, path, outcome: status or fault)
        self._faults: list[str] = []
        self._stalled = threading.Event()
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._proxy: _StacProxy | None = None

    def inject(self, *faults: str) -> None:
        """Answer the next ``POST .../search`` requests with these faults, one each, in order."""
        unknown = [f for f in faults if f not in STAC_FAULTS]
        if unknown:
            raise ValueError(f"unknown STAC fault(s) {unknown}; known: {STAC_FAULTS}")
        with self._lock:
            self._faults = list(faults)
            self.release.clear()
            self._stalled.clear()

    def pending(self) -> list[str]:
        """Faults not served yet."""
        with self._lock:
            return list(self._faults)

    def served(self, outcome: str) -> int:
        """How many requests got ``outcome`` (a fault name or a status code)."""
        with self._lock:
            return sum(1 for _, _, _, o in self.log if o == outcome)

    def _next_fault(self, method: str, path: str) -> str | None:
        if method != "POST" or not urlsplit(path).path.endswith("/search"):
            return None
        with self._lock:
            return self._faults.pop(0) if self._faults else None

    def _record(self, method: str, path: str, outcome: str) -> None:
        with self._lock:
            self.log.append((time.monotonic(), method, path, outcome))

    def __enter__(self) -> FaultyStacApi:
        exe = shutil.which("rustac") or str(Path(sys.executable).parent / "rustac")
        if not Path(exe).exists():
            raise FileNotFoundError("the rustac executable is not installed (pip install -e '.[dev]')")
        self._proxy = _StacProxy(0, self.upstream_port, self)
        self.port = int(self._proxy.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}"
        _serve(self._proxy)
        with open(self.log_path, "wb") as log:
            self._proc = subprocess.Popen(
                [exe, "serve", "--create-collections", "--addr", self.url, "--bind",
                 f"127.0.0.1:{self.upstream_port}", str(self.items_path)], stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:  # rustac needs a moment to load the items
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.upstream_port, timeout=1)
                conn.request("GET", "/")
                if conn.getresponse().status == 200:
                    break
            except OSError:
                pass
            if self._proc.poll() is not None or time.monotonic() > deadline:
                self.__exit__()
                out = self.log_path.read_text(errors="replace")
                raise RuntimeError(f"rustac serve did not start: {out[-2000:]}")
            time.sleep(0.1)
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        if self._proxy is not None:
            self._proxy.shutdown()
            self._proxy.server_close()
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:  # SIGTERM ignored (a disposition inherited from the parent)
                self._proc.kill()
                self._proc.wait(timeout=10)


# -- raster server ----------------------------------------------------------------------------------------------

_RANGE = re.compile(r"bytes=(\d+)-(\d*)")
EXPIRED_MESSAGE = b"AuthenticationFailed: Signature not valid in the specified time frame"


@dataclass
class RasterServerState:
    """Files served, tokens and scripted faults of :class:`FaultyRasterServer`."""

    root: Path
    secret: bytes = b"loopback-secret"
    skew: timedelta = timedelta(0)  # added to the server's clock: expire_tokens() moves it past every token
    cuts: int = 0  # next range answers cut mid-body
    hold: threading.Event | None = None  # when set: reads wait for this event
    held: threading.Event = field(default_factory=threading.Event)  # set when a read starts waiting
    log: list[tuple[str, int, str]] = field(default_factory=list)  # (path, status, note)
    tokens_issued: int = 0
    latency_s: float = 0.0  # waited before answering each file read (an object store's time to first byte)
    # Body bytes of range answers (206; a cut answer counts what was sent). Whole-file answers (200) are not counted:
    # GDAL asks for one without a Range header to learn a file's size (CPL_VSIL_CURL_USE_HEAD=NO) and reads only
    # its headers before dropping the connection.
    range_bytes_served: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def now(self) -> datetime:
        """The server's clock."""
        return datetime.now(UTC) + self.skew

    def sign(self, expiry: str) -> str:
        """The signature of an expiry."""
        return hmac.new(self.secret, expiry.encode(), hashlib.sha256).hexdigest()[:32]


class _RasterServer(_QuietServer):
    def __init__(self, state: RasterServerState) -> None:
        self.state = state
        super().__init__(("127.0.0.1", 0), _RasterHandler)


class _RasterHandler(BaseHTTPRequestHandler):
    server: _RasterServer
    protocol_version = "HTTP/1.1"

    @property
    def state(self) -> RasterServerState:
        return self.server.state

    def log_message(self, *args: object) -> None:
        pass

    def _finish(self, status: int, body: bytes, headers: dict[str, str] | None = None, note: str = "",
                cut: bool = False) -> None:
        with self.state.lock:
            self.state.log.append((urlsplit(self.path).path, status, note))
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        if cut:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command == "HEAD":
            return
        if status == 206:
            with self.state.lock:
                self.state.range_bytes_served += len(body) // 2 if cut else len(body)
        if cut:  # half the promised bytes, then the connection is reset (RST, as a dropped link or proxy does)
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.connection.close()
            return
        self.wfile.write(body)

    def _token(self) -> None:
        expiry = (self.state.now() + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
        with self.state.lock:
            self.state.tokens_issued += 1
            ident = f"t{self.state.tokens_issued}"  # every token differs, so GDAL never reuses another's cache
        doc = {"token": f"se={expiry}&si={ident}&sig={self.state.sign(expiry + ident)}", "msft:expiry": expiry}
        self._finish(200, json.dumps(doc).encode(), {"Content-Type": "application/json"}, "token")

    def _authorised(self, query: str) -> bool:
        q = parse_qs(query)
        expiry, ident, sig = (q.get(k, [""])[0] for k in ("se", "si", "sig"))
        if not expiry or not hmac.compare_digest(sig, self.state.sign(expiry + ident)):
            self._finish(403, b"AuthenticationFailed: signature missing or invalid", note="unsigned")
            return False
        if datetime.strptime(expiry, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC) <= self.state.now():
            self._finish(403, EXPIRED_MESSAGE, note="expired")
            return False
        return True

    def _serve(self) -> None:
        parts = urlsplit(self.path)
        if parts.path == "/token":
            self._token()
            return
        if not self._authorised(parts.query):
            return
        if self.state.hold is not None:
            self.state.held.set()
            self.state.hold.wait(MAX_HOLD_S)
        if self.state.latency_s > 0:
            time.sleep(self.state.latency_s)
        file = self.state.root / Path(parts.path).name
        if not file.is_file():
            self._finish(404, b"not found")
            return
        self._range(file.read_bytes())

    def _range(self, data: bytes) -> None:
        m = _RANGE.fullmatch(self.headers.get("Range") or "")
        if not m:
            self._finish(200, data, {"Accept-Ranges": "bytes", "Content-Type": "image/tiff"})
            return
        start, total = int(m.group(1)), len(data)
        end = min(int(m.group(2)) if m.group(2) else total - 1, total - 1)
        if start >= total:
            self._finish(416, b"", {"Content-Range": f"bytes */{total}"})
            return
        with self.state.lock:
            cut = self.state.cuts > 0 and end - start > 1024
            self.state.cuts -= cut
        self._finish(206, data[start:end + 1], {"Content-Range": f"bytes {start}-{end}/{total}",
                                                "Accept-Ranges": "bytes", "Content-Type": "image/tiff"},
                     note="cut" if cut else "", cut=cut)

    do_GET = do_HEAD = _serve


class FaultyRasterServer:
    """Serves the files of ``root`` with range requests and SAS-style tokens on 127.0.0.1 (a context manager)."""

    def __init__(self, root: Path, latency_s: float = 0.0) -> None:
        """Prepare a server for the files of ``root`` (started by ``__enter__``).

        Args:
            root: The folder whose files are served (by file name: ``<url>/<any path>/<name>``).
            latency_s: Seconds waited before answering each file read (not ``/token``); ``state.latency_s``
                may be changed while the server runs.
        """
        self.state = RasterServerState(root=root, latency_s=latency_s)
        self._server = _RasterServer(self.state)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def token_url(self) -> str:
        """Where :class:`LoopbackSigner` gets tokens."""
        return f"{self.url}/token"

    def expire_tokens(self) -> None:
        """Every token issued so far is expired from now on (the server's clock jumps past them)."""
        with self.state.lock:
            self.state.skew += timedelta(hours=2)

    def cut_next(self, n: int = 1) -> None:
        """The next ``n`` range answers (over 1 KiB) send half their body, then drop the connection."""
        with self.state.lock:
            self.state.cuts = n

    def hold_reads(self) -> threading.Event:
        """Make reads wait until the returned event is set (``state.held`` is set when one waits)."""
        self.state.held.clear()
        self.state.hold = threading.Event()
        return self.state.hold

    def release_reads(self) -> None:
        """Let held reads go on and stop holding."""
        if self.state.hold is not None:
            self.state.hold.set()
            self.state.hold = None

    def count(self, status: int, note: str | None = None) -> int:
        """Answers with this status (and note)."""
        with self.state.lock:
            return sum(1 for _, s, n in self.state.log if s == status and (note is None or n == note))

    def __enter__(self) -> FaultyRasterServer:
        _serve(self._server)
        return self

    def __exit__(self, *exc: object) -> None:
        self.release_reads()
        self._server.shutdown()
        self._server.server_close()


class LoopbackSigner:
    """Signs hrefs with a token from a :class:`FaultyRasterServer`, cached per process like ``planetary_computer``.

    The cached token is reused while it has more than a minute left by the local clock; a server that disagrees
    (clock skew, revoked tokens) answers 403 until :meth:`refresh` drops the cached token.
    """

    _cache: ClassVar[dict[str, tuple[str, datetime]]] = {}
    _lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, token_url: str) -> None:
        """Sign with tokens from ``token_url``."""
        self.token_url = token_url

    def _token(self) -> str:
        with self._lock:
            hit = self._cache.get(self.token_url)
            if hit is not None and hit[1] - datetime.now(UTC) > timedelta(minutes=1):
                return hit[0]
            with urllib.request.urlopen(self.token_url, timeout=10) as resp:
                doc = json.loads(resp.read())
            expiry = datetime.strptime(doc["msft:expiry"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
            self._cache[self.token_url] = (doc["token"], expiry)
            return str(doc["token"])

    def __call__(self, href: str) -> str:
        """``href`` with the current token as its query."""
        return href.split("?", 1)[0] + "?" + self._token()

    def refresh(self, href: str) -> None:
        """Drop the cached token (the server refused it): the next signature fetches a new one."""
        with self._lock:
            self._cache.pop(self.token_url, None)

    @classmethod
    def forget_all(cls) -> None:
        """Empty the process-wide token cache."""
        with cls._lock:
            cls._cache.clear()
