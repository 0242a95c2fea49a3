"""Shard sets and checkpoints on object storage (S3-compatible, or any fsspec URL), published marker-last.

A published shard set lives under a URL prefix, one per region (``s3://bucket/prefix/<region>/``), with the files
of a local set: ``<name>-%06d.tar``, ``manifest.parquet`` and ``shards.json``. :func:`publish_shard_set` uploads
the tars and the manifest first and ``shards.json`` **last**: it is the commit marker, so a reader that finds no
``shards.json`` treats the set as absent (:func:`read_shards_json` raises ``FileNotFoundError``), and a publish
that fails half-way leaves no set rather than half of one. Before anything is overwritten the previous marker is
deleted, so an old ``shards.json`` never describes new bytes; tars of the previous publish that the new
``shards.json`` does not list are removed once the new marker is written. Publishing a set identical to the one
already there (same ``shards.json``, every file present at its size) uploads nothing. :func:`publish_files` is
the same protocol for any files and marker (the trainer publishes checkpoints with it).

The atomicity comes from the object store: a ``PUT`` (multipart or not) makes an object appear whole or not at
all. Two publishers writing the same prefix at once are not coordinated (the pipelines publish under the region
lock); a reader streaming a set while it is republished may see the new bytes of a shard it listed before.

Credentials come only from the environment (``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_SESSION_TOKEN``, ``AWS_PROFILE``: read by botocore, never by this module), the endpoint of an S3-compatible
service from ``FSSPEC_S3_ENDPOINT_URL`` or ``AWS_ENDPOINT_URL``. Nothing here takes, logs or stores a credential:
errors are re-raised as :class:`ObjectStoreError` (or ``FileNotFoundError``) naming the URL without its user
info or query, with every credential value of the environment masked, and without the original exception chained.

Core dependencies and fsspec only (s3fs is imported by fsspec when an ``s3://`` URL is first used).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import posixpath
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit, urlunsplit

import fsspec
from fsspec.implementations.local import LocalFileSystem

from gair_dataset.atomic import atomic_path
from gair_dataset.contract import MANIFEST_NAME, SHARDS_JSON_NAME

log = logging.getLogger(__name__)

CREDENTIAL_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")
"""Environment variables whose values are masked in every error message."""
ENDPOINT_ENV = ("FSSPEC_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
"""Environment variables naming an S3-compatible endpoint, first set wins."""

_URL_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
_SIGNED_QUERY_RE = re.compile(r"\b(X-Amz-[A-Za-z-]+|Signature|AWSAccessKeyId|Credential|sig)=[^&\s'\"]+")


class ObjectStoreError(OSError):
    """An object-store operation failed; the message names the URL, never a credential."""


def is_url(spec: str | os.PathLike[str]) -> bool:
    """Whether ``spec`` is a remote fsspec URL (``s3://``, ``gs://``, ``memory://``...), not a local path/``file://``."""
    s = str(spec)
    return bool(_URL_RE.match(s)) and not s.lower().startswith("file://")


def public_url(url: str) -> str:
    """``url`` without user info, query or fragment: safe to log and to store in metadata."""
    if not _URL_RE.match(url):
        return url
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def check_url(url: str) -> str:
    """Refuse a URL that carries credentials (user info or a query string); returns it unchanged.

    Raises:
        ValueError: Credentials must come from the environment, never from a URL that ends up in configs and logs.
    """
    if _URL_RE.match(url):
        parts = urlsplit(url)
        if "@" in parts.netloc or parts.query:
            raise ValueError(f"{public_url(url)}: give credentials through the environment (AWS_ACCESS_KEY_ID, "
                             "AWS_SECRET_ACCESS_KEY, ...), not in the URL (user info or query)")
    return url


def redact(text: str) -> str:
    """Mask every credential value of the environment and signed-URL parameters in ``text``."""
    for name in CREDENTIAL_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return _SIGNED_QUERY_RE.sub(r"\1=***", text)


def storage_options(url: str) -> dict[str, Any]:
    """The fsspec options for ``url``: for S3, the endpoint from the environment and no listing cache.

    Credentials are deliberately absent: botocore reads them from the environment itself.
    """
    protocol = fsspec.utils.get_protocol(url)
    if protocol not in ("s3", "s3a"):
        return {}
    opts: dict[str, Any] = {"use_listings_cache": False}  # another publisher may change a prefix under us
    endpoint = next((os.environ[n] for n in ENDPOINT_ENV if os.environ.get(n)), None)
    if endpoint:
        opts["endpoint_url"] = endpoint
    return opts


@contextlib.contextmanager
def _errors(action: str, url: str) -> Iterator[None]:
    """Re-raise any error of the block with the (public) URL and without credentials or a chained cause."""
    try:
        yield
    except ObjectStoreError:
        raise
    except FileNotFoundError as exc:  # kept a FileNotFoundError: "no such object/bucket" is not a failure to retry
        raise FileNotFoundError(f"{action} {public_url(url)}: not found ({redact(str(exc))})") from None
    except Exception as exc:  # noqa: BLE001 - botocore/aiohttp errors are no OSErrors: all are reported alike
        raise ObjectStoreError(f"{action} {public_url(url)} failed: {type(exc).__name__}: {redact(str(exc))}") \
            from None


def filesystem(url: str) -> tuple[Any, str]:
    """``(fsspec filesystem, path inside it)`` for ``url`` (a local path gives the local filesystem)."""
    with _errors("open filesystem for", url):
        fs, path = fsspec.core.url_to_fs(url, **storage_options(url))
    return fs, path


def join(url: str, name: str) -> str:
    """``<url>/<name>`` (one slash)."""
    return url.rstrip("/") + "/" + name


def open_url(url: str) -> IO[bytes]:
    """Open ``url`` for streaming reads (the caller closes it)."""
    fs, path = filesystem(url)
    with _errors("open", url):
        return fs.open(path, "rb")


def read_bytes(url: str) -> bytes:
    """The content of one object."""
    fs, path = filesystem(url)
    with _errors("read", url):
        return bytes(fs.cat_file(path))


def download_file(url: str, dest: str | os.PathLike[str]) -> Path:
    """Download one object to ``dest``, atomically (a temporary sibling renamed into place)."""
    fs, path = filesystem(url)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _errors("download", url), atomic_path(dest) as tmp:
        fs.get_file(path, str(tmp))
    return dest


def list_names(url: str) -> list[str]:
    """Names of the objects and folders directly under the prefix ``url``, sorted ([] when there is none)."""
    fs, root = filesystem(url)
    with _errors("list", url):
        try:
            paths = fs.ls(root.rstrip("/"), detail=False)
        except FileNotFoundError:
            return []
    return sorted({posixpath.basename(str(p).rstrip("/")) for p in paths})


def exists(url: str) -> bool:
    """Whether an object (or a prefix holding objects) is at ``url``."""
    fs, path = filesystem(url)
    with _errors("look up", url):
        return bool(fs.exists(path))


def remove_prefix(url: str, *, marker: str | None = None) -> None:
    """Delete every object under the prefix ``url`` (nothing there is no error).

    Args:
        url: The prefix.
        marker: A commit marker under it (``shards.json``, ``state.json``), deleted before anything else, so that an
            interrupted removal never leaves a marker describing files that are gone (the rule of
            :func:`publish_files`).
    """
    fs, root = filesystem(url)
    root = root.rstrip("/")
    with _errors("remove", url):
        try:
            if marker is not None:
                fs.rm_file(f"{root}/{marker}")
        except FileNotFoundError:
            pass
        try:
            fs.rm(root, recursive=True)
        except FileNotFoundError:
            pass


def read_shards_json(url: str) -> dict[str, Any]:
    """``shards.json`` of the shard set published at ``url``.

    Raises:
        FileNotFoundError: No marker there: no set was published, or its publish did not finish.
        ObjectStoreError: The store could not be read.
    """
    try:
        doc = json.loads(read_bytes(join(url, SHARDS_JSON_NAME)))
    except FileNotFoundError:
        raise FileNotFoundError(f"no shard set at {public_url(url)}: no {SHARDS_JSON_NAME} (never published, or "
                                "its publish did not finish)") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("shards"), list):
        raise ObjectStoreError(f"{public_url(join(url, SHARDS_JSON_NAME))}: not a shards.json document")
    return doc


