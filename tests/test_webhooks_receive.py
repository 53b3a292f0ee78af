"""Receiving provider webhooks: real HTTP POSTs to the processor's webhook listener, signed with the independent
`standardwebhooks` package (or a plain HMAC), seen on a Receive stream and in ListReceived; what is refused (401,
413, 404) is neither stored nor dispatched."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from ductape.processor.errors import FailedPreconditionError, InvalidArgumentError
from ductape.processor.webhooks import ReceivedWebhook, ReceiveSubscription
from standardwebhooks import Webhook as StandardWebhook

from tests.conftest import Running, ServerFactory

SECRET = "whsec_" + base64.b64encode(b"the payment provider's secret!!!").decode()
GITHUB_SECRET = "a shared text secret"

MANIFEST = """
product: shop
environments: [{slug: dev}]
brokers:
  - tag: events
    envs: {dev: {type: memory}}
    topics: [{tag: payments, name: payments}, {tag: pushes, name: pushes}]
webhooks:
  - tag: payments
    receive:
      dev: {path: /payments, secret: "$Secret{PAY}", max_body_bytes: 2048, dispatch: {publish: "events:payments"}}
  - tag: github
    receive:
      dev:
        path: /github/pushes
        verify: hmac-sha256
        secret: $Secret{GH}
        header: X-Hub-Signature-256
        prefix: "sha256="
        dispatch: {publish: "events:pushes"}
  - tag: quiet
    receive:
      dev: {path: /quiet, verify: none}
