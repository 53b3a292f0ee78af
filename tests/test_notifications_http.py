"""Push, SMS and callbacks through the processor, each provider against a local HTTP server that checks the request
its public API documents (URL, auth header, body fields, the JWTs' signatures, Web Push's encryption), retries on
429/5xx, and one channel down while the others succeed."""

from __future__ import annotations

import base64
import json
import os
import socket
from typing import Any
from urllib.parse import parse_qs

import http_ece
import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tests.conftest import Running, ServerFactory
from tests.upstream import Upstream, json_answer

PRODUCT = "alerts"
WELCOME = {
    "tag": "welcome",
    "push": {"title": "Hi {{name}}", "body": "Welcome, {{name}}", "data": {"kind": "welcome"}},
    "sms": {"body": "Hi {{name}}, welcome"},
    "callback": {"body": {"event": "welcome", "user": "{{name}}"}},
}
VARS = {"name": "Zoë"}


def manifest(**channels: Any) -> bytes:
    env = {"push": {"provider": "log"}, "sms": {"provider": "log"}, "callback": {"provider": "log"}, **channels}
    document = {
        "product": PRODUCT,
        "environments": [{"slug": "dev"}],
        "notifications": [{"tag": "users", "envs": {"dev": env}, "messages": [WELCOME]}],
    }
    return json.dumps(document).encode()


async def started(start_server: ServerFactory, **channels: Any) -> Running:
    server = await start_server()
    await server.client.product.apply(manifest(**channels))
    return server


WHERE = {"product": PRODUCT, "env": "dev", "event": "users:welcome"}
SMS = {"to": ["+447700900123"], "variables": VARS}


def _basic(header: str) -> tuple[str, str]:
    scheme, _, value = header.partition(" ")
    assert scheme == "Basic"
    user, _, password = base64.b64decode(value).decode().partition(":")
    return user, password


# -- SMS --------------------------------------------------------------------------------------------------------------


