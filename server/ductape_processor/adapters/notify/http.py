"""What the HTTP providers (push, SMS, callbacks) share: one request through the actions' HTTP client
(`adapters/http/`: pooled, header checks, same-origin redirects, bounded responses), and the reading of an answer
into a message id or a `ChannelFailure` that says whether another attempt is safe.

A request the provider may have read (the connection broke after it was sent, or no answer came in time) is not
retried: the message may have been accepted. 429 and 5xx are retried (after the provider's Retry-After when it
gives one), 401 and 403 are the credentials' fault, any other answer outside 2xx refuses the message for good.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from typing import Any, Final

from yarl import URL

from ductape_processor.adapters.http.client import (
    HttpClientPool,
    HttpRequest,
    HttpResponse,
    ResponseTooLarge,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from ductape_processor.adapters.notify.base import ChannelFailure
from ductape_processor.errors import InvalidArgument
from ductape_processor.reasons import Reason
from ductape_processor.runtime.policies.retry import parse_retry_after

ERROR_TEXT: Final = 300
"""Characters of a provider's error answer quoted in a channel's error message."""
JSON: Final = "application/json"
FORM: Final = "application/x-www-form-urlencoded"


def basic_auth(user: str, password: str) -> str:
    """An HTTP Basic Authorization value."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def request_headers(content_type: str, authorization: str = "") -> dict[str, str]:
    """The headers of a request to a provider's API: its body's type, JSON accepted in answer, and the credentials
    when there are any."""
    headers = {"Content-Type": content_type, "Accept": JSON}
    if authorization:
        headers["Authorization"] = authorization
    return headers


def json_body(value: Any) -> bytes:
    """Compact UTF-8 JSON."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


async def exchange(
    http: HttpClientPool,
    key: str,
    method: str,
    url: URL,
    headers: Mapping[str, str],
    data: bytes | None,
    timeout_s: float,
    query: list[tuple[str, str]] | None = None,
) -> HttpResponse:
    """Send one request on the pool's session `key`; raise ChannelFailure when no answer came."""
    try:
        return await http.send(key, HttpRequest(method, url, headers, query or [], data), timeout_s)
    except UpstreamUnreachable as exc:
        if exc.sent:
            raise ChannelFailure(
                Reason.UPSTREAM_UNREACHABLE,
                f"{exc.message}; the request may have been taken, so it is not sent again",
            ) from None
        raise ChannelFailure(Reason.UPSTREAM_UNREACHABLE, exc.message, retryable=True) from None
    except UpstreamTimeout as exc:
        raise ChannelFailure(
            Reason.UPSTREAM_TIMEOUT, f"{exc.message}; the request may have been taken, so it is not sent again"
        ) from None
    except ResponseTooLarge as exc:
        raise ChannelFailure(Reason.UPSTREAM_RESPONSE_TOO_LARGE, exc.message) from None
    except InvalidArgument as exc:  # a header value the call gave that HTTP cannot carry
        raise ChannelFailure(Reason.INVALID_ARGUMENT, exc.message) from None


def _quoted(body: bytes) -> str:
    text = body.decode("utf-8", "replace").strip()
    return text if len(text) <= ERROR_TEXT else text[: ERROR_TEXT - 1] + "…"


def status_failure(provider: str, response: HttpResponse) -> ChannelFailure:
    """The failure of an answer outside 2xx."""
    status = response.status
    text = f"{provider} answered {status}: {_quoted(response.body)}"
    if status == 429 or status >= 500 or status == 408:
        retry_after = parse_retry_after(response.header("Retry-After"))
        return ChannelFailure(Reason.UPSTREAM_STATUS, text, retryable=True, retry_after_s=retry_after)
    if status in (401, 403):
        return ChannelFailure(Reason.UPSTREAM_AUTH_FAILED, text)
    return ChannelFailure(Reason.NOTIFICATION_REJECTED, text)


def answer_json(provider: str, response: HttpResponse) -> Any:
    """The JSON of a 2xx answer; a failure (not retried: the provider took the request) when it is not JSON."""
    if not 200 <= response.status < 300:
        raise status_failure(provider, response)
    try:
        return json.loads(response.body) if response.body else {}
    except ValueError:
        raise ChannelFailure(Reason.UPSTREAM_STATUS, f"{provider} answered {response.status} without JSON") from None


def endpoint(configured: str | None, default: str) -> URL:
    """The provider's base URL: the manifest's `endpoint`, else the provider's own."""
    return URL(configured or default)
