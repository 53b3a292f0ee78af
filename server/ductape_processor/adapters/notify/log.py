"""The `log` provider of every channel: the rendered message goes to the execution log instead of anywhere else.

It is what the example product uses, so `make run` sends notifications with nothing else running. What it shows is
the rendered message (the call's variables in it) and its recipients; no provider credentials exist for it to show.
"""

from __future__ import annotations

import dataclasses
import os
from email.headerregistry import Address
from typing import Any

from ductape_processor.adapters.notify.base import ChannelAdapter, EmailAttachment, Sent


def _shown(value: Any) -> Any:
    if isinstance(value, Address):
        return str(value)
    if isinstance(value, EmailAttachment):
        return {"file_name": value.file_name, "content_type": value.content_type, "size": len(value.data)}
    if isinstance(value, tuple | list):
        return [_shown(item) for item in value]
    if isinstance(value, dict):
        return {key: _shown(item) for key, item in value.items()}
    return value


class LogChannel(ChannelAdapter):
    """Accepts every delivery and shows it whole in the execution record."""

    provider = "log"

    async def send(self, outgoing: Any, timeout_s: float) -> Sent:
        fields = {f.name: _shown(getattr(outgoing, f.name)) for f in dataclasses.fields(outgoing)}
        return Sent(f"log-{os.urandom(8).hex()}", fields)
