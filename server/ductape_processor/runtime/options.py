"""`CallOptions`: what a caller may set on every call that runs a product's resource, whatever its kind."""

from __future__ import annotations

from ductape_processor.records import record


@record(kw_only=True)
class CallOptions:
    """The options an action call, a database call and a notification send share, as the caller gave them; each
    kind's call record adds its own fields to these (keyword-only, so they follow the kind's own in a constructor).
    """

    session: tuple[str, str] | None = None
    """The (tag, token) of the session the call presents, or None."""
    retries: int | None = None
    """Retries instead of the policy's; None keeps the policy's."""
    version: int | None = None
    """The product version to run; None runs the one pinned for the environment."""
    idempotency_key: str = ""
    """A key that makes a repeated call return the first one's result ("" : none)."""
