"""What every network adapter does with its connection: open it on first use under a lock (`LazyConnection`), and
say what failed without the password (`Endpoint`)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from typing import Generic, TypeVar
from urllib.parse import unquote

from ductape_processor.adapters.brokers.base import BrokerUnavailable

C = TypeVar("C")

REDACTED = "******"


def url_secrets(url: str) -> list[str]:
    """The parts of a connection URL that must never be shown, longest first: everything before the last '@' (even
    a password with a raw '/', ':' or '@' in it) and its password, each as written and percent-decoded."""
    _, separator, rest = url.partition("://")
    if not separator or "@" not in rest:
        return []
    userinfo = rest.rpartition("@")[0]
    password = userinfo.partition(":")[2]
    found = {userinfo, password, unquote(userinfo), unquote(password)} - {""}
    return sorted(found, key=len, reverse=True)


def redacted_url(url: str) -> str:
    """The URL with everything before the last '@' (user and password) hidden."""
    scheme, separator, rest = url.partition("://")
    if not separator or "@" not in rest:
        return url
    return f"{scheme}://***@{rest.rpartition('@')[2]}"


class Endpoint:
    """One broker environment as errors and logs name it: a label, metadata for the error, and the URL's secrets
    to take out of any text a driver produced."""

    __slots__ = ("_secrets", "label", "metadata", "url")

    def __init__(self, label: str, url: str, metadata: Mapping[str, str]) -> None:
        self.label = label
        self.url = url
        self.metadata = dict(metadata)
        self._secrets = url_secrets(url)

    @property
    def redacted_url(self) -> str:
        """The URL without its credentials."""
        return redacted_url(self.url)

    def redact(self, text: str) -> str:
        """`text` with every form of the URL's credentials replaced."""
        for secret in self._secrets:
            text = text.replace(secret, REDACTED)
        return text

    def describe(self, exc: BaseException) -> str:
        """An exception as text for an error message, without the password."""
        return f"{type(exc).__name__}: {self.redact(str(exc) or type(exc).__name__)}"

    def unavailable(self, what: str, exc: BaseException | None = None) -> BrokerUnavailable:
        """The error callers see: `<label>: <what>[: <exception>]`."""
        why = f": {self.describe(exc)}" if exc is not None else ""
        return BrokerUnavailable(f"{self.label}: {what}{why}", metadata=self.metadata)


class LazyConnection(Generic[C]):
    """One connection, opened by the first call that needs it (concurrent first calls open it once) and opened
    again when it was closed; `open` raises the adapter's own error when it cannot connect."""

    __slots__ = ("_current", "_is_open", "_lock", "_open")

    def __init__(self, open_: Callable[[], Awaitable[C]], is_open: Callable[[C], bool]) -> None:
        self._open = open_
        self._is_open = is_open
        self._lock = asyncio.Lock()
        self._current: C | None = None

    @property
    def current(self) -> C | None:
        """The connection if one was opened and not taken by `take`, open or not."""
        return self._current

    async def get(self) -> C:
        """The open connection, opening one if needed."""
        current = self._current
        if current is not None and self._is_open(current):
            return current
        async with self._lock:
            current = self._current
            if current is not None and self._is_open(current):
                return current
            current = self._current = await self._open()
            return current

    def take(self) -> C | None:
        """Forget the connection and return it, for the adapter to close."""
        current, self._current = self._current, None
        return current
