"""Paging of list calls (AIP-158): the page-size rule, the page-bytes rule and one page-token format for every listing.

A page token is base64url (unpadded) JSON: a fingerprint of the listing it belongs to (the product, the filters),
then the position of the page's last item (a version, or a time and an id). A token is opaque to callers: one from
another listing, or altered, is INVALID_ARGUMENT on `page_token`, never a page of something else.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Final, TypeVar

from ductape_processor.errors import InvalidArgument

DEFAULT_PAGE_SIZE: Final = 50
"""The page size of a request that asks for none (`page_size` 0)."""
MAX_PAGE_SIZE: Final = 1000
"""The largest page: a larger `page_size` is read as this."""
MAX_PAGE_TOKEN_CHARS: Final = 1024
"""The longest page token read: the ones this module writes are a fraction of that."""
MAX_PAGE_BYTES: Final = 2 * 1024 * 1024
"""About the most bytes the items of one page weigh (see `page`'s `weight`): half of a gRPC message's default
4 MiB. A listing of large items (a feature run's input, a received webhook's body) returns fewer than `page_size`
rather than a page the server cannot send (RESOURCE_EXHAUSTED for every page size); AIP-158 allows a short page."""
ITEM_BYTES: Final = 512
"""What an item weighs beside its large fields: ids, names, times, statuses."""

T = TypeVar("T")
P = TypeVar("P")
Position = Sequence[int | float | str]
"""Where a page ended: the sort key of its last item, as JSON scalars."""


def effective_page_size(requested: int) -> int:
    """The size of the page to return for a request's `page_size`."""
    if requested < 0:
        raise InvalidArgument.field("page_size", "must not be negative")
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def _fingerprint(listing: Sequence[str]) -> str:
    return hashlib.sha256(json.dumps(list(listing)).encode()).hexdigest()[:16]


def encode_page_token(listing: Sequence[str], position: Position) -> str:
    """The token of the page after `position` in `listing` (the names that make one listing differ from another)."""
    raw = json.dumps([_fingerprint(listing), *position], separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_page_token(listing: Sequence[str], token: str, position: Callable[..., P]) -> P:
    """The position a token of `listing` carries, read by `position(*parts)`; INVALID_ARGUMENT on `page_token`
    for a token of another listing or one that does not read (`position` may raise ValueError or TypeError)."""
    try:
        if len(token) > MAX_PAGE_TOKEN_CHARS:
            raise ValueError
        fingerprint, *parts = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        if fingerprint != _fingerprint(listing):
            raise ValueError
        return position(*parts)
    # RecursionError: JSON nested deeper than the parser's stack (`[[[[…`), which a hostile token can be.
    except (ValueError, TypeError, OverflowError, OSError, RecursionError, binascii.Error):
        raise InvalidArgument.field(
            "page_token", "not a page token of this listing (same filters); pass next_page_token unchanged"
        ) from None


def version_position(version: object) -> int:
    """A position that is a version number (read from a token)."""
    if not isinstance(version, int) or isinstance(version, bool):
        raise TypeError
    return version


def time_position(seconds: object, identifier: object) -> tuple[datetime, str]:
    """A position that is a start time and an id, the order of sessions and executions (read from a token)."""
    if not isinstance(seconds, int | float) or isinstance(seconds, bool) or not isinstance(identifier, str):
        raise TypeError
    return datetime.fromtimestamp(seconds, UTC), identifier


def json_weight(*texts: str) -> int:
    """What JSON texts (a Struct or Value kept as JSON) weigh once sent as protobuf: up to four times their length
    (a number of one character is a nine-byte double inside its wrappers), and an item's `ITEM_BYTES`."""
    return ITEM_BYTES + 4 * sum(len(text) for text in texts)


def page(
    fetched: list[T],
    size: int,
    listing: Sequence[str],
    position: Callable[[T], Position],
    weight: Callable[[T], int] | None = None,
) -> tuple[list[T], str]:
    """The page to return from `fetched` (queried with a limit of `size` + 1) and the next page's token ("" when
    this is the last page). With `weight` (about an item's bytes as sent), the page also stops before its items
    outweigh `MAX_PAGE_BYTES`; it always holds one item."""
    kept = fetched[:size]
    if weight is not None:
        total = 0
        for index, item in enumerate(kept):
            total += weight(item)
            if total > MAX_PAGE_BYTES and index:
                kept = kept[:index]
                break
    if len(kept) == len(fetched):
        return fetched, ""
    return kept, encode_page_token(listing, position(kept[-1]))