"""


@dataclass
class Listener:
    running: Running
    base: str
    session: aiohttp.ClientSession

    async def post(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
        async with self.session.post(f"{self.base}{path}", data=body, headers=headers) as response:
            return response.status, await response.json()

    def receive(self, webhook: str, group: str = "g") -> ReceiveSubscription:
        return self.running.client.webhook.receive(
            product="shop", env="dev", webhook=webhook, group=group, ack_deadline=5
        )

    async def received(self, webhook: str = "") -> list[Any]:
        listed = await self.running.client.webhook.list_received(product="shop", env="dev", webhook=webhook)
        return list(listed.received)


@pytest.fixture
async def listener(start_server: ServerFactory, tmp_path: Path) -> AsyncIterator[Listener]:
    secrets = tmp_path / "secrets.env"
    secrets.write_text(f"PAY={SECRET}\nGH={GITHUB_SECRET}\n")
    running = await start_server(secrets_file=secrets)
    http = running.app.components.webhook_http
    assert http is not None and http.port == 0  # no product declares a receive path yet: the listener is off
    await running.client.product.apply(MANIFEST.encode())
    await http.ensure()  # what the periodic check does within PROCESSOR_REGISTRY_POLL_S
    async with aiohttp.ClientSession() as session:
        yield Listener(running, f"http://127.0.0.1:{http.port}/webhooks/shop/dev", session)


def signed(body: bytes, msg_id: str = "evt_1", at: datetime | None = None) -> dict[str, str]:
    moment = at or datetime.now(UTC)
    signature = StandardWebhook(SECRET).sign(msg_id, moment, body.decode())
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(int(moment.timestamp())),
        "webhook-signature": signature,
        "content-type": "application/json",
    }


async def first(subscription: ReceiveSubscription, timeout: float = 5.0) -> ReceivedWebhook:
    return await asyncio.wait_for(anext(aiter(subscription)), timeout)


async def test_a_signed_webhook_is_stored_answered_200_and_dispatched_to_a_receive_stream(listener: Listener) -> None:
    subscription = listener.receive("payments")
    try:
        waiting = asyncio.ensure_future(first(subscription))
        await asyncio.sleep(0.3)  # the stream's group exists before the webhook is published
        body = b'{"type":"payment.succeeded","data":{"id":"pay_1"}}'
        status, answer = await listener.post("/payments", body, signed(body))
        assert status == 200 and answer["id"].startswith("rcv_")
        received = await waiting
        assert received.id == answer["id"] and received.webhook_id == "evt_1" and received.webhook == "payments"
        assert received.json() == {"type": "payment.succeeded", "data": {"id": "pay_1"}}
        assert received.headers["webhook-id"] == "evt_1" and received.content_type == "application/json"
        await received.ack()
    finally:
        await subscription.close()
    [stored] = await listener.received("payments")
    assert stored.id == answer["id"] and stored.body == body and stored.headers["webhook-id"] == "evt_1"


@pytest.mark.parametrize(
    "spoil",
    [
        pytest.param(
            lambda h, b: ({**h, "webhook-signature": "v1," + base64.b64encode(b"x" * 32).decode()}, b), id="bad"
        ),
        pytest.param(lambda h, b: (h, b + b" "), id="changed-body"),
        pytest.param(lambda h, b: ({k: v for k, v in h.items() if k != "webhook-signature"}, b), id="unsigned"),
        pytest.param(lambda h, b: (signed(b, at=datetime.fromtimestamp(time.time() - 600, UTC)), b), id="too-old"),
        pytest.param(lambda h, b: (signed(b, at=datetime.fromtimestamp(time.time() + 600, UTC)), b), id="future"),
    ],
)
async def test_bad_and_old_signatures_are_refused_401_and_not_dispatched(listener: Listener, spoil: Any) -> None:
    subscription = listener.receive("payments")
    try:
        waiting = asyncio.ensure_future(first(subscription, timeout=1.5))
        await asyncio.sleep(0.3)
        body = b'{"data":1}'
        headers, sent = spoil(signed(body), body)
        status, answer = await listener.post("/payments", sent, headers)
        assert status == 401 and "signature" in answer["error"]
        with pytest.raises(TimeoutError):
            await waiting
    finally:
        await subscription.close()
    assert await listener.received() == []


async def test_an_exact_replay_is_refused_401_once_the_first_was_stored(listener: Listener) -> None:
    body = b'{"data":1}'
    headers = signed(body, "evt_replayed")
    assert (await listener.post("/payments", body, headers))[0] == 200
    status, _ = await listener.post("/payments", body, headers)
    assert status == 401
    assert len(await listener.received("payments")) == 1


async def test_an_oversized_body_is_refused_413_declared_or_streamed(listener: Listener) -> None:
    body = b"x" * 4096
    status, answer = await listener.post("/payments", body, signed(body))
    assert status == 413 and "2048" in answer["error"]

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted while read
        for _ in range(4):
            yield b"y" * 1024

    async with listener.session.post(f"{listener.base}/payments", data=chunks(), headers=signed(b"")) as response:
        assert response.status == 413
    assert await listener.received() == []


async def test_hmac_sha256_verifies_a_github_style_signature(listener: Listener) -> None:
    subscription = listener.receive("github")
    try:
        waiting = asyncio.ensure_future(first(subscription))
        await asyncio.sleep(0.3)
        body = json.dumps({"ref": "refs/heads/main"}).encode()
        digest = hmac.new(GITHUB_SECRET.encode(), body, hashlib.sha256).hexdigest()
        status, _ = await listener.post("/github/pushes", body, {"X-Hub-Signature-256": f"sha256={digest}"})
        assert status == 200
        assert (await waiting).json() == {"ref": "refs/heads/main"}
        assert (await listener.post("/github/pushes", body, {"X-Hub-Signature-256": "sha256=00"}))[0] == 401
    finally:
        await subscription.close()


async def test_unknown_paths_are_404_and_receive_needs_a_dispatch_topic(listener: Listener) -> None:
    assert (await listener.post("/nowhere", b"{}", {}))[0] == 404
    status, _ = await listener.post("/quiet", b"{}", {})
    assert status == 200  # verify: none stores it; no topic to dispatch to
    with pytest.raises(FailedPreconditionError) as refused:
        await first(listener.receive("quiet"))
    assert refused.value.reason == "WEBHOOK_NOT_DISPATCHED"
    with pytest.raises(InvalidArgumentError) as missing:
        await first(listener.receive("payments", group=""))
    assert [v.field for v in missing.value.field_violations] == ["init.group"]


async def test_the_listener_stays_off_without_a_receive_path(start_server: ServerFactory) -> None:
    running = await start_server()
    http = running.app.components.webhook_http
    assert http is not None
    await http.ensure()
    assert http.port == 0


# -- the listener's HTTP, byte for byte ----------------------------------------------------------------------------


async def raw_exchange(listener: Listener, request: bytes, *, pause_after: int | None = None) -> bytes:
    """Send `request` on a new connection (in two writes when `pause_after` is given) and read until it closes."""
    http = listener.running.app.components.webhook_http
    assert http is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", http.port)
    try:
        if pause_after is None:
            writer.write(request)
        else:
            writer.write(request[:pause_after])
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.write(request[pause_after:])
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


def post_request(path: str, body: bytes, headers: dict[str, str], *extra: str) -> bytes:
    lines = [f"POST /webhooks/shop/dev{path} HTTP/1.1", "Host: x", f"Content-Length: {len(body)}", *extra]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def test_a_request_split_across_writes_and_one_expecting_100_continue_are_received(listener: Listener) -> None:
    body = json.dumps({"amount": 5}).encode()
    answer = await raw_exchange(listener, post_request("/payments", body, signed(body, "evt_split")), pause_after=40)
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n") and b'"id": "rcv_' in answer
    body = json.dumps({"amount": 6}).encode()
    request = post_request("/payments", body, signed(body, "evt_continue"), "Expect: 100-continue")
    answer = await raw_exchange(listener, request, pause_after=request.index(b"\r\n\r\n") + 4)
    assert answer.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n")
    assert len(await listener.received("payments")) == 2


async def test_other_methods_bad_requests_and_huge_heads_are_refused(listener: Listener) -> None:
    assert (await raw_exchange(listener, b"GET /webhooks/shop/dev/payments HTTP/1.1\r\nHost: x\r\n\r\n")).startswith(
        b"HTTP/1.1 405 "
    )
    assert (await raw_exchange(listener, b"POST /webhooks/shop HTTP/1.1\r\nHost: x\r\n\r\n")).startswith(
        b"HTTP/1.1 404 "
    )
    smuggled = b"POST /webhooks/shop/dev/quiet HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n{}"
    assert (await raw_exchange(listener, smuggled)).startswith(b"HTTP/1.1 400 ")
    huge = post_request("/quiet", b"{}", {"X-Big": "a" * 70_000})
    assert (await raw_exchange(listener, huge)).startswith(b"HTTP/1.1 400 ")
    assert await listener.received("quiet") == []