async def test_twilio_gets_its_documented_request(
    start_server: ServerFactory, upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PROCESSOR_SECRET_TWILIO_TOKEN", "tw-token-1")
    path = "/2010-04-01/Accounts/AC123/Messages.json"
    upstream.on(f"POST {path}", lambda _: json_answer({"sid": "SM42", "status": "queued"}, 201))
    settings = {"provider": "twilio", "account_sid": "AC123", "auth_token": "$Secret{TWILIO_TOKEN}"}
    server = await started(start_server, sms={**settings, "sender": "+15005550006", "endpoint": upstream.url})
    sent = await server.client.notification.send(**WHERE, sms=SMS)
    assert sent.results[0].success and sent.results[0].message_ids == ["SM42"], sent.results
    [seen] = upstream.hits(path)
    assert _basic(seen.headers["Authorization"]) == ("AC123", "tw-token-1")
    assert seen.headers["Content-Type"] == "application/x-www-form-urlencoded"
    form = parse_qs(seen.body.decode())
    assert form == {"To": ["+447700900123"], "From": ["+15005550006"], "Body": ["Hi Zoë, welcome"]}


async def test_vonage_gets_its_documented_request(start_server: ServerFactory, upstream: Upstream) -> None:
    answer = {"message-count": "1", "messages": [{"to": "447700900123", "message-id": "V-1", "status": "0"}]}
    upstream.on("POST /sms/json", lambda _: json_answer(answer))
    settings = {"provider": "vonage", "api_key": "k1", "api_secret": "s1", "sender": "Shop", "endpoint": upstream.url}
    server = await started(start_server, sms=settings)
    sent = await server.client.notification.send(**WHERE, sms=SMS)
    assert sent.results[0].message_ids == ["V-1"]
    [seen] = upstream.hits("/sms/json")
    body = json.loads(seen.body)
    assert body == {
        "api_key": "k1",
        "api_secret": "s1",
        "from": "Shop",
        "to": "447700900123",
        "text": "Hi Zoë, welcome",
        "type": "unicode",
    }


async def test_vonage_refusing_in_a_200_is_a_failed_channel(start_server: ServerFactory, upstream: Upstream) -> None:
    answer = {"message-count": "1", "messages": [{"status": "6", "error-text": "Unroutable message"}]}
    upstream.on("POST /sms/json", lambda _: json_answer(answer))
    settings = {"provider": "vonage", "api_key": "k1", "api_secret": "s1", "sender": "Shop", "endpoint": upstream.url}
    server = await started(start_server, sms=settings)
    result = (await server.client.notification.send(**WHERE, sms=SMS)).results[0]
    assert not result.success and result.error_reason == "NOTIFICATION_REJECTED" and result.attempts == 1
    assert "Unroutable" in result.error_message


async def test_plivo_gets_its_documented_request(start_server: ServerFactory, upstream: Upstream) -> None:
    path = "/v1/Account/MA77/Message/"
    upstream.on(f"POST {path}", lambda _: json_answer({"message_uuid": ["P-9"], "api_id": "a"}, 202))
    settings = {"provider": "plivo", "auth_id": "MA77", "auth_token": "pl-tok", "sender": "+15005550006"}
    server = await started(start_server, sms={**settings, "endpoint": upstream.url})
    sent = await server.client.notification.send(
        **WHERE, sms={"to": ["+447700900123", "+447700900124"], "variables": VARS}
    )
    assert sent.results[0].message_ids == ["P-9", "P-9"]
    seen = upstream.hits(path)
    assert [json.loads(s.body)["dst"] for s in sorted(seen, key=lambda s: s.body)] == ["+447700900123", "+447700900124"]
    assert _basic(seen[0].headers["Authorization"]) == ("MA77", "pl-tok")
    assert json.loads(seen[0].body) | {"dst": ""} == {"src": "+15005550006", "dst": "", "text": "Hi Zoë, welcome"}


@pytest.mark.parametrize("status", [503, 429])
async def test_a_busy_provider_is_retried(start_server: ServerFactory, upstream: Upstream, status: int) -> None:
    answers = [json_answer({"message": "busy"}, status, {"Retry-After": "0"}), json_answer({"sid": "SM2"}, 201)]
    path = "/2010-04-01/Accounts/AC1/Messages.json"
    upstream.on(f"POST {path}", lambda _: answers.pop(0))
    settings = {"provider": "twilio", "account_sid": "AC1", "auth_token": "t", "sender": "+1", "endpoint": upstream.url}
    server = await started(start_server, sms=settings)
    result = (await server.client.notification.send(**WHERE, sms=SMS)).results[0]
    assert result.success and result.attempts == 2 and result.message_ids == ["SM2"]
    assert len(upstream.hits(path)) == 2


async def test_a_refused_message_is_not_retried(start_server: ServerFactory, upstream: Upstream) -> None:
    path = "/2010-04-01/Accounts/AC1/Messages.json"
    upstream.on(f"POST {path}", lambda _: json_answer({"code": 21211, "message": "Invalid 'To'"}, 400))
    settings = {"provider": "twilio", "account_sid": "AC1", "auth_token": "t", "sender": "+1", "endpoint": upstream.url}
    server = await started(start_server, sms=settings)
    result = (await server.client.notification.send(**WHERE, sms=SMS)).results[0]
    assert not result.success and result.error_reason == "NOTIFICATION_REJECTED" and result.attempts == 1
    assert "21211" in result.error_message and len(upstream.hits(path)) == 1


# -- push -------------------------------------------------------------------------------------------------------------


async def test_fcm_mints_a_service_account_token_once_and_sends_v1_messages(
    start_server: ServerFactory, upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    token_uri = f"{upstream.url}/token"
    account = {"type": "service_account", "client_email": "push@proj-1.iam.example", "private_key": pem.decode()}
    monkeypatch.setenv("PROCESSOR_SECRET_FCM_KEY", json.dumps({**account, "token_uri": token_uri}))
    assertions: list[dict[str, Any]] = []

    async def token(request: web.Request) -> web.Response:
        form = parse_qs((await request.read()).decode())
        assert form["grant_type"] == ["urn:ietf:params:oauth:grant-type:jwt-bearer"]
        claims = jwt.decode(form["assertion"][0], key.public_key(), algorithms=["RS256"], audience=token_uri)
        assertions.append(claims)
        return json_answer({"access_token": "ya29.test", "expires_in": 3599, "token_type": "Bearer"})

    upstream.on("POST /token", token)
    path = "/v1/projects/proj-1/messages:send"
    upstream.on(f"POST {path}", lambda _: json_answer({"name": "projects/proj-1/messages/0:1"}))
    settings = {"provider": "fcm", "project_id": "proj-1", "credentials": "$Secret{FCM_KEY}", "endpoint": upstream.url}
    server = await started(start_server, push=settings)
    push = {"device_tokens": ["dev-a", "dev-b"], "variables": VARS, "data": {"order": 7}}
    sent = await server.client.notification.send(**WHERE, push=push)
    again = await server.client.notification.send(**WHERE, push=push)
    assert sent.results[0].message_ids == ["projects/proj-1/messages/0:1"] * 2 and again.results[0].success
    assert len(assertions) == 1, "the access token is minted once and reused"
    assert assertions[0]["iss"] == "push@proj-1.iam.example"
    assert assertions[0]["scope"] == "https://www.googleapis.com/auth/firebase.messaging"
    assert assertions[0]["exp"] - assertions[0]["iat"] == 3600
    seen = upstream.hits(path)
    assert len(seen) == 4 and all(s.headers["Authorization"] == "Bearer ya29.test" for s in seen)
    message = json.loads(seen[0].body)["message"]
    assert message["token"] in ("dev-a", "dev-b")
    assert message["notification"] == {"title": "Hi Zoë", "body": "Welcome, Zoë"}
    assert message["data"] == {"kind": "welcome", "order": "7"}


async def test_expo_gets_its_documented_request(start_server: ServerFactory, upstream: Upstream) -> None:
    path = "/--/api/v2/push/send"
    upstream.on(f"POST {path}", lambda _: json_answer({"data": {"status": "ok", "id": "XXXX-1"}}))
    settings = {"provider": "expo", "access_token": "expo-tok", "endpoint": upstream.url}
    server = await started(start_server, push=settings)
    token = "ExponentPushToken[xxxxxxxxxxxxxxxxxxxxxx]"
    sent = await server.client.notification.send(**WHERE, push={"device_tokens": [token], "variables": VARS})
    assert sent.results[0].message_ids == ["XXXX-1"]
    [seen] = upstream.hits(path)
    assert seen.headers["Authorization"] == "Bearer expo-tok"
    assert json.loads(seen.body) == {
        "to": token,
        "title": "Hi Zoë",
        "body": "Welcome, Zoë",
        "data": {"kind": "welcome"},
    }


async def test_an_expo_error_ticket_is_a_refused_notification(start_server: ServerFactory, upstream: Upstream) -> None:
    ticket = {"status": "error", "message": "not registered", "details": {"error": "DeviceNotRegistered"}}
    upstream.on("POST /--/api/v2/push/send", lambda _: json_answer({"data": ticket}))
    server = await started(start_server, push={"provider": "expo", "endpoint": upstream.url})
    sent = await server.client.notification.send(**WHERE, push={"device_tokens": ["t"], "variables": VARS})
    result = sent.results[0]
    assert not result.success and result.error_reason == "NOTIFICATION_REJECTED"
    assert "DeviceNotRegistered" in result.error_message


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


async def test_web_push_is_encrypted_for_the_subscription_and_signed_with_vapid(
    start_server: ServerFactory, upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    vapid = ec.generate_private_key(ec.SECP256R1())
    vapid_pem = vapid.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    monkeypatch.setenv("PROCESSOR_SECRET_VAPID_KEY", vapid_pem.decode())
    receiver = ec.generate_private_key(ec.SECP256R1())
    receiver_public = receiver.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    auth = os.urandom(16)
    subscription = {
        "endpoint": f"{upstream.url}/push/sub-1",
        "keys": {"p256dh": _b64url(receiver_public), "auth": _b64url(auth)},
    }
    upstream.on("POST /push/sub-1", lambda _: web.Response(status=201, headers={"Location": "/m/77"}))
    settings = {
        "provider": "webpush",
        "vapid_private_key": "$Secret{VAPID_KEY}",
        "vapid_subject": "mailto:ops@shop.example.com",
        "ttl": "1h",
    }
    server = await started(start_server, push=settings)
    push = {"device_tokens": [json.dumps(subscription)], "variables": VARS}
    sent = await server.client.notification.send(**WHERE, push=push)
    assert sent.results[0].success and sent.results[0].message_ids == ["/m/77"], sent.results
    [seen] = upstream.hits("/push/sub-1")
    assert seen.headers["Content-Encoding"] == "aes128gcm" and seen.headers["TTL"] == "3600"
    payload = http_ece.decrypt(seen.body, private_key=receiver, auth_secret=auth, version="aes128gcm")
    assert json.loads(payload) == {"title": "Hi Zoë", "body": "Welcome, Zoë", "data": {"kind": "welcome"}}
    scheme, _, parameters = seen.headers["Authorization"].partition(" ")
    fields = dict(part.strip().split("=", 1) for part in parameters.split(","))
    vapid_public = vapid.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    assert scheme == "vapid" and fields["k"] == _b64url(vapid_public)
    claims = jwt.decode(fields["t"], vapid.public_key(), algorithms=["ES256"], audience=upstream.url)
    assert claims["sub"] == "mailto:ops@shop.example.com"


async def test_web_push_to_an_endpoint_outside_the_push_services_is_refused(
    start_server: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    vapid = _b64url(ec.generate_private_key(ec.SECP256R1()).private_numbers().private_value.to_bytes(32, "big"))
    monkeypatch.setenv("PROCESSOR_SECRET_VAPID_KEY", vapid)
    settings = {"provider": "webpush", "vapid_private_key": "$Secret{VAPID_KEY}", "vapid_subject": "mailto:a@b.co"}
    server = await started(start_server, push=settings)
    subscription = {
        "endpoint": "https://internal.example.com/admin",
        "keys": {"p256dh": _b64url(b"\4" + b"1" * 64), "auth": _b64url(b"2" * 16)},
    }
    sent = await server.client.notification.send(
        **WHERE, push={"device_tokens": [json.dumps(subscription)], "variables": VARS}
    )
    result = sent.results[0]
    assert (
        not result.success
        and result.error_reason == "NOTIFICATION_REJECTED"
        and "push_services" in result.error_message
    )


# -- callbacks and channels together ----------------------------------------------------------------------------------


async def test_a_callback_goes_through_the_http_client_with_its_params_query_headers_and_auth(
    start_server: ServerFactory, upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PROCESSOR_SECRET_HOOK_TOKEN", "hook-secret")
    upstream.on("POST /hooks/u 1/events", lambda _: json_answer({}, 202, {"X-Request-Id": "req-5"}))
    settings = {
        "url": f"{upstream.url}/hooks/:user/events?v=2",
        "headers": {"X-Source": "processor"},
        "auth": {"type": "bearer", "token": "$Secret{HOOK_TOKEN}"},
    }
    server = await started(start_server, callback=settings)
    callback = {
        "params": {"user": "u 1"},
        "query": {"src": "signup"},
        "headers": {"X-Trace": "t-1", "Authorization": "Bearer forged"},
        "body": {"extra": True},
        "variables": VARS,
    }
    sent = await server.client.notification.send(**WHERE, callback=callback)
    assert sent.results[0].success and sent.results[0].message_ids == ["req-5"], sent.results
    [seen] = upstream.seen
    assert seen.raw_path.startswith("/hooks/u%201/events") and seen.query == {"v": ["2"], "src": ["signup"]}
    assert seen.headers["Authorization"] == "Bearer hook-secret", "a caller cannot replace the configured auth"
    assert seen.headers["X-Source"] == "processor" and seen.headers["X-Trace"] == "t-1"
    assert json.loads(seen.body) == {"event": "welcome", "user": "Zoë", "extra": True}


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_one_channel_down_while_the_others_succeed(start_server: ServerFactory, upstream: Upstream) -> None:
    upstream.on("POST /--/api/v2/push/send", lambda _: json_answer({"data": {"status": "ok", "id": "E-1"}}))
    down = f"http://127.0.0.1:{_closed_port()}"
    server = await started(
        start_server,
        push={"provider": "expo", "endpoint": upstream.url},
        sms={"provider": "twilio", "account_sid": "AC1", "auth_token": "t", "sender": "+1", "endpoint": down},
        callback={"url": f"{upstream.url}/hook"},
    )
    sent = await server.client.notification.send(
        **WHERE,
        push={"device_tokens": ["t"], "variables": VARS},
        sms=SMS,
        callback={"variables": VARS},
        retries=1,
    )
    push, sms, callback = sent.results
    assert push.success and callback.success
    assert not sms.success and sms.error_reason == "UPSTREAM_UNREACHABLE" and sms.attempts == 2
    page = await server.client.logs.list_executions(product=PRODUCT)
    [record] = page.executions
    assert record.error_reason == "UPSTREAM_UNREACHABLE"
    assert json.loads(record.detail)["push"]["success"] is True


async def test_fcm_mints_a_new_token_once_when_fcm_answers_401(
    start_server: ServerFactory, upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    account = {"client_email": "push@proj-1.iam.example", "private_key": pem.decode(), "token_uri": f"{upstream.url}/t"}
    monkeypatch.setenv("PROCESSOR_SECRET_FCM_KEY", json.dumps(account))
    issued = iter(["token-1", "token-2"])
    upstream.on("POST /t", lambda _: json_answer({"access_token": next(issued), "expires_in": 3600}))

    def send(request: web.Request) -> web.Response:
        if request.headers["Authorization"] == "Bearer token-1":
            return json_answer({"error": {"status": "UNAUTHENTICATED"}}, 401)
        return json_answer({"name": "projects/proj-1/messages/2"})

    path = "/v1/projects/proj-1/messages:send"
    upstream.on(f"POST {path}", send)
    settings = {"provider": "fcm", "project_id": "proj-1", "credentials": "$Secret{FCM_KEY}", "endpoint": upstream.url}
    server = await started(start_server, push=settings)
    sent = await server.client.notification.send(**WHERE, push={"device_tokens": ["dev-a"], "variables": VARS})
    result = sent.results[0]
    assert result.success and result.attempts == 1 and result.message_ids == ["projects/proj-1/messages/2"]
    assert [s.headers["Authorization"] for s in upstream.hits(path)] == ["Bearer token-1", "Bearer token-2"]
    assert len(upstream.hits("/t")) == 2
