"""Policies written once for every resource kind and adapter: retry and backoff (retry), the circuit breaker
(breaker), deadlines (deadline), idempotency keys (idempotency), paging of list calls (paging), bounded caches
(caches), secret resolution (secrets), background rounds (periodic), one adapter per resource environment
(environments). Import each from its module; the package re-exports what callers outside it read most."""

from ductape_processor.runtime.policies.deadline import Deadline
from ductape_processor.runtime.policies.retry import Backoff, RetryBudget, RetryRules

__all__ = ["Backoff", "Deadline", "RetryBudget", "RetryRules"]
