"""Policies written once for every resource kind and adapter: retry and backoff (retry), the circuit breaker
(breaker), deadlines (deadline), idempotency keys (idempotency), paging of list calls (paging), bounded caches
(caches)."""

from ductape_processor.runtime.policies.breaker import CircuitBreaker, CircuitOpen
from ductape_processor.runtime.policies.deadline import Deadline
from ductape_processor.runtime.policies.retry import Backoff, RetryBudget, RetryRules, parse_retry_after

__all__ = ["Backoff", "CircuitBreaker", "CircuitOpen", "Deadline", "RetryBudget", "RetryRules", "parse_retry_after"]
