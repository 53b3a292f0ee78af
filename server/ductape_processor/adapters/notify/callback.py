"""Callbacks: an HTTP call to the environment's URL through the actions' HTTP client (pooled, header names and
values checked, redirects followed only within the URL's origin, answers bounded), carrying the rendered JSON body.

The URL's `:name` path segments take the call's `params` (each encoded as one segment, as actions do); the call's
`query` is added to the URL's; headers are the environment's, then the call's, then the auth's (a caller cannot
replace the configured credentials).
"""

from __future__ import annotations

from typing import Any, Final

from yarl import URL

from ductape_processor.adapters.http.client import HttpClientPool
from ductape_processor.adapters.http.encoding import path_parameter
from ductape_processor.adapters.notify.base import ChannelAdapter, ChannelFailure, OutgoingCallback, Sent
from ductape_processor.adapters.notify.http import basic_auth, exchange, json_body, status_failure
from ductape_processor.errors import InvalidArgument
from ductape_processor.reasons import Reason
from ductape_processor.runtime.registry.notifications import HttpCallback

_NO_BODY: Final = frozenset({"GET", "DELETE"})


class CallbackChannel(ChannelAdapter):
    """One request per send; 2xx is success (the answer's `X-Request-Id` or status is the message id)."""

    provider = "http"

    def __init__(self, settings: HttpCallback, http: HttpClientPool, name: str) -> None:
        self._settings = settings
        self._http = http
        self._name = name
        self._auth: dict[str, str] = {}
        auth = settings.auth
        if auth is not None and auth.type == "bearer":
            self._auth["Authorization"] = f"Bearer {auth.token}"
        elif auth is not None:
            self._auth["Authorization"] = basic_auth(auth.username or "", auth.password or "")

    def _url(self, params: dict[str, str]) -> URL:
        url = URL(self._settings.url)
        segments = []
        for segment in url.raw_path.split("/"):
            if segment.startswith(":") and len(segment) > 1:
                name = segment[1:]
                if name not in params:
                    raise ChannelFailure(Reason.INVALID_ARGUMENT, f"the callback URL needs params.{name}")
                try:
                    segments.append(path_parameter(name, params[name]))
                except InvalidArgument:
                    raise ChannelFailure(Reason.INVALID_ARGUMENT, f"params.{name} is a dot-segment") from None
            else:
                segments.append(segment)
        return url.with_path("/".join(segments), encoded=True).with_query(url.query)

    async def send(self, outgoing: Any, timeout_s: float) -> Sent:
        assert isinstance(outgoing, OutgoingCallback)
        method = self._settings.method
        headers = {**self._settings.headers, **outgoing.headers, **self._auth}
        data = None
        if method not in _NO_BODY:
            headers["Content-Type"] = "application/json"
            data = json_body(dict(outgoing.body))
        url = self._url(dict(outgoing.params))
        timeout_s = min(timeout_s, self._settings.timeout.total_seconds())
        query = [*url.query.items(), *outgoing.query.items()]  # the client sends `query` in place of the URL's
        url = url.with_query(None)
        response = await exchange(self._http, self._name, method, url, headers, data, timeout_s, query)
        if not 200 <= response.status < 300:
            raise status_failure("the callback", response)
        return Sent(response.header("X-Request-Id") or f"{self._name}:{response.status}")
