"""HTTP for the street-view APIs: one ``requests`` session with urllib3 retries, JSON errors made readable.

* 429 and 5xx are retried with exponential backoff; a ``Retry-After`` header is honoured (capped at
  :attr:`HttpSettings.max_retry_after_s`). After the last retry the error names the host, path and status.
* An invalid or expired token (HTTP 401/403, or a Graph API ``OAuthException``/code 190 error body) raises
  :class:`AuthError` at once: retrying cannot fix it.
* Messages never carry a query string (Mapillary paging links and signed image URLs hold tokens or signatures):
  see :func:`redact_url`. :func:`make_session` installs a log filter redacting credentials in the loggers the
  session writes to (urllib3 logs request targets with their query at DEBUG).
* An image URL refused with 401/403 (a signed CDN link that expired) is an :class:`ApiError` naming the URL as
  expired or forbidden, not a refused token (``get(..., refusal="url")``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import requests
import urllib3.exceptions
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from gair_dataset.signing import install_redacting_log_filter

RETRY_STATUSES = (429, 500, 502, 503, 504)
#: The loggers an API session (and these modules) write to; each gets a redacting filter (a logger's filter only
#: sees records made at that logger, so every one is named).
SESSION_LOGGERS = (
    "urllib3.connectionpool", "urllib3.connection", "urllib3.poolmanager", "urllib3.response", "urllib3.util.retry",
    "requests", "gair_dataset.sv_sources.http", "gair_dataset.sv_sources.common", "gair_dataset.sv_sources.images",
    "gair_dataset.sv_sources.mapillary", "gair_dataset.sv_sources.panoramax",
)
_DEFAULT_PORTS = {"http": 80, "https": 443}


class ApiError(RuntimeError):
    """A street-view API request failed (after retries where retrying made sense)."""


class AuthError(ApiError):
    """The API refused the credentials (missing, invalid or expired token); never retried."""


@dataclass(frozen=True)
class HttpSettings:
    """Timeouts and retry policy of the API session.

    Attributes:
        timeout_s: connect/read timeout per request.
        max_retries: retries on 429, 5xx and connection errors.
        backoff_s: backoff factor (waits ``backoff_s * 2**n`` between retries, n = 0, 1, ...).
        max_retry_after_s: the longest ``Retry-After`` honoured (a longer one is waited this long).
    """

    timeout_s: float = 30.0
    max_retries: int = 5
    backoff_s: float = 0.5
    max_retry_after_s: float = 60.0


def redact_url(url: str) -> str:
    """``url`` without its query string and fragment (they may hold a token or a signature)."""
    parts = urlsplit(str(url))
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


def origin(url: str) -> tuple[str, str, int | None]:
    """``(scheme, host, port)`` of ``url``, lower case, the default port filled in (``http`` -> 80)."""
    parts = urlsplit(str(url))
    scheme = parts.scheme.lower()
    try:
        port = parts.port
    except ValueError:  # a malformed port never matches a real origin
        port = -1
    return scheme, (parts.hostname or "").lower(), port if port is not None else _DEFAULT_PORTS.get(scheme)


def make_session(settings: HttpSettings | None = None) -> requests.Session:
    """A session retrying GETs on 429/5xx and connection errors with backoff, honouring ``Retry-After``.

    Also installs (once) a log filter that redacts credential query parameters, signed-URL queries and
    ``Authorization``/``OAuth`` values in :data:`SESSION_LOGGERS`.
    """
    install_redacting_log_filter(SESSION_LOGGERS)
    settings = settings or HttpSettings()
    cap = settings.max_retry_after_s

    class _CappedRetry(Retry):
        def get_retry_after(self, response: Any) -> float | None:
            after = super().get_retry_after(response)
            return None if after is None else min(after, cap)

    retry = _CappedRetry(total=settings.max_retries, backoff_factor=settings.backoff_s,
                         status_forcelist=RETRY_STATUSES, allowed_methods=frozenset({"GET"}),
                         respect_retry_after_header=True, raise_on_status=False)
    session = requests.Session()
    adapter = HTTPAdapter(max_retries=retry)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.headers["User-Agent"] = "gair-pipeline"
    return session


def _error_text(resp: requests.Response) -> tuple[str, Any]:
    """The API's error message and code from a JSON error body (Graph API ``{"error": {...}}`` or STAC)."""
    try:
        body = resp.json()
    except ValueError:
        return resp.reason or "", None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        err = body["error"]
        return f"{err.get('type', 'error')}: {err.get('message', '')}".strip(), err.get("code")
    if isinstance(body, dict):
        return str(body.get("message") or body.get("description") or body.get("detail") or ""), body.get("code")
    return "", None


def get(session: requests.Session, url: str, *, what: str, params: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None, timeout: float = 30.0, token_env: str | None = None,
        stream: bool = False, refusal: Literal["token", "url"] = "token") -> requests.Response:
    """GET with the session's retries; raise :class:`AuthError`/:class:`ApiError` with a readable cause.

    Args:
        session: from :func:`make_session`.
        url: the URL (its query string is never put in a message).
        what: what is fetched, for messages (e.g. ``"Mapillary image search"``).
        params: query parameters.
        headers: extra headers (e.g. the authorization header).
        timeout: seconds.
        token_env: the environment variable the token came from, named in an :class:`AuthError`.
        stream: stream the body.
        refusal: what a 401/403 means: ``"token"`` (the API refused the credentials: :class:`AuthError`) or
            ``"url"`` (the URL itself is refused, e.g. a signed image link that expired: :class:`ApiError`).
    """
    where = redact_url(url)
    try:
        resp = session.get(url, params=params, headers=headers, timeout=timeout, stream=stream)
    except requests.exceptions.RetryError as exc:
        raise ApiError(f"{what}: {where} kept failing after retries ({type(exc.__cause__ or exc).__name__})") from None
    except (OSError, urllib3.exceptions.HTTPError) as exc:  # requests.RequestException is an OSError
        raise ApiError(f"{what}: {where} unreachable ({type(exc).__name__})") from None
    if resp.ok:
        return resp
    message, code = _error_text(resp)
    resp.close()
    for value in (headers or {}).values():  # never echo a credential the server may have quoted
        secret = str(value).split()[-1] if value else ""
        if len(secret) >= 8:
            message = message.replace(secret, "***")
    if refusal == "url" and resp.status_code in (401, 403):
        raise ApiError(f"{what}: image URL expired or forbidden: {where} answered HTTP {resp.status_code}"
                       f"{f' ({message})' if message else ''}")
    if resp.status_code in (401, 403) or code == 190 or "OAuthException" in message:
        src = f" from ${token_env}" if token_env else ""
        raise AuthError(f"{what}: the access token{src} was refused by {where} (HTTP {resp.status_code}"
                        f"{f', code {code}' if code is not None else ''}: {message or 'unauthorised'}); "
                        f"renew the token and set {token_env or 'it'} again")
    retried = " after retries" if resp.status_code in RETRY_STATUSES else ""
    raise ApiError(f"{what}: HTTP {resp.status_code} from {where}{retried}"
                   f"{f' ({message})' if message else ''}")


def get_json(session: requests.Session, url: str, *, what: str, **kwargs: Any) -> Any:
    """:func:`get` and decode JSON; a non-JSON answer raises :class:`ApiError`."""
    resp = get(session, url, what=what, **kwargs)
    try:
        return resp.json()
    except ValueError:
        raise ApiError(f"{what}: {redact_url(url)} did not answer JSON "
                       f"(content-type {resp.headers.get('content-type')!r})") from None
