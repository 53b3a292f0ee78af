"""Notifications through the processor on the `log` provider: the manifest's checks at apply time, the call's checks
before anything is sent, rendering (missing variables, HTML escaping), a result per channel, idempotency, and the
rendered message in the execution log."""

from __future__ import annotations

import json
from typing import Any

import pytest
from ductape.processor import FailedPreconditionError, InvalidArgumentError, NotFoundError

from tests.conftest import Running, ServerFactory

PRODUCT = "notes"
LOG = {"provider": "log"}
WELCOME = {
    "tag": "welcome",
    "email": {
        "subject": "Welcome, {{name}}",
        "html": "<p>Hello {{name}}, you have {{count}} messages.</p>",
        "text": "Hello {{name}}, you have {{count}} messages.",
    },
    "sms": {"body": "Hi {{name}}"},
    "push": {"title": "Hi {{name}}", "body": "{{count}} new", "data": {"kind": "welcome"}},
    "callback": {"body": {"event": "welcome", "user": "{{name}}"}},
}


def manifest(envs: dict[str, Any] | None = None, messages: list[dict[str, Any]] | None = None) -> bytes:
    channels = {"email": LOG, "sms": LOG, "push": LOG, "callback": LOG}
    document = {
        "product": PRODUCT,
        "environments": [{"slug": "dev"}],
        "notifications": [{"tag": "users", "envs": envs or {"dev": channels}, "messages": messages or [WELCOME]}],
    }
    return json.dumps(document).encode()


def where(**more: Any) -> dict[str, Any]:
    return {"product": PRODUCT, "env": "dev", "event": "users:welcome", **more}


@pytest.fixture
async def running(start_server: ServerFactory) -> Running:
    server = await start_server()
    await server.client.product.apply(manifest())
    return server


async def test_each_channel_given_is_sent_and_has_one_result(running: Running) -> None:
    sent = await running.client.notification.send(
        **where(),
        email={"to": ["Ada <ada@example.com>"], "variables": {"name": "Ada", "count": 3}},
        sms={"to": ["+447700900123"], "variables": {"name": "Ada"}},
    )
    assert [(r.channel, r.success, r.provider) for r in sent.results] == [("email", True, "log"), ("sms", True, "log")]
    assert all(len(r.message_ids) == 1 and r.attempts == 1 for r in sent.results)
    assert sent.process_id and sent.version == 1


async def test_the_log_provider_writes_the_rendered_message_to_the_execution_log(running: Running) -> None:
    sent = await running.client.notification.send(
        **where(),
        email={"to": ["ada@example.com"], "variables": {"name": "<b>Ada</b> & co", "count": 2}},
        push={"device_tokens": ["token-1", "token-2"], "variables": {"name": "Ada", "count": 2}, "data": {"n": 2}},
    )
    page = await running.client.logs.list_executions(product=PRODUCT)
    record = next(e for e in page.executions if e.process_id == sent.process_id)
    assert record.kind == "notification" and record.resource == "users:welcome" and record.attempts == 3
    detail = json.loads(record.detail)
    email = detail["email"]["sent"]
    assert email["subject"] == "Welcome, <b>Ada</b> & co"  # the subject is text: nothing to escape
    assert email["html"] == "<p>Hello &lt;b&gt;Ada&lt;/b&gt; &amp; co, you have 2 messages.</p>"
    assert email["text"] == "Hello <b>Ada</b> & co, you have 2 messages."
    assert email["to"] == ["ada@example.com"]
    pushes = detail["push"]["sent"]
    assert [p["device_token"] for p in pushes] == ["token-1", "token-2"]
    assert pushes[0]["data"] == {"kind": "welcome", "n": "2"} and pushes[0]["title"] == "Hi Ada"


async def test_missing_variables_are_listed_and_nothing_is_sent(running: Running) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        await running.client.notification.send(
            **where(), email={"to": ["ada@example.com"], "variables": {}}, sms={"to": ["+447700900123"]}
        )
    error = caught.value
    assert error.reason == "TEMPLATE_VARIABLES_MISSING"
    assert error.metadata["missing"] == "count,name"
    violations = {(v.field, v.description) for v in error.field_violations}
    assert violations == {("email.variables", "missing: count, name"), ("sms.variables", "missing: name")}
    page = await running.client.logs.list_executions(product=PRODUCT)
    assert [e.error_reason for e in page.executions] == ["TEMPLATE_VARIABLES_MISSING"]


async def test_bad_addresses_and_numbers_are_each_a_field_violation(running: Running) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        await running.client.notification.send(
            **where(),
            email={"to": ["ada@example.com", "not-an-address"], "cc": ["x@y.com\r\nBcc: z@z.com"], "variables": {}},
            sms={"to": ["+447700900123", "07700900123", "+0123"], "variables": {"name": "A"}},
        )
    fields = [v.field for v in caught.value.field_violations]
    assert caught.value.reason == "INVALID_ARGUMENT"
    assert fields == ["email.to[1]", "email.cc[0]", "sms.to[1]", "sms.to[2]"]


