"""Listing the execution log: the filter, the store query and the paging, for LogService.ListExecutions."""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime

from ductape_processor.errors import EnvNotFound, InvalidArgument
from ductape_processor.runtime.policies.paging import decode_page_token, effective_page_size, page, time_position
from ductape_processor.runtime.registry.registry import Registry
from ductape_processor.store.base import ExecutionFilter, ExecutionRecord, Store


@dataclass(frozen=True, slots=True)
class ExecutionPage:
    """One page of executions, newest first, and the token of the next page ("" on the last)."""

    records: list[ExecutionRecord]
    next_page_token: str


def _listing(where: ExecutionFilter) -> tuple[str, ...]:
    """What makes one execution listing differ from another (a page token belongs to one)."""
    since, until = (moment.isoformat() if moment is not None else "" for moment in (where.since, where.until))
    status = str(where.status) if where.status is not None else ""
    return ("executions", where.product, where.env or "", where.resource or "", status, since, until)


class ExecutionQueries:
    """Lists a product's executions, filtered and paged, including those this replica has not written yet."""

    def __init__(self, registry: Registry, store: Store, flush: Callable[[], Awaitable[None]]) -> None:
        self._registry = registry
        self._store = store
        self._flush = flush

    async def list(
        self,
        product: str,
        *,
        env: str | None = None,
        resource: str | None = None,
        status: int | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        page_size: int = 0,
        page_token: str = "",
    ) -> ExecutionPage:
        """One page of executions matching every filter given; `env` may name an environment or its slug."""
        if not product:
            raise InvalidArgument.field("product", "is required: the product's tag")
        size = effective_page_size(page_size)
        if env is not None:
            # An environment the product does not declare (now) is matched by the name as given.
            with contextlib.suppress(EnvNotFound):
                env = (await self._registry.environment(product, env))[0].slug
        where = ExecutionFilter(product=product, env=env, resource=resource, status=status, since=since, until=until)
        listing = _listing(where)
        after = decode_page_token(listing, page_token, time_position) if page_token else None
        await self._flush()  # what this replica ran so far is listed, even if its batch was not written yet
        records = await self._store.list_executions(where, after=after, limit=size + 1)
        return ExecutionPage(*page(records, size, listing, lambda r: (r.started_at.timestamp(), r.process_id)))
