"""Loopback fakes of the Mapillary Graph API v4 and a Panoramax STAC API, answering as each documents.

* ``GET /mapillary/images?bbox=&fields=&limit=[&after=]`` -> ``{"data": [...], "paging": {"next": url}}``; the token
  comes as ``Authorization: OAuth <token>`` or ``access_token``; an expired token gets HTTP 400
  ``{"error": {"type": "OAuthException", "code": 190, ...}}``, none HTTP 401. Thumbnails are "signed" URLs.
* ``GET /panoramax/api/search?bbox=&limit=[&page=]`` -> a FeatureCollection of picture items (assets
  ``hd``/``sd``/``thumb``, ``license``, ``providers``, ``view:azimuth``) with a ``rel=next`` link.
* Faults: :meth:`FakeApis.fail_next` queues statuses (429 with ``Retry-After``, 5xx) for a route;
  ``image_modes`` breaks single images (``truncate``: short body, ``reset``: TCP reset mid-body, ``stall``: body
  stops for ``stall_s``, ``forbidden``: 403 "signature expired", ``unauthorized``: 401); ``next_mode`` makes
  ``next`` links point at the page just served (``repeat``) or at another host, ``localhost`` (``foreign``);
  ``token_in_next`` echoes the token into Mapillary's ``paging.next`` as ``access_token`` (as the Graph API does);
  ``href_query`` is appended to Panoramax asset and self hrefs (signed links). ``requests`` records
  ``(Host, path?query, Authorization)`` of every request.

Run ``python -m tests.streetview.fake_apis --port 8765`` to serve (for ``dg launch``); tokens: ``GOOD`` is valid,
``EXPIRED`` expired.
"""

from __future__ import annotations

import argparse
import io
import json
import socket
import struct
import threading
import time
from collections import Counter, defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

from PIL import Image

LUND = (13.141039, 55.672384, 13.238947, 55.727676)


def _jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), ((seed * 37) % 256, (seed * 91) % 256, 120)).save(buf, "JPEG", quality=80)
    return buf.getvalue()