def shard_urls(url: str) -> list[str]:
    """URLs of the shards of the set published at ``url``, in order (from its ``shards.json``)."""
    return [join(url, str(s["path"])) for s in read_shards_json(url)["shards"]]


@dataclass(frozen=True)
class PublishedSet:
    """A shard set found under a prefix by :func:`list_shard_sets`."""

    url: str
    name: str
    n_samples: int
    n_shards: int


def list_shard_sets(prefix: str) -> list[PublishedSet]:
    """The complete shard sets at ``prefix`` and one level below (``<prefix>/<region>/shards.json``), by URL."""
    fs, root = filesystem(prefix)
    root = root.rstrip("/")
    with _errors("list", prefix):
        markers = list(fs.glob(f"{root}/*/{SHARDS_JSON_NAME}"))
        if fs.exists(f"{root}/{SHARDS_JSON_NAME}"):
            markers.append(f"{root}/{SHARDS_JSON_NAME}")
    out = []
    for marker in markers:
        url = public_url(fs.unstrip_protocol(posixpath.dirname(marker)))
        doc = read_shards_json(url)
        out.append(PublishedSet(url=url, name=str(doc.get("name", posixpath.basename(url))),
                                n_samples=int(doc.get("n_samples", 0)), n_shards=len(doc["shards"])))
    return sorted(out, key=lambda s: s.url)


@dataclass
class PublishResult:
    """What a publish did (``url`` has no credentials: fit for logs and metadata)."""

    url: str
    marker: str
    uploaded: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    bytes_uploaded: int = 0

    @property
    def unchanged(self) -> bool:
        """The identical set was already published: nothing was uploaded or removed."""
        return not self.uploaded and not self.removed


