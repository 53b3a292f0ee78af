"""The services on the path of every resource call, built once in `app.build` and handed to each resource kind's
runtime, so a runtime takes one argument for them and its own dependencies beside it."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from ductape_processor.runtime.actions.cache import ResultCache
from ductape_processor.runtime.logs.recorder import ExecutionRecorder
from ductape_processor.runtime.policies.secrets import SecretSource
from ductape_processor.runtime.registry.registry import Registry
from ductape_processor.runtime.sessions import SessionManager
from ductape_processor.store.base import Store


@dataclass(frozen=True, slots=True)
class CallServices:
    """What a call of any resource kind goes through (docs/architecture.md, "The path of one call")."""

    registry: Registry
    """Resolves product and environment to the compiled model."""
    store: Store
    """The processor's own state (idempotency records, here)."""
    secrets: SecretSource
    recorder: ExecutionRecorder
    """Gives process ids and writes the execution records."""
    cache: ResultCache
    """The manifest's `caches`."""
    sessions: SessionManager
    """Verifies the session a call carries."""
    idempotency_retention: timedelta
    """How long a call's idempotency record is kept."""