class FakeApis:
    """Both fakes on one ``ThreadingHTTPServer`` bound to 127.0.0.1.

    Args:
        bbox: where the fake pictures lie.
        n_points: pictures per API (the last Mapillary one has no geometry, one Panoramax picture's image is 404).
        port: 0 for any free port.
        swap: serve [lat, lon] instead of [lon, lat] (a broken provider).
    """

    def __init__(self, bbox: tuple[float, float, float, float] = LUND, n_points: int = 12, port: int = 0,
                 swap: bool = False) -> None:
        self.bbox, self.n_points, self.swap = bbox, n_points, swap
        self.valid_tokens = {"GOOD"}
        self.expired_tokens = {"EXPIRED"}
        self.hits: Counter[str] = Counter()
        self.faults: dict[str, list[tuple[int, dict[str, str]]]] = defaultdict(list)
        self.image_modes: dict[str, str] = {}
        self.stall_s = 2.0
        self.next_mode: str | None = None
        self.token_in_next = False
        self.href_query = ""
        self.requests: list[tuple[str, str, str | None]] = []
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", port), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base(self) -> str:
        """``http://127.0.0.1:<port>``."""
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> FakeApis:
        """Serve in a daemon thread."""
        self.thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self.server.shutdown()
        self.server.server_close()

    def next_link(self, path: str, query: dict[str, str]) -> str:
        """The ``next`` link to ``path?query``, on ``localhost`` instead of 127.0.0.1 when ``next_mode`` is foreign."""
        base = self.base.replace("127.0.0.1", "localhost") if self.next_mode == "foreign" else self.base
        return f"{base}{path}?{urlencode(query)}"

    def fail_next(self, route: str, status: int, times: int = 1, retry_after: str | None = None) -> None:
        """Answer the next ``times`` requests to ``route`` (``mapillary``, ``panoramax``, ``image``) with ``status``."""
        headers = {"Retry-After": retry_after} if retry_after is not None else {}
        with self.lock:
            self.faults[route].extend([(status, headers)] * times)

    def _coords(self, i: int) -> list[float]:
        w, s, e, n = self.bbox
        lon = w + (e - w) * (0.1 + 0.8 * ((i * 7) % self.n_points) / self.n_points)
        lat = s + (n - s) * (0.1 + 0.8 * ((i * 3) % self.n_points) / self.n_points)
        return [lat, lon] if self.swap else [lon, lat]

    def mapillary_item(self, i: int) -> dict[str, Any]:
        """One ``/images`` data entry as the Graph API returns it."""
        item: dict[str, Any] = {
            "id": str(1000 + i), "captured_at": 1_650_000_000_000 + i * 1000, "compass_angle": (i * 30) % 360,
            "geometry": {"type": "Point", "coordinates": self._coords(i)},
            "thumb_1024_url": f"{self.base}/mapillary/thumb/{1000 + i}.jpg?stp=s1024&_nc_oh=SIGNATURE{i}&oe=65F0",
            "creator": {"username": f"user{i % 3}", "id": str(77 + i % 3)},
        }
        if i == self.n_points - 1:
            del item["geometry"]
        return item

    def panoramax_item(self, i: int) -> dict[str, Any]:
        """One picture item of ``/api/search`` as Panoramax returns it."""
        pid = f"0000-{i:04d}"
        api = f"{self.base}/panoramax/api"
        return {
            "type": "Feature", "stac_version": "1.0.0", "id": pid, "collection": "seq-1",
            "geometry": {"type": "Point", "coordinates": self._coords(i)},
            "bbox": self._coords(i) * 2,
            "properties": {"datetime": f"2023-05-{1 + i % 28:02d}T10:00:00+00:00", "view:azimuth": (i * 45) % 360,
                           "license": "CC-BY-SA-4.0", "geovisio:producer": f"prod{i % 2}",
                           "providers": [{"name": f"prod{i % 2}", "roles": ["producer"]}]},
            "assets": {size: {"href": f"{self.base}/panoramax/pictures/{pid}/{size}.jpg{self.href_query}",
                              "type": "image/jpeg", "roles": ["data" if size == "hd" else "visual"]}
                       for size in ("hd", "sd", "thumb")},
            "links": [{"rel": "self", "href": f"{api}/collections/seq-1/items/{pid}{self.href_query}"},
                      {"rel": "license", "href": "https://spdx.org/licenses/CC-BY-SA-4.0.html"}],
        }

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        return type("Handler", (_Handler,), {"fake": self})


