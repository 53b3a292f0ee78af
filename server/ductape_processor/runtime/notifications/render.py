"""From a call's channel inputs and a message's templates to the deliveries each channel sends.

Everything a caller can get wrong is found here, before anything is sent, and reported together: a bad address or
phone number (one violation each, `email.to[1]`), a channel the message has no template for, variables a template
uses that the call did not give (`TEMPLATE_VARIABLES_MISSING`, every missing name listed per channel).
"""

from __future__ import annotations

import json
import mimetypes
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from email.headerregistry import Address
from typing import Any, Final

from ductape_processor.adapters.notify.base import (
    EmailAttachment,
    Outgoing,
    OutgoingCallback,
    OutgoingEmail,
    OutgoingPush,
    OutgoingSms,
)
from ductape_processor.errors import FieldViolation, InvalidArgument
from ductape_processor.reasons import Reason
from ductape_processor.runtime.notifications.addresses import mailbox, phone_number_problem
from ductape_processor.runtime.notifications.call import NotificationCall
from ductape_processor.runtime.notifications.templates import (
    CompiledTemplate,
    TemplateRenderError,
    compile_message_template,
)
from ductape_processor.runtime.policies.caches import BoundedCache
from ductape_processor.runtime.registry.notifications import CHANNELS, NotificationMessage

MAX_RECIPIENTS: Final = 100
"""Recipients (to, cc and bcc together), devices or phone numbers of one channel in one call."""
MAX_ATTACHMENTS: Final = 20
"""Files attached to one email."""
COMPILED_TEMPLATES: Final = 4096
"""Compiled templates kept in memory (by text and kind)."""
_LINE_BREAKS = re.compile(r"[\r\n]+")
_MEDIA_TYPE = re.compile(r"[A-Za-z0-9!#$&^_.+-]+/[A-Za-z0-9!#$&^_.+-]+")
_FILE_NAME_BAD = re.compile(r"[\x00-\x1f\x7f/\\]")


class MessageTemplates:
    """Compiles message templates once per text (plain or HTML) and keeps them, bounded."""

    def __init__(self, size: int = COMPILED_TEMPLATES) -> None:
        self._compiled: BoundedCache[tuple[str, bool], CompiledTemplate] = BoundedCache(size)

    def get(self, source: str, *, html: bool = False) -> CompiledTemplate:
        """The compiled template of `source` (valid: the manifest was checked when it was applied)."""
        key = (source, html)
        found = self._compiled.get(key)
        if found is None:
            found = compile_message_template(source, html=html)
            self._compiled.put(key, found)
        return found


@dataclass(slots=True)
class _Problems:
    violations: list[FieldViolation] = field(default_factory=list)
    missing: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def add(self, where: str, why: str) -> None:
        self.violations.append(FieldViolation(where, why))


@dataclass(frozen=True, slots=True)
class Rendered:
    """Each channel asked for, in channel order, with the deliveries it sends."""

    channels: tuple[tuple[str, tuple[Outgoing, ...]], ...]


def render(call: NotificationCall, message: NotificationMessage, templates: MessageTemplates, event: str) -> Rendered:
    """The deliveries of every channel `call` gives input for; raise InvalidArgument listing every problem."""
    problems = _Problems()
    channels: list[tuple[str, tuple[Outgoing, ...]]] = []
    for channel in CHANNELS:
        given = getattr(call, channel)
        if given is None:
            continue
        if getattr(message, channel) is None:
            problems.add(channel, f"message {event!r} has no {channel} template")
            continue
        deliveries = _RENDERERS[channel](given, message, templates, problems)
        if deliveries is not None:
            channels.append((channel, deliveries))
    if not channels and not problems.violations and not problems.missing:
        problems.add("email", "give the input of at least one channel (email, push, sms, callback)")
    if problems.violations:
        raise InvalidArgument(
            f"{problems.violations[0].field}: {problems.violations[0].description}"
            + (f" (and {len(problems.violations) - 1} more)" if len(problems.violations) > 1 else ""),
            violations=problems.violations,
        )
    if problems.missing:
        names = sorted({name for missing in problems.missing.values() for name in missing})
        raise InvalidArgument(
            f"the message's templates use variables the call did not give: {', '.join(names)}",
            reason=Reason.TEMPLATE_VARIABLES_MISSING,
            metadata={"missing": ",".join(names)},
            violations=[
                FieldViolation(f"{channel}.variables", f"missing: {', '.join(missing)}")
                for channel, missing in problems.missing.items()
            ],
        )
    return Rendered(tuple(channels))


def _text(
    templates: MessageTemplates,
    source: str,
    values: Mapping[str, Any],
    channel: str,
    problems: _Problems,
    *,
    html: bool = False,
) -> str:
    try:
        return templates.get(source, html=html).render(values)
    except TemplateRenderError as exc:
        if exc.missing:
            known = problems.missing.get(channel, ())
            problems.missing[channel] = tuple(sorted(set(known) | set(exc.missing)))
        else:
            problems.add(f"{channel}.variables", exc.message)
        return ""


