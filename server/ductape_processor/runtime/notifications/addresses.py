"""Recipients' addresses: email mailboxes (`ada@example.com`, `Ada Lovelace <ada@example.com>`) and phone numbers
in E.164 form. Checked before anything is sent, so a bad one is the caller's INVALID_ARGUMENT, never a provider's
half-sent batch."""

from __future__ import annotations

import re
from email.headerregistry import Address
from typing import Final

E164: Final = re.compile(r"\+[1-9][0-9]{1,14}")
"""A phone number in E.164 form: `+`, a country code not starting with 0, at most 15 digits in all."""
MAX_ADDRESS: Final = 254
"""Characters of an email address (RFC 5321's path limit, less its brackets)."""
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_LOCAL = re.compile(r'[^\s"(),:;<>@\[\\\]]+')
_MAILBOX = re.compile(r"\s*(?:([^<>]*?)\s*<([^<>]*)>|([^<>]*?))\s*")


def mailbox(text: str) -> Address:
    """The mailbox `text` names; raise ValueError saying why it is not one."""
    if _CONTROL.search(text):
        raise ValueError("is not an email address: it holds a control character")
    match = _MAILBOX.fullmatch(text)
    if match is None:
        raise ValueError(f"{text!r} is not an email address")
    name = (match.group(1) or "").strip()
    address = match.group(2) if match.group(2) is not None else match.group(3)
    if len(name) >= 2 and name[0] == name[-1] == '"':
        name = name[1:-1]
    elif any(c in name for c in ',;:@"'):
        raise ValueError(f"{text!r}: a display name holding , ; : @ or a quote must be quoted")
    if not address or address.count("@") != 1 or any(c.isspace() for c in address) or len(address) > MAX_ADDRESS:
        raise ValueError(f"{text!r} is not an email address")
    local, domain = address.split("@")
    labels = domain.split(".")
    if not 0 < len(local) <= 64 or len(labels) < 2 or not all(labels) or not _LOCAL.fullmatch(local):
        raise ValueError(f"{text!r} is not an email address")
    try:
        return Address(display_name=name, username=local, domain=domain)
    except (ValueError, IndexError) as exc:
        raise ValueError(f"{text!r} is not an email address ({exc})") from None


def phone_number_problem(text: str) -> str | None:
    """Why `text` is not a phone number in E.164 form, or None when it is."""
    return None if E164.fullmatch(text) else f"{text!r} is not a phone number in E.164 form (+ and 2 to 15 digits)"