class _Handler(BaseHTTPRequestHandler):
    fake: FakeApis

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, status: int, body: bytes, ctype: str = "application/json",
              headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, doc: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(doc).encode(), headers=headers)

    def _fault(self, route: str) -> bool:
        with self.fake.lock:
            queued = self.fake.faults[route].pop(0) if self.fake.faults[route] else None
        if queued is None:
            return False
        status, headers = queued
        self._json(status, {"error": {"message": "Too many requests" if status == 429 else "Server error",
                                      "type": "FakeError", "code": status}}, headers)
        return True

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        q = {k: v[-1] for k, v in parse_qs(url.query).items()}
        with self.fake.lock:
            self.fake.hits[url.path] += 1
            self.fake.requests.append((self.headers.get("Host", ""), self.path, self.headers.get("Authorization")))
        if url.path == "/mapillary/images":
            self._mapillary(q)
        elif url.path == "/panoramax/api/search":
            self._panoramax(q)
        elif url.path.startswith(("/mapillary/thumb/", "/panoramax/pictures/")):
            self._image(url.path, q)
        else:
            self._json(404, {"message": f"no route {url.path}"})

    def _broken_image(self, mode: str, body: bytes) -> None:
        """Answer an image request the way ``mode`` breaks it."""
        if mode in ("forbidden", "unauthorized"):
            status = 403 if mode == "forbidden" else 401
            return self._json(status, {"error": "URL signature expired" if status == 403 else "unauthorized"})
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 3])
        self.wfile.flush()
        if mode == "stall":
            time.sleep(self.fake.stall_s)
        elif mode == "reset":  # close with RST instead of FIN
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        return None

    def _image(self, path: str, q: dict[str, str]) -> None:
        pid = path.split("/")[3] if path.startswith("/panoramax/") else path.rsplit("/", 1)[-1].split(".")[0]
        mode = self.fake.image_modes.get(pid)
        if self._fault("image"):
            pass
        elif mode:
            self._broken_image(mode, _jpeg(sum(path.encode())))
        elif path.startswith("/mapillary/thumb/") and "_nc_oh" not in q:
            self._json(403, {"error": "URL signature expired"})
        elif path.endswith("0000-0003/sd.jpg"):
            self._json(404, {"message": "picture not found"})
        else:
            self._send(200, _jpeg(sum(path.encode())), "image/jpeg")

    def _mapillary(self, q: dict[str, str]) -> None:
        auth = self.headers.get("Authorization", "")
        token = auth[len("OAuth "):] if auth.startswith("OAuth ") else q.get("access_token")
        if not token:
            return self._json(401, {"error": {"message": "An access token is required",
                                              "type": "OAuthException", "code": 104}})
        if token in self.fake.expired_tokens:
            return self._json(400, {"error": {
                "message": "Error validating access token: Session has expired on Friday, 01-Mar-24.",
                "type": "OAuthException", "code": 190, "error_subcode": 463, "fbtrace_id": "Afake"}})
        if token not in self.fake.valid_tokens:
            return self._json(400, {"error": {"message": "Invalid OAuth access token - Cannot parse",
                                              "type": "OAuthException", "code": 190}})
        if self._fault("mapillary"):
            return None
        if "bbox" not in q:
            return self._json(400, {"error": {"message": "bbox required", "type": "GraphMethodException",
                                              "code": 100}})
        limit, start = int(q.get("limit", 10)), int(q.get("after", 0))
        w, s, e, n = (float(v) for v in q["bbox"].split(","))
        items = [self.fake.mapillary_item(i) for i in range(self.fake.n_points)]
        inside = [it for it in items if "geometry" not in it
                  or (w <= it["geometry"]["coordinates"][0] <= e and s <= it["geometry"]["coordinates"][1] <= n)]
        fields = set(q.get("fields", "id").split(","))
        page = [{k: v for k, v in it.items() if k in fields | {"id"}} for it in inside[start:start + limit]]
        doc: dict[str, Any] = {"data": page}
        repeat = self.fake.next_mode == "repeat" and self.fake.hits["/mapillary/images"] < 30  # bounded loop
        if start + limit < len(inside) or repeat:
            nq = dict(q) if repeat else {**q, "after": str(start + limit)}
            if self.fake.token_in_next:
                nq["access_token"] = token
            doc["paging"] = {"cursors": {"after": str(start + limit)},
                             "next": self.fake.next_link("/mapillary/images", nq)}
        return self._json(200, doc)

    def _panoramax(self, q: dict[str, str]) -> None:
        if self._fault("panoramax"):
            return
        limit, start = int(q.get("limit", 10)), int(q.get("page", 0))
        feats = [self.fake.panoramax_item(i) for i in range(self.fake.n_points)][start:start + limit]
        links = [{"rel": "root", "href": f"{self.fake.base}/panoramax/api"},
                 {"rel": "self", "href": f"{self.fake.base}/panoramax/api/search?{urlencode(q)}"}]
        repeat = self.fake.next_mode == "repeat" and self.fake.hits["/panoramax/api/search"] < 30  # bounded loop
        if start + limit < self.fake.n_points or repeat:
            nq = q if repeat else {**q, "page": str(start + limit)}
            links.append({"rel": "next", "type": "application/geo+json",
                          "href": self.fake.next_link("/panoramax/api/search", nq)})
        self._json(200, {"type": "FeatureCollection", "features": feats, "links": links},
                   {"Content-Type": "application/geo+json"})



def main() -> None:
    """Serve both fakes until interrupted (``python -m tests.streetview.fake_apis --port 8765``)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--points", type=int, default=12)
    ap.add_argument("--bbox", default=",".join(map(str, LUND)), help="w,s,e,n where the pictures lie")
    args = ap.parse_args()
    bbox = tuple(float(v) for v in args.bbox.split(","))
    fake = FakeApis(bbox=bbox, n_points=args.points, port=args.port)  # type: ignore[arg-type]
    print(f"Mapillary: {fake.base}/mapillary (token GOOD; EXPIRED is expired)", flush=True)
    print(f"Panoramax: {fake.base}/panoramax/api", flush=True)
    try:
        fake.server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        fake.server.server_close()


if __name__ == "__main__":
    main()
