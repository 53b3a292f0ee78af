"""ActionService.Run against real local HTTP upstreams: what the upstream received and what the caller got."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from aiohttp import web
from ductape.processor import (
    DeadlineExceededError,
    FailedPreconditionError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    UnavailableError,
)
from ductape.processor.v1 import action_pb2, action_pb2_grpc

from ductape_processor.runtime.templates.parser import _Compiler
from ductape_processor.store.postgres import PostgresStore
from ductape_processor.telemetry.logging import configure_logging
from tests.conftest import POSTGRES_DSN, Running, ServerFactory, require_tcp
from tests.upstream import Seen, Upstream, json_answer, redirect_answer, text_answer


def shop(base_url: str, **app_extra: Any) -> bytes:
    """A product whose `api` app points at the test upstream."""
    app: dict[str, Any] = {
        "tag": "api",
        "envs": {"dev": {"base_url": base_url}, "prd": {"base_url": base_url}},
        "constants": {"version": "v2"},
        "variables": {"dev": {"region": "local"}, "prd": {"region": "eu"}},
        "auths": [
            {"tag": "key", "type": "token", "headers": {"Authorization": "Bearer $Secret{API_KEY}"}},
            {
                "tag": "login",
                "type": "credential",
                "action": "token",
                "expiry": "1h",
                "input": {"body": {"user": "$Secret{API_USER}"}},
                "headers": {"Authorization": "Bearer $Response{body}{access_token}"},
            },
        ],
        "retry": {"max": 2, "initial": "10ms", "max_interval": "50ms"},
        "circuit_breaker": {"failures": 3, "cooldown": "300ms"},
        "timeout": "2s",
        "actions": [
            {
                "tag": "send",
                "method": "POST",
                "path": "/v2/templates/:template/send",
                "headers": {
                    "Authorization": "$Auth{key}{headers}{Authorization}",
                    "X-Region": "$Variable{api}{region}",
                },
                "query": {"lang": "$Input{query}{lang}", "v": "$Constant{api}{version}"},
                "body": {"to": "$Input{body}{email}", "count": "$Input{body}{count}", "tags": ["welcome"]},
                "input": {
                    "params": {"template": {"type": "string", "required": True}},
                    "query": {"lang": {"type": "string", "default": "en"}},
                    "body": {
                        "email": {"type": "email", "required": True},
                        "count": {"type": "integer", "required": True},
                    },
                },
            },
            {
                "tag": "user",
                "method": "GET",
                "path": "/users/:id",
                "input": {"params": {"id": {"type": "string", "required": True}}},
            },
            {"tag": "create", "method": "POST", "path": "/create", "input": {"body": {"name": {"type": "string"}}}},
            {
                "tag": "token",
                "method": "POST",
                "path": "/oauth/token",
                "input": {"body": {"user": {"type": "string", "required": True}}},
            },
            {
                "tag": "me",
                "method": "GET",
                "path": "/me",
                "headers": {"Authorization": "$Auth{login}{headers}{Authorization}"},
            },
            {"tag": "slow", "method": "GET", "path": "/slow", "timeout": "5s"},
        ],
        **app_extra,
    }
    document = {
        "product": "shop",
        "environments": [{"slug": "dev"}, {"slug": "prd", "name": "production"}],
        "apps": [app],
        "caches": [{"tag": "short", "ttl": "60s"}],
    }
    return json.dumps(document).encode()


@pytest.fixture
async def running(upstream: Upstream, start_server: ServerFactory, monkeypatch: pytest.MonkeyPatch) -> Running:
    monkeypatch.setenv("PROCESSOR_SECRET_API_KEY", "sk-very-secret")
    monkeypatch.setenv("PROCESSOR_SECRET_API_USER", "robot")
    server = await start_server(execution_flush_s=0.05)
    await server.client.product.apply(shop(upstream.url))
    return server


async def run(server: Running, event: str, **kwargs: Any):  # type: ignore[no-untyped-def]
    return await server.client.action.run(product="shop", env="dev", app="api", event=event, **kwargs)


SEND_INPUT = {"params": {"template": "welcome"}, "body": {"email": "ada@example.com", "count": 3}}


async def test_renders_path_query_body_and_headers(running: Running, upstream: Upstream) -> None:
    upstream.on("POST /v2/templates/welcome/send", lambda r: json_answer({"id": "m-1"}, status=202))
    result = await run(running, "send", input=SEND_INPUT)
    assert result.status_code == 202 and result.body == {"id": "m-1"}
    assert result.attempts == 1 and not result.cached and result.version == 1 and result.process_id
    [seen] = upstream.hits("/v2/templates/welcome/send")
    assert seen.method == "POST"
    assert seen.query == {"lang": ["en"], "v": ["v2"]}, "defaults apply, constants render"
    assert json.loads(seen.body) == {"to": "ada@example.com", "count": 3, "tags": ["welcome"]}, "a number stays one"
    assert seen.headers["Authorization"] == "Bearer sk-very-secret"
    assert seen.headers["X-Region"] == "local"
    assert seen.headers["Content-Type"] == "application/json"


async def test_calls_run_the_plan_compiled_when_the_manifest_was_applied(
    running: Running, upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    def compiling(*args: Any) -> None:
        raise AssertionError("a call compiled a template: the plan is compiled when the manifest is applied")

    monkeypatch.setattr(_Compiler, "value", compiling)
    upstream.on("POST /v2/templates/welcome/send", lambda r: json_answer({"id": "m-1"}, status=202))
    upstream.on("POST /oauth/token", lambda r: json_answer({"access_token": "t-1"}))
    upstream.on("GET /me", lambda r: json_answer({"auth": r.headers["Authorization"]}))
    sent = await run(running, "send", input=SEND_INPUT)
    assert sent.status_code == 202 and sent.body == {"id": "m-1"}
    assert (await run(running, "me")).body == {"auth": "Bearer t-1"}, "the auths' templates are compiled too"
    [seen] = upstream.hits("/v2/templates/welcome/send")
    assert seen.headers["Authorization"] == "Bearer sk-very-secret"


async def test_the_environment_name_selects_its_variables(running: Running, upstream: Upstream) -> None:
    await running.client.action.run(product="shop", env="production", app="api", event="send", input=SEND_INPUT)
    assert upstream.seen[-1].headers["X-Region"] == "eu"


@pytest.mark.parametrize(
    ("request_type", "check"),
    [
        (
            "application/x-www-form-urlencoded",
            lambda s: s.body == b"name=Ada+L%26" and "urlencoded" in s.headers["Content-Type"],
        ),
        (
            "multipart/form-data",
            lambda s: (
                b'name="name"' in s.body and b"Ada L&" in s.body and "multipart/form-data" in s.headers["Content-Type"]
            ),
        ),
        ("application/json", lambda s: json.loads(s.body) == {"name": "Ada L&"}),
    ],
)
async def test_request_types(
    start_server: ServerFactory, upstream: Upstream, request_type: str, check: Callable[[Seen], bool]
) -> None:
    server = await start_server()
    document = json.loads(shop(upstream.url))
    for env in document["apps"][0]["envs"].values():
        env["request_type"] = request_type
    await server.client.product.apply(json.dumps(document).encode())
    await server.client.action.run(
        product="shop", env="dev", app="api", event="create", input={"body": {"name": "Ada L&"}}
    )
    assert check(upstream.hits("/create")[0])


async def test_xml_bodies_are_sent_astext_answer(start_server: ServerFactory, upstream: Upstream) -> None:
    server = await start_server()
    document = json.loads(shop(upstream.url))
    app = document["apps"][0]
    app["envs"] = {env: {"base_url": upstream.url, "request_type": "text/xml"} for env in ("dev", "prd")}
    app["actions"].append(
        {
            "tag": "soap",
            "method": "POST",
            "path": "/soap",
            "body": "<Get><Id>$Input{body}{id}</Id></Get>",
            "input": {"body": {"id": {"type": "integer", "required": True}}},
        }
    )
    await server.client.product.apply(json.dumps(document).encode())
    upstream.on("POST /soap", lambda r: text_answer("<Ok/>", "text/xml"))
    result = await server.client.action.run(
        product="shop", env="dev", app="api", event="soap", input={"body": {"id": 7}}
    )
    assert upstream.hits("/soap")[0].body == b"<Get><Id>7</Id></Get>"
    assert upstream.hits("/soap")[0].headers["Content-Type"].startswith("text/xml")
    assert result.body == b"<Ok/>" and result.content_type == "text/xml"


async def test_input_violations_are_listed_before_any_call(running: Running, upstream: Upstream) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        await run(running, "send", input={"body": {"email": "not-an-email", "count": "three"}})
    fields = {v.field for v in caught.value.field_violations}
    assert fields == {"input.params.template", "input.body.email", "input.body.count"}
    assert upstream.seen == []


async def test_falsy_values_are_values(running: Running, upstream: Upstream) -> None:
    await run(running, "send", input={"params": {"template": "t"}, "body": {"email": "a@b.co", "count": 0}})
    assert json.loads(upstream.seen[-1].body)["count"] == 0


async def test_input_can_never_change_the_host(running: Running, upstream: Upstream) -> None:
    for evil in ("../../admin", "x@evil.example", "http://evil.example/", "a/b?c=d#e", "%2e%2e%2f"):
        await run(running, "user", input={"params": {"id": evil}})
    paths = [s.raw_path for s in upstream.seen]
    assert all(p.startswith("/users/") and p.count("/") == 2 for p in paths), paths
    assert len(upstream.seen) == 5, "every request went to the app's own host"
    with pytest.raises(InvalidArgumentError):  # a dot-segment once decoded: refused (test_http_hardening.py)
        await run(running, "user", input={"params": {"id": "%2e%2e"}})


async def test_redirects_to_another_host_are_not_followed(running: Running, upstream: Upstream) -> None:
    upstream.on("GET /users/away", lambda r: redirect_answer("http://evil.example/steal"))
    upstream.on("GET /users/moved", lambda r: redirect_answer("/users/here"))
    away = await run(running, "user", input={"params": {"id": "away"}})
    assert away.status_code == 302 and away.headers["Location"] == "http://evil.example/steal"
    moved = await run(running, "user", input={"params": {"id": "moved"}})
    assert moved.status_code == 200 and upstream.hits("/users/here"), "same-host redirects are followed"


async def test_retries_503_then_succeeds(running: Running, upstream: Upstream) -> None:
    answers = iter([503, 503, 200])
    upstream.on("GET /users/1", lambda r: json_answer({}, status=next(answers)))
    result = await run(running, "user", input={"params": {"id": "1"}})
    assert result.status_code == 200 and result.attempts == 3
    assert len(upstream.hits("/users/1")) == 3


async def test_the_last_non_2xx_answer_is_returned_not_hidden(running: Running, upstream: Upstream) -> None:
    upstream.on("GET /users/1", lambda r: json_answer({"error": "down"}, status=503))
    result = await run(running, "user", input={"params": {"id": "1"}}, retries=1)
    assert result.status_code == 503 and result.body == {"error": "down"} and result.attempts == 2


async def test_retry_after_is_honoured(running: Running, upstream: Upstream) -> None:
    answers = iter([429, 200])
    upstream.on("GET /users/1", lambda r: json_answer({}, status=next(answers), headers={"Retry-After": "1"}))
    started = time.monotonic()
    result = await run(running, "user", input={"params": {"id": "1"}})
    assert result.status_code == 200 and time.monotonic() - started >= 1.0


async def test_post_is_not_retried_once_sent_unless_idempotent(running: Running, upstream: Upstream) -> None:
    answers = iter([503, 503, 201])
    upstream.on("POST /create", lambda r: json_answer({}, status=next(answers)))
    result = await run(running, "create", input={"body": {"name": "x"}})
    assert result.status_code == 503 and result.attempts == 1 and len(upstream.hits("/create")) == 1
    again = await run(running, "create", input={"body": {"name": "x"}}, idempotency_key="k-1")
    assert again.status_code == 201 and again.attempts == 2, "an idempotency key makes retries safe"
    assert len(upstream.hits("/create")) == 3


async def test_post_is_retried_when_nothing_reached_the_upstream(
    start_server: ServerFactory, upstream: Upstream
) -> None:
    server = await start_server()
    await server.client.product.apply(shop("http://127.0.0.1:9"))  # nothing listens on the discard port
    with pytest.raises(UnavailableError) as caught:
        await server.client.action.run(product="shop", env="dev", app="api", event="create", input={"body": {}})
    assert caught.value.reason == "UPSTREAM_UNREACHABLE"
    executions = await server.client.logs.list_executions(product="shop")
    assert executions.executions[0].attempts == 3, "connection refused: safe to retry a POST"


async def test_circuit_opens_and_recovers(running: Running, upstream: Upstream) -> None:
    healthy = False
    upstream.on("GET /users/1", lambda r: json_answer({}, status=200 if healthy else 500))
    for _ in range(3):
        await run(running, "user", input={"params": {"id": "1"}}, retries=0)
    calls = len(upstream.seen)
    with pytest.raises(UnavailableError) as caught:
        await run(running, "user", input={"params": {"id": "1"}}, retries=0)
    assert caught.value.reason == "CIRCUIT_OPEN" and len(upstream.seen) == calls
    await asyncio.sleep(0.35)
    healthy = True
    assert (await run(running, "user", input={"params": {"id": "1"}})).status_code == 200, "the probe went through"
    assert (await run(running, "user", input={"params": {"id": "1"}})).status_code == 200


async def test_cache_hit_skips_the_upstream(running: Running, upstream: Upstream) -> None:
    upstream.on("GET /users/1", lambda r: json_answer({"name": "Ada"}))
    first = await run(running, "user", input={"params": {"id": "1"}}, cache="short")
    second = await run(running, "user", input={"params": {"id": "1"}}, cache="short")
    assert not first.cached and second.cached and second.attempts == 0
    assert second.body == {"name": "Ada"} and len(upstream.hits("/users/1")) == 1
    other = await run(running, "user", input={"params": {"id": "2"}}, cache="short")
    assert not other.cached, "another input is another entry"
    with pytest.raises(NotFoundError) as caught:
        await run(running, "user", input={"params": {"id": "1"}}, cache="nope")
    assert caught.value.reason == "CACHE_NOT_FOUND"


async def test_a_json_answer_holding_a_lone_surrogate_is_returned_as_bytes(
    running: Running, upstream: Upstream
) -> None:
    body = b'{"name": "\\ud800"}'  # valid JSON, but no UTF-8 string can carry the character it escapes
    upstream.on("GET /users/1", lambda r: web.Response(body=body, content_type="application/json"))
    result = await run(running, "user", input={"params": {"id": "1"}})
    assert result.status_code == 200 and result.body == body


@pytest.mark.parametrize("body", [b'{"n": ' + b"9" * 400 + b"}", b'{"n": NaN}', b'{"n": 1e999}'])
async def test_a_json_answer_holding_a_number_no_double_holds_is_returned_as_bytes(
    running: Running, upstream: Upstream, body: bytes
) -> None:
    # Python's parser takes each (an integer past a double's range made the call INTERNAL; NaN and Infinity, which
    # are not JSON, came back as a Value no JSON encoder writes back).
    upstream.on("GET /users/1", lambda r: web.Response(body=body, content_type="application/json"))
    result = await run(running, "user", input={"params": {"id": "1"}})
    assert result.status_code == 200 and result.body == body


async def test_only_2xx_results_are_cached(running: Running, upstream: Upstream) -> None:
    upstream.on("GET /users/1", lambda r: json_answer({}, status=404))
    await run(running, "user", input={"params": {"id": "1"}}, cache="short")
    assert not (await run(running, "user", input={"params": {"id": "1"}}, cache="short")).cached


async def test_idempotency_replays_the_first_result(running: Running, upstream: Upstream) -> None:
    counter = iter(range(100))
    upstream.on("POST /create", lambda r: json_answer({"n": next(counter)}, status=201))
    first = await run(running, "create", input={"body": {"name": "x"}}, idempotency_key="order-1")
    second = await run(running, "create", input={"body": {"name": "x"}}, idempotency_key="order-1")
    assert first.body == second.body == {"n": 0} and second.attempts == 0
    assert len(upstream.hits("/create")) == 1
    with pytest.raises(FailedPreconditionError) as caught:
        await run(running, "create", input={"body": {"name": "y"}}, idempotency_key="order-1")
    assert caught.value.reason == "IDEMPOTENCY_KEY_REUSED"


async def test_concurrent_calls_with_one_key_make_one_upstream_call(running: Running, upstream: Upstream) -> None:
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(0.2)
        return json_answer({"ok": True}, status=201)

    upstream.on("POST /create", slow)
    results = await asyncio.gather(
        *(run(running, "create", input={"body": {"name": "x"}}, idempotency_key="same") for _ in range(5))
    )
    assert {r.status_code for r in results} == {201}
    assert len(upstream.hits("/create")) == 1


async def test_a_deadline_shorter_than_the_timeout_wins(running: Running, upstream: Upstream) -> None:
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(3)
        return json_answer({})

    upstream.on("GET /slow", slow)
    started = time.monotonic()
    with pytest.raises(DeadlineExceededError):
        await running.client.action.run(product="shop", env="dev", app="api", event="slow", timeout=0.5)
    assert time.monotonic() - started < 1.5


async def test_an_upstream_timeout_is_deadline_exceeded(running: Running, upstream: Upstream) -> None:
    document = json.loads(shop(upstream.url))
    document["apps"][0]["actions"][-1]["timeout"] = "200ms"
    document["apps"][0]["retry"]["on"] = ["503"]
    await running.client.product.apply(json.dumps(document).encode())

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(1)
        return json_answer({})

    upstream.on("GET /slow", slow)
    with pytest.raises(DeadlineExceededError) as caught:
        await run(running, "slow")
    assert caught.value.reason == "UPSTREAM_TIMEOUT"


async def test_an_oversized_response_is_refused(start_server: ServerFactory, upstream: Upstream) -> None:
    server = await start_server(max_upstream_response_bytes=64 * 1024)
    await server.client.product.apply(shop(upstream.url))
    upstream.on("GET /users/big", lambda r: text_answer("x" * (200 * 1024), "text/plain"))
    with pytest.raises(ResourceExhaustedError) as caught:
        await server.client.action.run(
            product="shop", env="dev", app="api", event="user", input={"params": {"id": "big"}}
        )
    assert caught.value.reason == "UPSTREAM_RESPONSE_TOO_LARGE"


async def test_credential_auth_is_minted_once_and_reused(running: Running, upstream: Upstream) -> None:
    tokens = iter(["t-1", "t-2", "t-3"])
    upstream.on("POST /oauth/token", lambda r: json_answer({"access_token": next(tokens)}))
    upstream.on("GET /me", lambda r: json_answer({"auth": r.headers["Authorization"]}))
    results = await asyncio.gather(*(run(running, "me") for _ in range(5)))
    assert {r.body["auth"] for r in results} == {"Bearer t-1"}
    [login] = upstream.hits("/oauth/token")
    assert json.loads(login.body) == {"user": "robot"}


async def test_credential_auth_is_reminted_on_401(running: Running, upstream: Upstream) -> None:
    tokens = iter(["t-1", "t-2"])
    upstream.on("POST /oauth/token", lambda r: json_answer({"access_token": next(tokens)}))
    upstream.on(
        "GET /me",
        lambda r: (
            json_answer({}, status=401) if r.headers["Authorization"] == "Bearer t-1" else json_answer({"ok": True})
        ),
    )
    result = await run(running, "me")
    assert result.status_code == 200 and result.attempts == 2
    assert len(upstream.hits("/oauth/token")) == 2


async def test_credential_auth_is_reminted_after_expiry(running: Running, upstream: Upstream) -> None:
    document = json.loads(shop(upstream.url))
    document["apps"][0]["auths"][1]["expiry"] = "300ms"
    await running.client.product.apply(json.dumps(document).encode())
    tokens = iter(["t-1", "t-2"])
    upstream.on("POST /oauth/token", lambda r: json_answer({"access_token": next(tokens)}))
    upstream.on("GET /me", lambda r: json_answer({"auth": r.headers["Authorization"]}))
    assert (await run(running, "me")).body == {"auth": "Bearer t-1"}
    assert (await run(running, "me")).body == {"auth": "Bearer t-1"}
    await asyncio.sleep(0.4)
    assert (await run(running, "me")).body == {"auth": "Bearer t-2"}


async def test_failed_login_is_a_clear_error(running: Running, upstream: Upstream) -> None:
    upstream.on("POST /oauth/token", lambda r: json_answer({"error": "bad user"}, status=403))
    with pytest.raises(FailedPreconditionError) as caught:
        await run(running, "me")
    assert caught.value.reason == "UPSTREAM_AUTH_FAILED" and caught.value.metadata["upstream_status"] == "403"


async def test_the_trace_context_reaches_the_upstream(running: Running, upstream: Upstream) -> None:
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    async with grpc.aio.insecure_channel(running.address) as channel:
        stub = action_pb2_grpc.ActionServiceStub(channel)
        await stub.Run(
            action_pb2.RunRequest(product="shop", env="dev", app="api", event="user", input={"params": {"id": "1"}}),
            metadata=(("traceparent", traceparent),),
        )
    assert upstream.seen[-1].headers["traceparent"].split("-")[1] == "0af7651916cd43dd8448eb211c80319c"


async def test_executions_are_recorded_with_secrets_redacted(running: Running, upstream: Upstream) -> None:
    stream = io.StringIO()
    handler = configure_logging("DEBUG", "json", stream)
    try:
        upstream.on("GET /users/2", lambda r: json_answer({}, status=404))
        ok = await run(running, "send", input=SEND_INPUT)
        await run(running, "user", input={"params": {"id": "2"}})
        with pytest.raises(InvalidArgumentError):
            await run(running, "send", input={"body": {}})
    finally:
        logging.getLogger().removeHandler(handler)
    listed = await running.client.logs.list_executions(product="shop")
    records = listed.executions
    assert [r.resource for r in records] == ["api:send", "api:user", "api:send"]
    assert [r.status for r in records] == [2, 2, 1]
    assert records[0].error_reason == "INVALID_INPUT"
    assert records[1].upstream_status == 404 and records[1].error_reason == "UPSTREAM_STATUS"
    assert records[2].process_id == ok.process_id and records[2].attempts == 1 and records[2].env == "dev"
    assert "Authorization: [redacted]" in records[2].detail and "/v2/templates/welcome/send" in records[2].detail
    failed = await running.client.logs.list_executions(product="shop", status="fail", resource="api:user")
    assert [r.resource for r in failed.executions] == ["api:user"]
    paged = await running.client.logs.list_executions(product="shop", env="dev", page_size=2)
    assert len(paged.executions) == 2 and paged.next_page_token
    rest = await running.client.logs.list_executions(
        product="shop", env="dev", page_size=2, page_token=paged.next_page_token
    )
    assert [r.process_id for r in rest.executions] == [ok.process_id] and not rest.next_page_token
    with pytest.raises(InvalidArgumentError):
        await running.client.logs.list_executions(product="shop", page_token=paged.next_page_token)
    for text in (stream.getvalue(), str(listed)):
        assert "sk-very-secret" not in text


async def test_unknown_app_action_and_bad_requests(running: Running) -> None:
    with pytest.raises(NotFoundError) as caught:
        await running.client.action.run(product="shop", env="dev", app="nope", event="send")
    assert caught.value.reason == "APP_NOT_FOUND"
    with pytest.raises(NotFoundError) as caught:
        await running.client.action.run(product="shop", env="dev", app="api", event="nope")
    assert caught.value.reason == "ACTION_NOT_FOUND"
    with pytest.raises(InvalidArgumentError) as caught:
        await running.client.action.run(product="shop", env="", app="api", event="user")
    assert [v.field for v in caught.value.field_violations] == ["env"]
    with pytest.raises(InvalidArgumentError) as caught:
        await run(running, "user", input={"params": {"id": "1"}}, retries=99)
    assert [v.field for v in caught.value.field_violations] == ["retries"]


async def test_a_missing_secret_names_the_selector(start_server: ServerFactory, upstream: Upstream) -> None:
    server = await start_server()
    await server.client.product.apply(shop(upstream.url))
    with pytest.raises(InvalidArgumentError) as caught:
        await server.client.action.run(product="shop", env="dev", app="api", event="send", input=SEND_INPUT)
    assert caught.value.reason == "TEMPLATE_UNRESOLVED"
    assert "$Secret{API_KEY}" in caught.value.message
    assert upstream.seen == []


async def test_a_redis_cache_serves_hits_and_expires(start_server: ServerFactory, upstream: Upstream) -> None:
    await require_tcp("Redis", "127.0.0.1", 6379)
    server = await start_server()
    document = json.loads(shop(upstream.url))
    document["caches"] = [{"tag": "fast", "ttl": "400ms", "backend": "redis", "url": "redis://127.0.0.1:6379/0"}]
    await server.client.product.apply(json.dumps(document).encode())
    key = {"params": {"id": f"r-{time.time_ns()}"}}  # entries outlive a test run: a fresh input per run
    upstream.on(f"GET /users/{key['params']['id']}", lambda r: json_answer({"n": len(upstream.seen)}))
    first = await server.client.action.run(product="shop", env="dev", app="api", event="user", input=key, cache="fast")
    second = await server.client.action.run(product="shop", env="dev", app="api", event="user", input=key, cache="fast")
    assert second.cached and second.body == first.body
    await asyncio.sleep(0.5)
    third = await server.client.action.run(product="shop", env="dev", app="api", event="user", input=key, cache="fast")
    assert not third.cached and len(upstream.seen) == 2


async def test_a_redis_cache_url_resolves_the_secrets_it_contains(
    start_server: ServerFactory, upstream: Upstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    await require_tcp("Redis", "127.0.0.1", 6379)
    monkeypatch.setenv("PROCESSOR_SECRET_CACHE_DB", "0")
    server = await start_server()
    document = json.loads(shop(upstream.url))
    document["caches"] = [
        {"tag": "fast", "ttl": "5s", "backend": "redis", "url": "redis://127.0.0.1:6379/$Secret{CACHE_DB}"},
        {"tag": "unset", "ttl": "5s", "backend": "redis", "url": "redis://:$Secret{CACHE_NOPE}@127.0.0.1:6379/0"},
    ]
    await server.client.product.apply(json.dumps(document).encode())
    key = {"params": {"id": f"s-{time.time_ns()}"}}
    upstream.on(f"GET /users/{key['params']['id']}", lambda r: json_answer({"n": len(upstream.seen)}))
    await server.client.action.run(product="shop", env="dev", app="api", event="user", input=key, cache="fast")
    again = await server.client.action.run(product="shop", env="dev", app="api", event="user", input=key, cache="fast")
    assert again.cached and len(upstream.seen) == 1
    with pytest.raises(InvalidArgumentError) as caught:
        await server.client.action.run(product="shop", env="dev", app="api", event="user", input=key, cache="unset")
    assert caught.value.reason == "SECRET_NOT_FOUND" and "$Secret{CACHE_NOPE}" in caught.value.message


async def test_one_idempotency_key_makes_one_call_across_replicas(
    start_server: ServerFactory, upstream: Upstream, pg_schema: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = await start_server(store=PostgresStore(POSTGRES_DSN, pg_schema))
    b = await start_server(store=PostgresStore(POSTGRES_DSN, pg_schema))
    await a.client.product.apply(shop(upstream.url))

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(0.3)
        return json_answer({"order": 1}, status=201)

    upstream.on("POST /create", slow)
    calls = [
        replica.client.action.run(
            product="shop", env="dev", app="api", event="create", input={"body": {"name": "x"}}, idempotency_key="o-9"
        )
        for replica in (a, b, a, b)
    ]
    results = await asyncio.gather(*calls)
    assert {r.status_code for r in results} == {201}
    assert len(upstream.hits("/create")) == 1, "one upstream call for four calls on two replicas"
