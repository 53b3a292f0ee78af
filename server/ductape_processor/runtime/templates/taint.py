"""Which rendered values derive from sensitive selectors, so that what is recorded about a call can be redacted."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from typing import Any, Final

from ductape_processor.runtime.templates.values import BadValue, to_text

SECRET_KINDS: Final = frozenset({"Secret", "Auth", "Response"})
"""Selectors whose values are secret: secrets, auth values (minted tokens included), a login response. Errors
about them, or about anything computed from them, withhold what went wrong."""
SENSITIVE_KINDS: Final = SECRET_KINDS | {"Session"}
"""Selectors whose values are redacted from what is recorded about a call: the secret ones and the session's data
(which the caller may show in its own errors, but the processor never records)."""


class Taint:
    """The texts of a call's rendered values that derive from sensitive selectors (`SENSITIVE_KINDS`).

    Give one to the renders of a call through `Scope.taint`: each render adds the text of every value it read from
    a sensitive selector, of every operator result computed from one, and of every text with one inside. What is
    recorded about the call (its URL, query, headers) is then redacted by what it was built from, not by patterns:
    any part that contains a tainted text is shown as `[redacted]`. A value the caller's input holds is tainted too
    when it is a tainted text (a credential auth's login input, rendered from secrets, is its login action's input).
    """

    __slots__ = ("texts",)

    def __init__(self) -> None:
        self.texts: set[str] = set()

    def add(self, value: Any) -> None:
        """Taint the text of `value`, or of each of its leaves for an object or an array."""
        stack = [value]
        while stack:
            item = stack.pop()
            if isinstance(item, Mapping):
                stack.extend(item.keys())
                stack.extend(item.values())
            elif isinstance(item, list | tuple):
                stack.extend(item)
            elif isinstance(item, str):
                if item:
                    self.texts.add(item)
                    if '"' in item or "\\" in item or not item.isprintable():
                        # As it reads inside JSON text (an object sent as one parameter).
                        self.texts.add(json.dumps(item, ensure_ascii=False)[1:-1])
            elif isinstance(item, int | float) and not isinstance(item, bool):
                with contextlib.suppress(BadValue, ValueError):
                    self.texts.add(to_text(item))

    def touches(self, text: str) -> bool:
        """True when `text` contains a tainted text."""
        return any(tainted in text for tainted in self.texts)
