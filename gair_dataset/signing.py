"""Signed-URL helpers: sign late, re-sign on HTTP 403, never leak a token.

A *signer* is any ``Callable[[str], str]`` that turns an unsigned asset href into a readable
one (for the Planetary Computer: ``planetary_computer.sign``, which appends a SAS token as a
query string). Signed hrefs must never be written into results, exceptions, logs or shards:
use :func:`redact_url` / :func:`redact_text` on anything that may contain one.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from urllib.parse import urlsplit, urlunsplit

Signer = Callable[[str], str]

_URL_WITH_QUERY = re.compile(r"((?:https?|s3|gs|az|abfss?)://[^\s?#'\"<>]+)\?[^\s'\"<>]*", re.IGNORECASE)
#: Query parameters that carry a credential (Azure SAS, AWS/GCS signed URLs, API keys), lower case.
TOKEN_PARAMS = frozenset({
    "st", "se", "sp", "sv", "sr", "sig", "skoid", "sktid", "skt", "ske", "sks", "skv", "spr", "sip", "si", "ss",
    "srt", "sdd", "ses", "token", "code", "signature", "subscription-key", "x-amz-signature", "x-amz-credential",
    "x-amz-security-token", "x-goog-signature",
})
_TOKEN_PARAM = re.compile(
    r"\b(" + "|".join(sorted(map(re.escape, TOKEN_PARAMS), key=len, reverse=True)) + r")=[^&\s'\"<>]+",
    re.IGNORECASE,
)
REDACTED = "<redacted>"


def redact_url(url: str) -> str:
    """Strip the query string and fragment of a URL (where SAS tokens and signatures live).

    Args:
        url: A URL, ``/vsicurl/`` path or local path.

    Returns:
        The URL without query/fragment (local paths are returned unchanged).
    """
    prefix = ""
    if url.startswith("/vsicurl/"):
        prefix, url = "/vsicurl/", url[len("/vsicurl/"):]
    parts = urlsplit(url)
    if not parts.scheme or not parts.netloc:
        return prefix + url.split("?", 1)[0]
    return prefix + urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


def redact_text(text: str) -> str:
    """Remove query strings of every URL in ``text`` and any stray token parameter.

    Args:
        text: Free text, e.g. a GDAL error message.

    Returns:
        The text with ``?query`` parts replaced by ``?<redacted>``.
    """
    text = _URL_WITH_QUERY.sub(lambda m: f"{m.group(1)}?{REDACTED}", text)
    return _TOKEN_PARAM.sub(lambda m: f"{m.group(1)}={REDACTED}", text)


def planetary_computer_signer() -> Signer:
    """Return ``planetary_computer.sign`` for hrefs (tokens are cached by that package).

    Raises:
        ImportError: If ``planetary-computer`` is not installed.
    """
    import planetary_computer

    def sign(href: str) -> str:
        return planetary_computer.sign(href)

    return sign


def is_http_403(exc: BaseException) -> bool:
    """Whether an exception (typically a ``RasterioIOError`` from GDAL) reports HTTP 403."""
    msg = str(exc)
    return "403" in msg and ("HTTP" in msg or "http" in msg or "Forbidden" in msg)


class RedactingFilter(logging.Filter):
    """Logging filter that redacts URL query strings in log records."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite the record's message in place; never drops records."""
        try:
            msg = record.getMessage()
        except Exception:  # noqa: BLE001 - leave malformed records alone
            return True
        red = redact_text(msg)
        if red != msg:
            record.msg, record.args = red, None
        return True


_FILTERED_LOGGERS = (
    "rasterio", "rasterio._env", "rasterio.env", "rasterio._base", "rasterio._io", "rasterio._err",
    "rasterio._filepath", "rasterio.vrt", "rasterio._warp", "urllib3.connectionpool", "gair_dataset",
)


def install_redacting_log_filter(names: tuple[str, ...] = _FILTERED_LOGGERS) -> None:
    """Attach a :class:`RedactingFilter` to the loggers that may print asset URLs (idempotent)."""
    for name in names:
        lg = logging.getLogger(name)
        if not any(isinstance(f, RedactingFilter) for f in lg.filters):
            lg.addFilter(RedactingFilter())