def _size(fs: Any, path: str) -> int | None:
    try:
        return int(fs.info(path)["size"])
    except FileNotFoundError:
        return None


def publish_files(files: Mapping[str, str | os.PathLike[str]], url: str, *, marker: str, marker_bytes: bytes,
                  stale_suffix: str | None = None) -> PublishResult:
    """Upload ``files`` under ``url``, then the marker object last; remove stale objects after it.

    Args:
        files: Object name (relative to ``url``, no folders) -> local file.
        url: Destination prefix (``s3://bucket/prefix/``, any fsspec URL, or a local folder).
        marker: Name of the commit marker (``shards.json``, ``checkpoint.json``); its presence means "complete".
        marker_bytes: The marker's content.
        stale_suffix: After the marker is written, objects directly under ``url`` with this suffix that are not
            in ``files`` (leftovers of an earlier publish) are removed; ``None`` removes nothing.

    Returns:
        What was uploaded and removed; nothing when the same marker and files (by size) are already there.

    Raises:
        ObjectStoreError: An upload failed (the prefix is then left without a marker) or a size does not match.
        FileNotFoundError: A local file is missing.
    """
    check_url(url)
    for name, local in files.items():
        if "/" in name or name in ("", ".", "..") or name == marker:
            raise ValueError(f"bad object name {name!r}")
        if not Path(local).is_file():
            raise FileNotFoundError(f"{local}: no such file to publish")
    fs, root = filesystem(url)
    root = root.rstrip("/")
    result = PublishResult(url=public_url(url), marker=marker)
    sizes = {name: Path(local).stat().st_size for name, local in files.items()}
    marker_path = f"{root}/{marker}"
    with _errors("publish to", url):
        try:
            current = bytes(fs.cat_file(marker_path))
        except FileNotFoundError:
            current = None
        if current == marker_bytes and all(_size(fs, f"{root}/{n}") == s for n, s in sizes.items()):
            log.info("%s: identical set already published, nothing uploaded", result.url)
            return result
        if current is not None:
            fs.rm_file(marker_path)  # the old marker must never describe new bytes
        if isinstance(fs, LocalFileSystem):  # on S3, makedirs would create a missing (e.g. misspelt) bucket
            fs.makedirs(root, exist_ok=True)
        for name, local in files.items():
            fs.put_file(str(local), f"{root}/{name}")
            got = _size(fs, f"{root}/{name}")
            if got != sizes[name]:
                raise ObjectStoreError(f"{public_url(join(url, name))}: {got} bytes after upload, expected "
                                       f"{sizes[name]}")
            result.uploaded.append(name)
            result.bytes_uploaded += sizes[name]
        fs.pipe_file(marker_path, marker_bytes)
        if stale_suffix is not None:
            for path in fs.ls(root, detail=False):
                name = posixpath.basename(str(path).rstrip("/"))
                if name.endswith(stale_suffix) and name not in files:
                    fs.rm_file(f"{root}/{name}")
                    result.removed.append(name)
    log.info("published %d files (%d bytes) to %s, marker %s written last%s", len(result.uploaded),
             result.bytes_uploaded, result.url, marker,
             f"; removed {len(result.removed)} stale objects" if result.removed else "")
    return result


def publish_shard_set(local_dir: str | os.PathLike[str], url: str) -> PublishResult:
    """Publish the complete local shard set of ``local_dir`` to ``url`` (tars, manifest, then ``shards.json``).

    Args:
        local_dir: A local shard-set folder (``shards.json`` present: the set is complete).
        url: Destination prefix, one per set (e.g. ``s3://bucket/prefix/<region>/``).

    Returns:
        What was uploaded (nothing for a re-publish of the identical set) and which stale tars were removed.

    Raises:
        FileNotFoundError: The local set is incomplete (no ``shards.json``) or lacks a shard it lists.
        ObjectStoreError: An upload failed; the prefix is left without ``shards.json`` (no set).
    """
    local = Path(local_dir)
    marker = local / SHARDS_JSON_NAME
    if not marker.is_file():
        raise FileNotFoundError(f"{local}: no {SHARDS_JSON_NAME}: the shard set is incomplete, not published")
    marker_bytes = marker.read_bytes()
    doc = json.loads(marker_bytes)
    files: dict[str, Path] = {}
    for entry in doc["shards"]:
        path = local / str(entry["path"])
        if not path.is_file() or path.stat().st_size != int(entry["bytes"]):
            raise FileNotFoundError(f"{path}: missing or not the {entry['bytes']} bytes {SHARDS_JSON_NAME} lists")
        files[str(entry["path"])] = path
    if (local / MANIFEST_NAME).is_file():
        files[MANIFEST_NAME] = local / MANIFEST_NAME
    return publish_files(files, url, marker=SHARDS_JSON_NAME, marker_bytes=marker_bytes, stale_suffix=".tar")
