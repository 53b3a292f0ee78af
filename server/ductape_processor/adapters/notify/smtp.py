"""Email over SMTP (aiosmtplib): pooled connections, STARTTLS, implicit TLS or none.

A delivery is one transaction (MAIL, RCPT for every recipient, DATA) on a pooled connection. What may be retried
depends on how far it got: anything before DATA was answered can be tried again when the failure is transient
(the server unreachable, a 4xx reply, a pooled connection the server had closed); a 4xx or 5xx reply to DATA means
the server did not take the message (4xx: try again; 5xx: refused); a connection lost or a timeout after the
message was sent and before the server replied leaves it unknown whether the server took it, so it is never sent
again. A connection whose transaction failed is closed, not pooled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from email.encoders import encode_base64
from email.header import Header
from email.headerregistry import Address
from email.message import Message
from email.mime.base import MIMEBase
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.policy import compat32
from email.utils import formataddr, formatdate
from typing import Any, Final

import aiosmtplib

from ductape_processor.adapters.notify.base import ChannelAdapter, ChannelFailure, OutgoingEmail, Sent
from ductape_processor.reasons import Reason
from ductape_processor.runtime.notifications.addresses import mailbox
from ductape_processor.runtime.registry.notifications import SmtpEmail

log = logging.getLogger(__name__)

_AUTH_CODES: Final = frozenset({530, 534, 535, 538})
_POLICY: Final = compat32.clone(linesep="\r\n")
"""CRLF line ends; every part is 7-bit already (base64), so no server needs 8BITMIME or SMTPUTF8."""


def _mailboxes(addresses: tuple[Address, ...]) -> str:
    return ", ".join(formataddr((address.display_name, address.addr_spec), "utf-8") for address in addresses)


def build_message(outgoing: OutgoingEmail, sender: Address) -> bytes:
    """The MIME message: text and HTML as multipart/alternative, attachments around them (multipart/mixed), every
    part 7-bit (base64), names and subjects encoded when they are not ASCII (RFC 2047), file names as RFC 2231
    says, Bcc in the envelope only, CRLF line ends.

    Built with the email package's `compat32` classes: the `EmailMessage` API costs four times the CPU per message
    (its header registry parses every header again), which bench_notifications.py measured as a third of a send."""
    parts: list[Message] = []
    if outgoing.text is not None:
        parts.append(MIMEText(outgoing.text, "plain", "utf-8"))
    if outgoing.html is not None:
        parts.append(MIMEText(outgoing.html, "html", "utf-8"))
    body: Message = parts[0] if len(parts) == 1 else MIMEMultipart("alternative", _subparts=parts)
    if outgoing.attachments:
        files: list[Message] = [body]
        for attachment in outgoing.attachments:
            maintype, _, subtype = attachment.content_type.partition("/")
            part = MIMEBase(maintype, subtype)
            part.set_payload(attachment.data)
            encode_base64(part)
            name = attachment.file_name
            part.add_header(
                "Content-Disposition", "attachment", filename=name if name.isascii() else ("utf-8", "", name)
            )
            files.append(part)
        body = MIMEMultipart("mixed", _subparts=files)
    body["From"] = formataddr((sender.display_name, sender.addr_spec), "utf-8")
    if outgoing.to:
        body["To"] = _mailboxes(outgoing.to)
    if outgoing.cc:
        body["Cc"] = _mailboxes(outgoing.cc)
    subject = outgoing.subject
    body["Subject"] = subject if subject.isascii() else Header(subject, "utf-8").encode()
    body["Date"] = formatdate(localtime=False, usegmt=True)
    body["Message-ID"] = f"<{outgoing.message_id}@{sender.domain}>"
    if "MIME-Version" not in body:
        body["MIME-Version"] = "1.0"
    return body.as_bytes(policy=_POLICY)


def _failure(exc: BaseException, *, during_data: bool) -> ChannelFailure:
    """The ChannelFailure of an aiosmtplib error (never quoting credentials: replies are the server's)."""
    if isinstance(exc, aiosmtplib.SMTPAuthenticationError):
        return ChannelFailure(Reason.UPSTREAM_AUTH_FAILED, f"the SMTP server refused the login ({exc.code})")
    if isinstance(exc, aiosmtplib.SMTPResponseException) and not isinstance(exc, aiosmtplib.SMTPServerDisconnected):
        if exc.code in _AUTH_CODES:
            return ChannelFailure(Reason.UPSTREAM_AUTH_FAILED, f"the SMTP server asks for authentication ({exc.code})")
        text = f"the SMTP server answered {exc.code} {exc.message}".strip()
        if 400 <= exc.code < 500:
            return ChannelFailure(Reason.UPSTREAM_STATUS, text, retryable=True)
        return ChannelFailure(Reason.NOTIFICATION_REJECTED, text)
    if during_data:
        return ChannelFailure(
            Reason.UPSTREAM_UNREACHABLE,
            f"the connection ended after the message was sent and before the server answered "
            f"({type(exc).__name__}); it may have been accepted, so it is not sent again",
        )
    if isinstance(exc, TimeoutError | aiosmtplib.SMTPTimeoutError):
        return ChannelFailure(Reason.UPSTREAM_TIMEOUT, "the SMTP server did not answer in time", retryable=True)
    return ChannelFailure(
        Reason.UPSTREAM_UNREACHABLE, f"cannot reach the SMTP server: {type(exc).__name__}", retryable=True
    )


class SmtpChannel(ChannelAdapter):
    """Sends emails through one SMTP server, on at most `pool_size` connections kept open between sends."""

    provider = "smtp"

    def __init__(self, settings: SmtpEmail, name: str) -> None:
        self._settings = settings
        self._name = name
        self._sender = mailbox(settings.sender)
        self._slots = asyncio.Semaphore(settings.pool_size)
        self._idle: list[aiosmtplib.SMTP] = []
        self._tls: ssl.SSLContext | None = None
        if settings.tls != "none":
            self._tls = ssl.create_default_context(cafile=settings.ca_file)

    def _client(self) -> aiosmtplib.SMTP:
        settings = self._settings
        return aiosmtplib.SMTP(
            hostname=settings.host,
            port=settings.port,
            username=settings.username,
            password=settings.password,
            timeout=settings.timeout.total_seconds(),
            use_tls=settings.tls == "implicit",
            start_tls=settings.tls == "starttls",
            tls_context=self._tls,
        )

    async def send(self, outgoing: Any, timeout_s: float) -> Sent:
        assert isinstance(outgoing, OutgoingEmail)
        message = build_message(outgoing, self._sender)
        recipients = [address.addr_spec for address in (*outgoing.to, *outgoing.cc, *outgoing.bcc)]
        try:
            async with asyncio.timeout(timeout_s), self._slots:
                return await self._transaction(message, recipients, outgoing.message_id)
        except TimeoutError:
            raise ChannelFailure(
                Reason.UPSTREAM_TIMEOUT, "the SMTP server did not finish within the time left", retryable=False
            ) from None

    async def _transaction(self, message: bytes, recipients: list[str], message_id: str) -> Sent:
        client = self._idle.pop() if self._idle else None
        reused = client is not None
        during_data = False
        try:
            if client is None or not client.is_connected:
                client, reused = self._client(), False
                await client.connect()
            try:
                await client.mail(self._sender.addr_spec)
            except aiosmtplib.SMTPServerDisconnected:
                if not reused:
                    raise
                client = self._client()  # the server closed the idle connection: open a fresh one
                await client.connect()
                await client.mail(self._sender.addr_spec)
            for recipient in recipients:
                await client.rcpt(recipient)
            during_data = True
            response = await client.data(message)
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            if client is not None:
                await _drop(client)
            raise _failure(exc, during_data=during_data) from None
        except BaseException:
            if client is not None:
                await _drop(client)  # cancelled mid-transaction: the connection is out of step
            raise
        self._idle.append(client)
        log.debug("smtp %s accepted %s: %s", self._name, message_id, response.message)
        return Sent(f"<{message_id}@{self._sender.domain}>")

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        await asyncio.gather(*(_quit(client) for client in idle), return_exceptions=True)


async def _quit(client: aiosmtplib.SMTP) -> None:
    with contextlib.suppress(Exception):
        await client.quit()
    client.close()


async def _drop(client: aiosmtplib.SMTP) -> None:
    client.close()