def _count(items: tuple[str, ...], where: str, problems: _Problems, *, least: int = 1) -> bool:
    if len(items) < least:
        problems.add(where, "needs at least one recipient")
        return False
    if len(items) > MAX_RECIPIENTS:
        problems.add(where, f"holds more than {MAX_RECIPIENTS} recipients")
        return False
    return True


def _recipients(
    items: tuple[str, ...], where: str, problem_of: Callable[[str], str | None], problems: _Problems
) -> bool:
    """Whether `items` holds as many recipients as a channel takes; each one's problem is added at `where[i]`."""
    if not _count(items, where, problems):
        return False
    for index, item in enumerate(items):
        problem = problem_of(item)
        if problem is not None:
            problems.add(f"{where}[{index}]", problem)
    return True


def _device_token_problem(token: str) -> str | None:
    if not token or len(token) > 4096 or any(ord(c) < 32 for c in token):
        return "is not a device token (1 to 4096 printable characters)"
    return None


def _email(given: Any, message: NotificationMessage, templates: MessageTemplates, problems: _Problems) -> Any:
    template = message.email
    assert template is not None
    if not _count(given.to + given.cc + given.bcc, "email.to", problems):
        return None
    lists: dict[str, list[Address]] = {}
    for part in ("to", "cc", "bcc"):
        lists[part] = []
        for index, text in enumerate(getattr(given, part)):
            try:
                lists[part].append(mailbox(text))
            except ValueError as exc:
                problems.add(f"email.{part}[{index}]", str(exc))
    if len(given.attachments) > MAX_ATTACHMENTS:
        problems.add("email.attachments", f"holds more than {MAX_ATTACHMENTS} files")
    attachments = []
    for index, attachment in enumerate(given.attachments):
        if not attachment.file_name or _FILE_NAME_BAD.search(attachment.file_name):
            problems.add(f"email.attachments[{index}].file_name", "is required, without a control character or /")
            continue
        guessed = mimetypes.guess_type(attachment.file_name)[0] or "application/octet-stream"
        content_type = attachment.content_type or guessed
        if not _MEDIA_TYPE.fullmatch(content_type):
            problems.add(f"email.attachments[{index}].content_type", "is not a media type (type/subtype)")
            continue
        attachments.append(EmailAttachment(attachment.file_name, content_type, attachment.data))
    values = given.variables
    subject = _LINE_BREAKS.sub(" ", _text(templates, template.subject, values, "email", problems)).strip()
    html = _text(templates, template.html, values, "email", problems, html=True) if template.html else None
    text = _text(templates, template.text, values, "email", problems) if template.text else None
    outgoing = OutgoingEmail(
        tuple(lists["to"]), tuple(lists["cc"]), tuple(lists["bcc"]), subject, html, text, tuple(attachments)
    )
    return (outgoing,)


def _push(given: Any, message: NotificationMessage, templates: MessageTemplates, problems: _Problems) -> Any:
    template = message.push
    assert template is not None
    if not _recipients(given.device_tokens, "push.device_tokens", _device_token_problem, problems):
        return None
    values = given.variables
    title = _text(templates, template.title, values, "push", problems)
    body = _text(templates, template.body, values, "push", problems)
    data = {key: _text(templates, source, values, "push", problems) for key, source in template.data.items()}
    for key, value in given.data.items():
        data[key] = value if isinstance(value, str) else _json_text(value)
    return tuple(OutgoingPush(token, title, body, data) for token in given.device_tokens)


def _json_text(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _sms(given: Any, message: NotificationMessage, templates: MessageTemplates, problems: _Problems) -> Any:
    template = message.sms
    assert template is not None
    if not _recipients(given.to, "sms.to", phone_number_problem, problems):
        return None
    body = _text(templates, template.body, given.variables, "sms", problems)
    return tuple(OutgoingSms(number, body) for number in given.to)


def _render_json(value: Any, templates: MessageTemplates, values: Mapping[str, Any], problems: _Problems) -> Any:
    if isinstance(value, str):
        return _text(templates, value, values, "callback", problems)
    if isinstance(value, dict):
        return {key: _render_json(item, templates, values, problems) for key, item in value.items()}
    if isinstance(value, list):
        return [_render_json(item, templates, values, problems) for item in value]
    return value


def _callback(given: Any, message: NotificationMessage, templates: MessageTemplates, problems: _Problems) -> Any:
    template = message.callback
    assert template is not None
    body = _render_json(template.body, templates, given.variables, problems)
    body.update(given.body)
    return (OutgoingCallback(dict(given.query), dict(given.params), dict(given.headers), body),)


_RENDERERS = {"email": _email, "push": _push, "sms": _sms, "callback": _callback}
