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
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

Signer = Callable[[str], str]

_URL_WITH_QUERY = re.compile(r"((?:https?|s3|gs|az|abfss?)://[^\s?#'\"<>]+)\?[^\s'\"<>]*", re.IGNORECASE)
#: Query parameters that carry a credential (Azure SAS, AWS/GCS signed URLs, API keys, OAuth tokens), lower case.
TOKEN_PARAMS = frozenset({
    "st", "se", "sp", "sv", "sr", "sig", "skoid", "sktid", "skt", "ske", "sks", "skv", "spr", "sip", "si", "ss",
    "srt", "sdd", "ses", "token", "code", "signature", "subscription-key", "x-amz-signature", "x-amz-credential",
    "x-amz-security-token", "x-goog-signature", "access_token", "client_id",
})
_TOKEN_PARAM = re.compile(
    r"\b(" + "|".join(sorted(map(re.escape, TOKEN_PARAMS), key=len, reverse=True)) + r")=[^&\s'\"<>]+",
    re.IGNORECASE,
)
#: An ``Authorization`` header value or an ``OAuth``/``Bearer`` credential quoted in text (8+ characters, so that
#: prose such as "Invalid OAuth access token" is left alone).
_AUTH_VALUE = re.compile(
    r"(\bAuthorization['\"]?\s*[:=]\s*['\"]?(?:(?:OAuth|Bearer|Basic|Token)\s+)?|\b(?:OAuth|Bearer)\s+)"
    r"(?!<redacted>)[^\s'\",;}]{8,}", re.IGNORECASE)
#: The query of a host-relative request target (urllib3 logs ``"GET /path?query HTTP/1.1"`` and ``url='/path?q'``).
_PATH_WITH_QUERY = re.compile(r"((?:^|(?<=[\s'\"=]))/[^\s?#'\"<>]*)\?[^\s'\"<>]+")
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


def redact_log_text(text: str) -> str:
    """:func:`redact_text`, plus ``Authorization``/``OAuth``/``Bearer`` values and queries of host-relative paths.

    Meant for log lines of HTTP clients: urllib3 logs request targets (``/path?query``) without their host, and a
    signed CDN link's signature parameters are not all named in :data:`TOKEN_PARAMS`.

    Args:
        text: a log message.

    Returns:
        The text with credentials and query strings replaced by ``<redacted>``.
    """
    text = redact_text(_PATH_WITH_QUERY.sub(lambda m: f"{m.group(1)}?{REDACTED}", text))
    return _AUTH_VALUE.sub(lambda m: f"{m.group(1)}{REDACTED}", text)


def strip_token_params(url: str, *, keep_fragment: bool = False) -> str:
    """``url`` without its credential query parameters (:data:`TOKEN_PARAMS`); other parameters kept.

    Args:
        url: a URL (anything without a query, or fragment, is returned unchanged).
        keep_fragment: Keep the ``#fragment`` (dropped by default: some APIs put tokens there).

    Returns:
        The URL, e.g. ``https://h/p?pKey=1&access_token=X`` -> ``https://h/p?pKey=1``.
    """
    parts = urlsplit(str(url))
    if not parts.query and (keep_fragment or not parts.fragment):
        return str(url)
    kept = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k.lower() not in TOKEN_PARAMS]
    return urlunsplit(parts._replace(query=urlencode(kept), fragment=parts.fragment if keep_fragment else ""))


def planetary_computer_signer() -> Signer:
    """Return ``planetary_computer.sign`` for hrefs (tokens are cached by that package).

    Raises:
        ImportError: If ``planetary-computer`` is not installed.
    """
    import planetary_computer

    return PlanetaryComputerSigner(planetary_computer.sign)


class PlanetaryComputerSigner:
    """``planetary_computer.sign`` with a :meth:`refresh` that drops the package's cached tokens.

    Tokens are cached per container until a minute before their expiry by the local clock, so a token the server
    already refuses (clock skew, revoked) would otherwise be reused.
    """

    def __init__(self, sign: Signer) -> None:
        """Wrap the package's ``sign``."""
        self._sign = sign

    def __call__(self, href: str) -> str:
        """The signed href."""
        return self._sign(href)

    def refresh(self, href: str) -> None:
        """Drop the cached tokens, so that the next signature asks for a fresh one (one request per container)."""
        from planetary_computer.sas import TOKEN_CACHE

        TOKEN_CACHE.clear()


def refresh_signer(signer: Signer, href: str) -> None:
    """Make ``signer``'s next signature of ``href`` use a fresh credential (call after the server answered 403).

    A signer that caches tokens (:class:`PlanetaryComputerSigner`, or any signer with a ``refresh(href)`` method)
    drops them; a plain function is left alone (it is called again, which is all a stateless signer can do).
    """
    refresh = getattr(signer, "refresh", None)
    if callable(refresh):
        refresh(href)


def is_http_403(exc: BaseException) -> bool:
    """Whether an exception (typically a ``RasterioIOError`` from GDAL) reports HTTP 403."""
    msg = str(exc)
    return "403" in msg and ("HTTP" in msg or "http" in msg or "Forbidden" in msg)


class RedactingFilter(logging.Filter):
    """Logging filter that redacts URL query strings and credentials in log records (:func:`redact_log_text`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite the record's message in place; never drops records."""
        try:
            msg = record.getMessage()
        except Exception:  # noqa: BLE001 - leave malformed records alone
            return True
        red = redact_log_text(msg)
        if red != msg:
            record.msg, record.args = red, None
        return True


#: A logger's filters see only the records logged to that very logger (not its children's), so every module that
#: logs is named (``tests/dataset/test_signing.py`` checks that each ``gair_dataset`` module logger is covered).
_FILTERED_LOGGERS = (
    "rasterio", "rasterio._env", "rasterio.env", "rasterio._base", "rasterio._io", "rasterio._err",
    "rasterio._filepath", "rasterio.vrt", "rasterio._warp", "urllib3.connectionpool", "gair_dataset",
    "gair_dataset.chip_cache", "gair_dataset.chips", "gair_dataset.local_tiles", "gair_dataset.object_store",
    "gair_dataset.pairing", "gair_dataset.sample_region", "gair_dataset.samples", "gair_dataset.shards",
    "gair_dataset.stac_catalog", "gair_dataset.sv_sources.common",
)


def install_redacting_log_filter(names: tuple[str, ...] = _FILTERED_LOGGERS) -> None:
    """Attach a :class:`RedactingFilter` to the loggers that may print asset URLs (idempotent)."""
    for name in names:
        lg = logging.getLogger(name)
        if not any(isinstance(f, RedactingFilter) for f in lg.filters):
            lg.addFilter(RedactingFilter())
