"""Email through a real SMTP server on loopback (aiosmtpd) with STARTTLS, a certificate made by the test, and a
login: the MIME the server received, retries of what the server did not take, and never a second send of what it
did."""

from __future__ import annotations

import asyncio
import email
import email.policy
import json
import socket
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, Envelope, LoginPassword, Session

from tests.conftest import Running, ServerFactory
from tests.pki import make_pki

PRODUCT = "mail"


@dataclass
class Mailbox:
    """What the SMTP server received, and how it answers DATA: `answers` are replies used first, one per DATA."""

    received: list[Envelope] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)
    delay_s: float = 0.0
    data_commands: int = 0
    done: asyncio.Event | None = None

    async def handle_DATA(self, server: Any, session: Session, envelope: Envelope) -> str:
        self.data_commands += 1
        if self.answers:
            return self.answers.pop(0)
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        self.received.append(envelope)
        return "250 Message accepted for delivery"

    def message(self, index: int = 0) -> EmailMessage:
        content = self.received[index].original_content
        assert content is not None
        parsed = email.message_from_bytes(content, policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        return parsed


def _authenticate(server: Any, session: Session, envelope: Envelope, mechanism: str, data: Any) -> AuthResult:
    ok = isinstance(data, LoginPassword) and data.login == b"shop" and data.password == b"s3cret-pw"
    return AuthResult(success=ok, handled=False)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class SmtpServer:
    mailbox: Mailbox
    port: int
    ca_file: Path


@pytest.fixture
async def smtp_server(tmp_path: Path) -> AsyncIterator[SmtpServer]:
    pki = make_pki(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(pki["server_cert"], pki["server_key"])
    mailbox = Mailbox()
    port = _free_port()
    controller = Controller(
        mailbox,
        hostname="127.0.0.1",
        port=port,
        tls_context=context,
        require_starttls=True,
        authenticator=_authenticate,
        auth_required=True,
    )
    controller.start()
    yield SmtpServer(mailbox, port, pki["ca"])
    controller.stop()


def manifest(smtp: SmtpServer, **settings: Any) -> bytes:
    email_env = {
        "host": "127.0.0.1",
        "port": smtp.port,
        "tls": "starttls",
        "username": "shop",
        "password": "$Secret{SMTP_PASSWORD}",
        "sender": "Boutique Zoë <hello@shop.example.com>",
        "ca_file": str(smtp.ca_file),
        **settings,
    }
    document = {
        "product": PRODUCT,
        "environments": [{"slug": "dev"}],
        "notifications": [
            {
                "tag": "users",
                "envs": {"dev": {"email": email_env, "sms": {"provider": "log"}}},
                "messages": [
                    {
                        "tag": "welcome",
                        "email": {
                            "subject": "Bienvenue, {{name}} ✓",
                            "html": "<p>Hello {{name}}</p>",
                            "text": "Hello {{name}}",
                        },
                        "sms": {"body": "Hi {{name}}"},
                    }
                ],
            }
        ],
    }
    return json.dumps(document).encode()


@pytest.fixture
async def running(start_server: ServerFactory, smtp_server: SmtpServer, monkeypatch: pytest.MonkeyPatch) -> Running:
    monkeypatch.setenv("PROCESSOR_SECRET_SMTP_PASSWORD", "s3cret-pw")
    server = await start_server()
    await server.client.product.apply(manifest(smtp_server))
    return server


WHERE = {"product": PRODUCT, "env": "dev", "event": "users:welcome"}
ADA = {"to": ["ada@example.com"], "variables": {"name": "A"}}


async def test_an_email_arrives_over_starttls_as_multipart_alternative(
    running: Running, smtp_server: SmtpServer
) -> None:
    sent = await running.client.notification.send(
        **WHERE,
        email={
            "to": ["Zoë Ünïcode <zoe@example.com>"],
            "cc": ["cc@example.com"],
            "bcc": ["hidden@example.com"],
            "variables": {"name": "<script>Zoë</script>"},
            "attachments": [{"file_name": "notes.txt", "content_type": "text/plain", "data": b"attached"}],
        },
    )
    result = sent.channel("email")
    assert result is not None and result.success and result.provider == "smtp", result
    envelope = smtp_server.mailbox.received[0]
    assert envelope.mail_from == "hello@shop.example.com"
    assert sorted(envelope.rcpt_tos) == ["cc@example.com", "hidden@example.com", "zoe@example.com"]
    raw = envelope.original_content or b""
    assert b"hidden@example.com" not in raw, "Bcc is in the envelope only"
    assert raw.isascii(), "non-ASCII names and subjects are encoded (RFC 2047), never sent raw"
    message = smtp_server.mailbox.message()
    assert message["Subject"] == "Bienvenue, <script>Zoë</script> ✓"
    assert message["From"].addresses[0].display_name == "Boutique Zoë"
    assert message["To"].addresses[0].display_name == "Zoë Ünïcode"
    assert message["Message-ID"] == result.message_ids[0]
    assert message.get_content_type() == "multipart/mixed"
    alternative = next(part for part in message.iter_parts() if part.get_content_type() == "multipart/alternative")
    parts = {part.get_content_type(): part.get_content() for part in alternative.iter_parts()}
    assert parts["text/plain"].strip() == "Hello <script>Zoë</script>"
    assert parts["text/html"].strip() == "<p>Hello &lt;script&gt;Zoë&lt;/script&gt;</p>"
    attachment = next(message.iter_attachments())
    assert attachment.get_filename() == "notes.txt" and attachment.get_content() == "attached"


async def test_the_same_idempotency_key_sends_no_second_email(running: Running, smtp_server: SmtpServer) -> None:
    send = {"email": {"to": ["ada@example.com"], "variables": {"name": "Ada"}}, "idempotency_key": "welcome-1"}
    first = await running.client.notification.send(**WHERE, **send)
    again = await running.client.notification.send(**WHERE, **send)
    assert first.results == again.results and first.results[0].success
    assert len(smtp_server.mailbox.received) == 1


async def test_a_transient_refusal_is_retried_and_the_email_sent_once(
    running: Running, smtp_server: SmtpServer
) -> None:
    smtp_server.mailbox.answers = ["451 4.3.0 try again later"]
    sent = await running.client.notification.send(**WHERE, email=ADA)
    result = sent.results[0]
    assert result.success and result.attempts == 2
    assert len(smtp_server.mailbox.received) == 1


async def test_a_permanent_refusal_is_not_retried_and_other_channels_still_send(
    running: Running, smtp_server: SmtpServer
) -> None:
    smtp_server.mailbox.answers = ["554 5.7.1 rejected"]
    sent = await running.client.notification.send(
        **WHERE,
        email=ADA,
        sms={"to": ["+447700900123"], "variables": {"name": "A"}},
    )
    email_result, sms_result = sent.results
    assert not email_result.success and email_result.error_reason == "NOTIFICATION_REJECTED"
    assert email_result.attempts == 1 and "554" in email_result.error_message
    assert sms_result.success
    assert smtp_server.mailbox.data_commands == 1


async def test_an_email_the_server_may_have_taken_is_never_sent_again(
    start_server: ServerFactory, smtp_server: SmtpServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PROCESSOR_SECRET_SMTP_PASSWORD", "s3cret-pw")
    server = await start_server()
    await server.client.product.apply(manifest(smtp_server, timeout="1s"))
    smtp_server.mailbox.delay_s = 1.5  # answers DATA after the processor stopped waiting
    sent = await server.client.notification.send(**WHERE, email=ADA)
    result = sent.results[0]
    assert not result.success and result.attempts == 1, result
    assert "not sent again" in result.error_message
    assert smtp_server.mailbox.data_commands == 1, "the message went to the server once"


async def test_a_wrong_password_is_an_auth_failure_and_no_secret_is_shown(
    start_server: ServerFactory, smtp_server: SmtpServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PROCESSOR_SECRET_SMTP_PASSWORD", "wrong-pw-123")
    server = await start_server()
    await server.client.product.apply(manifest(smtp_server))
    sent = await server.client.notification.send(**WHERE, email=ADA)
    result = sent.results[0]
    assert not result.success and result.error_reason == "UPSTREAM_AUTH_FAILED" and result.attempts == 1
    assert "wrong-pw-123" not in result.error_message
    page = await server.client.logs.list_executions(product=PRODUCT)
    assert "wrong-pw-123" not in str(page)


async def test_an_unreachable_server_is_retried_then_reported(start_server: ServerFactory, tmp_path: Path) -> None:
    server = await start_server()
    smtp = SmtpServer(Mailbox(), _free_port(), make_pki(tmp_path)["ca"])
    await server.client.product.apply(manifest(smtp, username=None, password=None))
    sent = await server.client.notification.send(**WHERE, email=ADA, retries=1)
    result = sent.results[0]
    assert not result.success and result.error_reason == "UPSTREAM_UNREACHABLE" and result.attempts == 2