@pytest.mark.parametrize(
    ("event", "reason"),
    [("nobody:welcome", "NOTIFICATION_NOT_FOUND"), ("users:goodbye", "NOTIFICATION_MESSAGE_NOT_FOUND")],
)
async def test_an_unknown_notification_or_message_is_not_found(running: Running, event: str, reason: str) -> None:
    with pytest.raises(NotFoundError) as caught:
        await running.client.notification.send(**where(event=event), sms={"to": ["+447700900123"]})
    assert caught.value.reason == reason


async def test_a_channel_the_message_has_no_template_for_is_refused(running: Running) -> None:
    await running.client.product.apply(manifest(messages=[{"tag": "welcome", "sms": {"body": "hi"}}]))
    with pytest.raises(InvalidArgumentError) as caught:
        await running.client.notification.send(**where(), email={"to": ["ada@example.com"]})
    assert [v.field for v in caught.value.field_violations] == ["email"]
    with pytest.raises(InvalidArgumentError) as caught:
        await running.client.notification.send(**where())
    assert "at least one channel" in caught.value.message
    with pytest.raises(InvalidArgumentError) as caught:
        await running.client.notification.send(**where(event="users"), sms={"to": ["+447700900123"]})
    assert [v.field for v in caught.value.field_violations] == ["event"]


async def test_the_same_idempotency_key_sends_once(running: Running) -> None:
    send = {"sms": {"to": ["+447700900123"], "variables": {"name": "Ada"}}, "idempotency_key": "welcome-ada"}
    first = await running.client.notification.send(**where(), **send)
    again = await running.client.notification.send(**where(), **send)
    assert again.results == first.results and again.process_id != first.process_id
    with pytest.raises(FailedPreconditionError) as caught:
        await running.client.notification.send(
            **where(), sms={"to": ["+447700900124"], "variables": {"name": "Bob"}}, idempotency_key="welcome-ada"
        )
    assert caught.value.reason == "IDEMPOTENCY_KEY_REUSED"


@pytest.mark.parametrize(
    ("envs", "messages", "path", "why"),
    [
        ({"dev": {"email": LOG}}, [{"tag": "m", "sms": {"body": "x"}}], "notifications[0]", "has no sms provider"),
        (None, [{"tag": "m", "sms": {"body": "{{ name"}}], "notifications[0].messages[0].sms.body", "syntax error"),
        (None, [{"tag": "m", "email": {"subject": "s"}}], "notifications[0].messages[0].email", "needs html, text"),
        ({"dev": {"email": {"host": "h", "sender": "nobody"}}}, [WELCOME], "notifications[0].envs.dev.email", "email"),
        ({"dev": {}, "qa": {}}, [{"tag": "m", "sms": {"body": "x"}}], "notifications[0]", ""),
        (
            None,
            [{"tag": "m", "sms": {"body": "a"}}, {"tag": "m", "sms": {"body": "b"}}],
            "notifications[0].messages",
            "",
        ),
    ],
)
async def test_manifest_problems_are_refused_at_apply_time(
    server: Running, envs: dict[str, Any] | None, messages: list[dict[str, Any]], path: str, why: str
) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        await server.client.product.apply(manifest(envs, messages))
    assert caught.value.reason == "INVALID_MANIFEST"
    problems = [(v.field, v.description) for v in caught.value.field_violations]
    assert any(field.startswith(path) and why in description for field, description in problems), problems


async def test_an_attachment_can_be_a_file_of_the_products_storage(start_server: ServerFactory) -> None:
    server = await start_server()
    document = json.loads(manifest())
    document["storage"] = [{"tag": "files", "envs": {"dev": {"provider": "fs"}}}]
    await server.client.product.apply(json.dumps(document).encode())
    await server.client.storage.save(
        product=PRODUCT, env="dev", event="files", file_name="docs/terms.pdf", data=b"%PDF-1.4 terms"
    )
    storage_file = {"storage": "files", "file_name": "docs/terms.pdf"}
    sent = await server.client.notification.send(
        **where(),
        email={
            "to": ["ada@example.com"],
            "variables": {"name": "Ada", "count": 1},
            "attachments": [{"storage_file": storage_file}, ("notes.txt", b"inline")],
        },
    )
    page = await server.client.logs.list_executions(product=PRODUCT, resource="users:welcome")
    record = next(e for e in page.executions if e.process_id == sent.process_id)
    attachments = json.loads(record.detail)["email"]["sent"]["attachments"]
    assert attachments == [
        {"file_name": "terms.pdf", "content_type": "application/pdf", "size": 14},
        {"file_name": "notes.txt", "content_type": "text/plain", "size": 6},
    ]
    with pytest.raises(NotFoundError) as caught:
        await server.client.notification.send(
            **where(),
            email={
                "to": ["ada@example.com"],
                "variables": {"name": "Ada", "count": 1},
                "attachments": [{"storage_file": {"storage": "files", "file_name": "missing.pdf"}}],
            },
        )
    assert caught.value.reason == "FILE_NOT_FOUND"
