"""Result caches named by a call's `cache` tag: entries in the processor's store, or in Redis per cache."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

from ductape_processor.errors import FailedPrecondition, InvalidArgument, Unavailable
from ductape_processor.reasons import Reason
from ductape_processor.runtime.policies.secrets import SecretSource
from ductape_processor.runtime.registry.fields import named
from ductape_processor.runtime.registry.manifest import Cache, Manifest
from ductape_processor.store.base import Store


def named_cache(manifest: Manifest, tag: str) -> Cache:
    """The cache a call names by its `cache` tag; CACHE_NOT_FOUND when the product has none by that tag."""
    return named(manifest.product, manifest.caches, "cache", tag, Reason.CACHE_NOT_FOUND)


class ResultCache:
    """Get and put cached results for a cache definition, on its backend."""

    def __init__(self, store: Store, secrets: SecretSource) -> None:
        self._store = store
        self._secrets = secrets
        self._redis: dict[str, Any] = {}

    def _redis_client(self, cache: Cache) -> Any:
        assert cache.url is not None
        url = self._secrets.resolve(
            cache.url,
            lambda name: InvalidArgument(
                f"cache {cache.tag!r}: secret $Secret{{{name}}} is not defined on this processor",
                reason=Reason.SECRET_NOT_FOUND,
                metadata={"cache": cache.tag},
            ),
        )
        client = self._redis.get(url)
        if client is None:
            import redis.asyncio as redis

            try:
                client = redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)
            except ValueError:
                # Not the parser's message: it may quote a piece of the password.
                raise FailedPrecondition(
                    f"cache {cache.tag!r}: the Redis URL cannot be parsed (reserved characters in a password must be "
                    "percent-encoded)",
                    reason=Reason.CACHE_URL_INVALID,
                    metadata={"cache": cache.tag},
                ) from None
            self._redis[url] = client
        return client

    async def get(self, cache: Cache, key: str) -> bytes | None:
        """A fresh entry, or None."""
        if cache.backend == "redis":
            with self._redis_errors(cache):
                value = await self._redis_client(cache).get(f"ductape:cache:{key}")
            return bytes(value) if value is not None else None
        return await self._store.cache_get(key, datetime.now(UTC))

    async def put(self, cache: Cache, key: str, value: bytes) -> None:
        """Store an entry for the cache's TTL."""
        if cache.backend == "redis":
            milliseconds = max(int(cache.ttl / timedelta(milliseconds=1)), 1)
            with self._redis_errors(cache):
                await self._redis_client(cache).set(f"ductape:cache:{key}", value, px=milliseconds)
            return
        await self._store.cache_put(key, value, datetime.now(UTC) + cache.ttl)

    @staticmethod
    @contextlib.contextmanager
    def _redis_errors(cache: Cache) -> Iterator[None]:
        """Redis failures as UNAVAILABLE `CACHE_UNAVAILABLE`, naming the error's type, never its text or the URL."""
        from redis.exceptions import RedisError

        try:
            yield
        except RedisError as exc:
            raise Unavailable(
                f"cache {cache.tag!r}: Redis failed ({type(exc).__name__})",
                reason=Reason.CACHE_UNAVAILABLE,
                metadata={"cache": cache.tag},
            ) from None

    async def close(self) -> None:
        """Close Redis connections."""
        clients, self._redis = list(self._redis.values()), {}
        for client in clients:
            with contextlib.suppress(Exception):
                await client.aclose()
