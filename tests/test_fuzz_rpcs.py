"""Property: no request and no upstream answer makes the processor answer INTERNAL or UNKNOWN, or stop serving.

Every RPC of every service is driven through a real server with requests built from the protos' own descriptors
(so a new RPC or field is fuzzed without touching this file): well-typed values biased towards the names the test
product uses, and ill-typed ones (control characters, huge and negative numbers, out-of-range timestamps, Structs
nested past protobuf's limit, unknown enum values, random bytes as the whole request). Actions call a real raw-socket
upstream whose status line, headers (non-UTF-8 bytes included), framing, encoding and body (deep or huge JSON, wrong
content types) the strategy chooses. After every example the health service must still answer SERVING.

HYPOTHESIS_PROFILE=long runs many more examples with a random seed; the default is a fixed seed and a bounded run.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sys
import threading
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from ductape.processor import Processor
from ductape.processor.v1 import (
    action_pb2,
    broker_pb2,
    database_pb2,
    feature_pb2,
    feature_pb2_grpc,
    job_pb2,
    job_pb2_grpc,
    log_pb2,
    migration_pb2,
    migration_pb2_grpc,
    notification_pb2,
    product_pb2,
    session_pb2,
    storage_pb2,
    webhook_pb2,
    webhook_pb2_grpc,
)
from google.protobuf import descriptor as pb_descriptor
from google.protobuf import message_factory, struct_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from ductape_processor.runtime.sessions import new_root_key
from tests.conftest import ROOT
from tests.test_error_reasons import documented_statuses

FieldDescriptor = pb_descriptor.FieldDescriptor

PROFILES = {
    # Fixed examples (derandomize) so CI is never flaky; about 20-40 s on a loaded 2-core machine.
    "default": settings(
        max_examples=int(os.environ.get("FUZZ_EXAMPLES", "80")),
        derandomize=True,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.explicit, Phase.generate],  # a failure is reported as found: shrinking a round takes minutes
    ),
    "long": settings(max_examples=5000, deadline=None, suppress_health_check=list(HealthCheck)),
}
PROFILE = PROFILES.get(os.environ.get("HYPOTHESIS_PROFILE", "default"), PROFILES["default"])

STATS: Counter[tuple[str, str]] = Counter()  # (method, status) seen, printed at the end (pytest -s) to judge coverage
BAD_CODES = frozenset({grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN})
DOCUMENTED = documented_statuses()
"""The (code, reason) pairs of docs/api.md's error table: every error a caller gets is one of them."""
CALL_TIMEOUT_S = 5.0
SUBSCRIBE_WINDOW_S = 0.2


def manifest(base_url: str) -> dict[str, Any]:
    """The product every request aims at: actions of each request type, a session type, a broker, a cache."""
    envs = {"dev": {"base_url": base_url}, "prd": {"base_url": base_url}}
    body = {"name": {"type": "string"}, "n": {"type": "integer"}, "deep": {"type": "object"}}

    def app(tag: str, request_type: str) -> dict[str, Any]:
        return {
            "tag": tag,
            "envs": {env: {**value, "request_type": request_type} for env, value in envs.items()},
            "retry": {"max": 1, "initial": "1ms", "max_interval": "2ms", "on": ["503", "network"]},
            "timeout": "1s",
            "actions": [
                {"tag": "get", "method": "GET", "path": "/items/:id", "input": {"params": {"id": {"type": "string"}}}},
                {
                    "tag": "post",
                    "method": "POST",
                    "path": "/items",
                    "headers": {"X-User": "$Session{userId}"},
                    "input": {"body": body, "headers": {"X-Trace": {"type": "string"}}},
                },
                {"tag": "raw", "method": "PUT", "path": "/raw/:id", "input": {"params": {"id": {"type": "string"}}}},
            ],
        }

    return {
        "product": "fz",
        "environments": [{"slug": "dev", "name": "development", "allow_private_endpoints": True}, {"slug": "prd"}],
        "apps": [
            app("api", "application/json"),
            app("form", "application/x-www-form-urlencoded"),
            app("multi", "multipart/form-data"),
            app("xml", "application/xml"),
        ],
        "sessions": [
            {"tag": "user", "schema": {"userId": {"type": "string", "required": True}}, "selector": "$Session{userId}"}
        ],
        "brokers": [
            {
                "tag": "events",
                "envs": {"dev": {"type": "memory"}, "prd": {"type": "memory"}},
                "topics": [{"tag": "t", "name": "fz.t"}, {"tag": "dl", "name": "fz.dl"}],
            }
        ],
        "caches": [{"tag": "c", "ttl": "1s"}],
        "databases": [
            {
                "tag": "db",
                "envs": {"dev": {"type": "sqlite", "statement_timeout": "1s"}, "prd": {"type": "sqlite"}},
                "migrations": [
                    {
                        "tag": "m1",
                        "up": ["CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT UNIQUE, n INTEGER)"],
                        "down": ["DROP TABLE items"],
                    },
                    {"tag": "m2", "up": ["CREATE INDEX items_n ON items (n)"], "down": ["DROP INDEX items_n"]},
                ],
                "actions": [
                    {
                        "tag": "find",
                        "type": "read",
                        "query": "SELECT id, name, n FROM items WHERE n >= {{n}} ORDER BY id",
                        "params": {"n": "$Input{filter}{n}"},
                        "input": {"filter": {"n": {"type": "integer"}}},
                    },
                    {
                        "tag": "add",
                        "type": "create",
                        "query": "INSERT INTO items (name, n) VALUES ({{name}}, {{n}})",
                        "params": {"name": "$Input{data}{name}", "n": "$Input{data}{n}"},
                        "input": {"data": {"name": {"type": "string", "required": True}, "n": {"type": "integer"}}},
                    },
                    {"tag": "count", "type": "count", "query": "SELECT COUNT(*) FROM items"},
                ],
            }
        ],
        "features": [
            {
                "tag": "pub",
                "input": {"name": {"type": "string"}, "n": {"type": "integer"}},
                "sequence": [
                    {
                        "tag": "s1",
                        "events": [
                            {"tag": "p", "type": "publish", "event": "events:t", "input": {"message": "$Input{name}"}}
                        ],
                    },
                    {
                        "tag": "s2",
                        "parents": ["s1"],
                        "events": [{"tag": "q", "type": "database_action", "event": "db:count", "allow_fail": True}],
                    },
                ],
                "output": {"id": "$Sequence{s1}{p}{message_id}"},
            },
            {
                "tag": "call",
                "sequence": [
                    {
                        "tag": "s1",
                        "events": [
                            {
                                "tag": "get",
                                "type": "action",
                                "event": "api:get",
                                "input": {"params": {"id": "1"}},
                                "timeout": "1s",
                                "rollback": {"type": "publish", "event": "events:dl", "input": {"message": 1}},
                            },
                        ],
                    },
                    {
                        "tag": "s2",
                        "parents": ["s1"],
                        "events": [
                            {
                                "tag": "post",
                                "type": "action",
                                "event": "api:post",
                                "input": {"body": {"name": "x"}},
                                "timeout": "1s",
                            },
                        ],
                    },
                ],
            },
        ],
        "webhooks": [
            {
                "tag": "wh",
                "schedule": ["0s", "1s"],
                "timeout": "1s",
                "events": [{"tag": "e", "schema": {"name": {"type": "string", "required": True}}}, {"tag": "any"}],
                "endpoints": {"dev": [{"url": f"{base_url}/hook", "secret": "$Secret{FZ_HOOK}"}]},
                "receive": {
                    "dev": {"path": "/in", "verify": "none", "dispatch": {"publish": "events:t"}},
                    "prd": {"path": "/in", "verify": "none"},
                },
            }
        ],
    }


# -- a raw upstream whose every byte the strategy chooses --------------------------------------------------------------


@dataclass
class RawUpstream:
    """An HTTP/1.1 server on loopback that answers every request with `answer`, byte for byte, then closes."""

    answer: bytes = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: application/json\r\n\r\n{}"
    port: int = 0
    server: asyncio.Server | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            length = 0
            for line in head.split(b"\r\n"):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length" and value.strip().isdigit():
                    length = int(value.strip())
            if length:
                await asyncio.wait_for(reader.readexactly(length), 5)
            with self.lock:
                answer = self.answer
            writer.write(answer)
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            pass
        finally:
            writer.close()


def _deep_json(depth: int, kind: str) -> bytes:
    if kind == "list":
        return b"[" * depth + b"1" + b"]" * depth
    return b'{"a":' * depth + b"1" + b"}" * depth


header_text = st.one_of(
    st.sampled_from([b"x", b"", b"\xff\xfe", b"caf\xe9", b"\xc3\x28", b"a\x00b", b"\t", b"1", b"-1", b"999999999999"]),
    st.binary(max_size=40).filter(lambda b: b"\r" not in b and b"\n" not in b),
)
header_names = st.one_of(
    st.sampled_from(
        [b"Content-Type", b"Location", b"Retry-After", b"Set-Cookie", b"X-A", b"Content-Encoding", b"Link", b"\xffX"]
    ),
    st.binary(min_size=1, max_size=12).filter(lambda b: b":" not in b and b"\r" not in b and b"\n" not in b),
)
content_types = st.sampled_from(
    [
        b"application/json",
        b"application/json; charset=utf-16",
        b"application/problem+json",
        b"text/plain; charset=bogus",
        b"text/xml",
        b"multipart/form-data; boundary=x",
        b"application/octet-stream",
        b"",
        b"\xff/\xfe",
        b"json",
    ]
)
bodies = st.one_of(
    st.builds(_deep_json, st.integers(1, 3000), st.sampled_from(["list", "object"])),
    st.builds(lambda n: json.dumps({"items": list(range(n))}).encode(), st.integers(0, 20_000)),
    st.builds(lambda n: json.dumps([{"k": "v" * 10}] * n).encode(), st.integers(0, 5000)),
    st.sampled_from(
        [b"", b"{}", b"null", b"1e999999", b'"\\ud800"', b"\xff\xfe\x00", b'{"a":', b"NaN", b"<a>&bogus;</a>"]
    ),
    st.binary(max_size=300),
    st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")),
)


@st.composite
def upstream_answers(draw: st.DrawFn) -> bytes:
    """A whole HTTP response: status line, headers (any bytes), framing and body as the strategy likes."""
    status = draw(st.one_of(st.sampled_from([200, 201, 204, 302, 304, 401, 404, 429, 500, 503]), st.integers(100, 999)))
    reason = draw(st.sampled_from([b"OK", b"", b"\xff", b"Weird Reason"]))
    body = draw(bodies)
    headers: list[tuple[bytes, bytes]] = [(b"Content-Type", draw(content_types))]
    headers += draw(st.lists(st.tuples(header_names, header_text), max_size=4))
    framing = draw(st.sampled_from(["length", "short", "long", "chunked", "close", "bad-chunk"]))
    if draw(st.integers(0, 9)) == 0:
        headers.append((b"Content-Encoding", draw(st.sampled_from([b"gzip", b"deflate", b"br", b"zstd", b"bogus"]))))
    if framing == "length":
        headers.append((b"Content-Length", str(len(body)).encode()))
    elif framing == "short":
        headers.append((b"Content-Length", str(len(body) + 10).encode()))
    elif framing == "long":
        headers.append((b"Content-Length", str(max(len(body) - 1, 0)).encode()))
    elif framing in ("chunked", "bad-chunk"):
        headers.append((b"Transfer-Encoding", b"chunked"))
        body = (b"%x\r\n" % len(body)) + body + b"\r\n0\r\n\r\n" if framing == "chunked" else b"zz\r\n" + body
    head = b"HTTP/1.1 %d %s\r\n" % (status, reason)
    head += b"".join(name + b": " + value + b"\r\n" for name, value in headers)
    return head + b"Connection: close\r\n\r\n" + body


# -- requests from the descriptors -------------------------------------------------------------------------------------

SERVICES = [
    module.DESCRIPTOR.services_by_name[name]
    for module, name in (
        (product_pb2, "ProductService"),
        (action_pb2, "ActionService"),
        (log_pb2, "LogService"),
        (session_pb2, "SessionService"),
        (broker_pb2, "BrokerService"),
        (storage_pb2, "StorageService"),
        (notification_pb2, "NotificationService"),
        (database_pb2, "DatabaseService"),
        (migration_pb2, "MigrationService"),
        (feature_pb2, "FeatureService"),
        (job_pb2, "JobService"),
        (webhook_pb2, "WebhookService"),
    )
]
METHODS = [method for service in SERVICES for method in service.methods]
BY_PATH = {f"/{method.containing_service.full_name}/{method.name}": method for method in METHODS}


def _path(method: pb_descriptor.MethodDescriptor) -> str:
    return f"/{method.containing_service.full_name}/{method.name}"


def _name(method: pb_descriptor.MethodDescriptor) -> str:
    return f"{method.containing_service.name}.{method.name}"


def _mostly(usual: st.SearchStrategy[Any], odd: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """`usual` four times in five, so most requests get past the first check and reach deeper code."""
    # The usual choice first: Hypothesis favours the first of a sampled list.
    return st.sampled_from([True, True, True, True, False]).flatmap(lambda usual_one: usual if usual_one else odd)


CONTROL = "".join(chr(c) for c in range(32)) + "\x7f\u2028\ufeff\ud7ff"
odd_text = st.one_of(
    st.text(alphabet=st.characters(codec="utf-8"), max_size=30),
    st.text(alphabet=CONTROL + "ab:/.%{}$\\ \"'", max_size=30),
    st.integers(1000, 300_000).map(lambda n: "x" * n),
)
NAMED: dict[str, list[str]] = {
    "product": ["fz", "fz", "nope"],
    "env": ["dev", "prd", "development", "nope"],
    "app": ["api", "form", "multi", "xml", "nope"],
    "event": ["get", "post", "raw", "events:t", "events:dl", "events:nope", "nope:t", "t", "wh:e", "wh:any", "wh:x"],
    "dead_letter_event": ["events:dl", "events:t", "nope"],
    "tag": ["user", "m1", "m2", "nope"],
    "cache": ["c", "nope"],
    "group": ["g1", "g2"],
    "content_type": ["application/json", "text/plain", "application/cloudevents+json"],
    "resource": ["api:get", "api:post"],
    "database": ["db", "nope"],
    "action": ["find", "add", "count", "nope"],
    "feature": ["pub", "call", "nope"],
    "webhook": ["wh", "nope"],
    "address": ["events:t", "api:get", "api:nope", "db:add", "pub", "call", "nope"],
    "name": ["j1", "j2", "x"],
    "cron": ["*/5 * * * *", "0 0 30 2 *", "* * * * * *", "0 0 29 2 1", "61 * * * *", "* * *"],
    "timezone": ["UTC", "Europe/London", "America/New_York", "Nowhere/Else", "../../etc/passwd"],
}
ISSUED = ("token", "refresh_token", "process_id", "job_id", "delivery_id", "message_id")
"""Fields whose usual values are ids the running server gave out (`Known.issued`)."""
int32s = _mostly(
    st.sampled_from([0, 0, 1, 2, 3, 10]),
    st.one_of(st.sampled_from([-1, 1000, 2**31 - 1, -(2**31)]), st.integers(-(2**31), 2**31 - 1)),
)
int64s = st.one_of(
    st.sampled_from([0, 1, -1, 2**63 - 1, -(2**63), 253402300800, -62135596801]), st.integers(-(2**63), 2**63 - 1)
)
json_scalars = st.one_of(
    st.none(), st.booleans(), st.floats(allow_nan=True, allow_infinity=True), st.integers(-(2**53), 2**53), odd_text
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(odd_text, inner, max_size=4)),
    max_leaves=12,
)


SMALL_INTS = {
    "version": [0, 0, 0, 1],
    "retries": [0, 0, 1],
    "page_size": [0, 1, 2, 50],
    "steps": [0, 1, 2],
    "limit": [0, 1, 3],
    "max_retries": [0, 1],
}
PRESENCE = {True: [True] * 9 + [False], False: [True, False]}  # how often a field is set: the usual ones almost always
STRUCT_KEYS = ["name", "n", "deep", "id", "userId", "X-Trace", "params", "body"]
plain_values = st.one_of(
    st.sampled_from(["a", "u-1", "x y", ""]),
    st.integers(-5, 5),
    st.dictionaries(st.sampled_from(["a", "b"]), st.integers(0, 3), max_size=2),
)


def _key(field: int, wire: int) -> bytes:
    return _varint(field << 3 | wire)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _len(field: int, payload: bytes) -> bytes:
    return _key(field, 2) + _varint(len(payload)) + payload


def deep_struct(depth: int) -> bytes:
    """A Struct nested `depth` levels (alternating Struct and ListValue), encoded by hand: past protobuf's own limit."""
    value = _len(3, b"x")
    for level in range(depth):
        value = _len(5, _len(1, _len(1, b"k") + _len(2, value))) if level % 2 else _len(6, _len(1, value))
    return _len(1, _len(1, b"k") + _len(2, value))


def _struct_paths(
    descriptor: pb_descriptor.Descriptor, prefix: tuple[int, ...] = (), depth: int = 0
) -> list[tuple[int, ...]]:
    """Field-number paths from a request to each (non-repeated) Struct field inside it."""
    found: list[tuple[int, ...]] = []
    for fd in descriptor.fields:
        if fd.type != FieldDescriptor.TYPE_MESSAGE or fd.is_repeated:
            continue
        if fd.message_type.full_name == "google.protobuf.Struct":
            found.append((*prefix, fd.number))
        elif depth < 3 and not fd.message_type.full_name.startswith("google.protobuf."):
            found += _struct_paths(fd.message_type, (*prefix, fd.number), depth + 1)
    return found


def _wrap(path: tuple[int, ...], payload: bytes) -> bytes:
    for number in reversed(path):
        payload = _len(number, payload)
    return payload


@dataclass
class Known:
    """Values only the running server can give (tokens it issued), offered to the strategies."""

    issued: dict[str, list[str]] = field(default_factory=dict)
    base_url: str = "http://127.0.0.1:9"
    server_logs: list[bytes] = field(default_factory=list)


KNOWN = Known()


def _scalar(fd: FieldDescriptor) -> st.SearchStrategy[Any]:
    kind = fd.type
    if kind == FieldDescriptor.TYPE_STRING:
        choices = NAMED.get(fd.name)
        if fd.name in ISSUED:
            choices = KNOWN.issued.get(fd.name) or ["v1.x.y"]
        return _mostly(st.sampled_from(choices), odd_text) if choices else odd_text
    if kind == FieldDescriptor.TYPE_BYTES:
        if fd.name == "manifest":
            base = json.dumps(manifest(KNOWN.base_url))
            return st.one_of(
                st.just(base.encode()),
                st.sampled_from([b"product: [", b"a: &a [*a, *a]", b"{}", b"product: fz\nenvironments: 1", b"\xff"]),
                # Deep nesting (`k: [[[[…`): ~1900 levels once stalled the whole server; now past the depth limit.
                # Kept under the inline parsing size: a first larger manifest starts the parsing worker process,
                # which on a loaded machine can take longer than the call bound (a start-up cost, not the depth).
                st.builds(lambda n: ("k: " + "[" * n).encode(), st.integers(1, 16_000)),
                st.binary(max_size=200),
            )
        return st.binary(max_size=200)
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind == FieldDescriptor.TYPE_ENUM:
        return st.one_of(st.sampled_from([v.number for v in fd.enum_type.values]), int32s)
    if kind in (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_SINT64, FieldDescriptor.TYPE_SFIXED64):
        return int64s
    if kind in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32):
        return st.integers(0, 2**32 - 1)
    if kind in (FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64):
        return st.integers(0, 2**64 - 1)
    if kind in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return st.floats(width=32 if kind == FieldDescriptor.TYPE_FLOAT else 64)
    if fd.name in SMALL_INTS:
        return _mostly(st.sampled_from(SMALL_INTS[fd.name]), int32s)
    return int32s


def _set_value(value: struct_pb2.Value, data: Any) -> None:
    if data is None:
        value.null_value = struct_pb2.NULL_VALUE
    elif isinstance(data, bool):
        value.bool_value = data
    elif isinstance(data, (int, float)):
        value.number_value = float(data)
    elif isinstance(data, str):
        value.string_value = data
    elif isinstance(data, list):
        value.list_value.SetInParent()
        for item in data:
            _set_value(value.list_value.values.add(), item)
    else:
        value.struct_value.SetInParent()
        for key, item in data.items():
            _set_value(value.struct_value.fields[key], item)


@st.composite
def messages(draw: st.DrawFn, descriptor: pb_descriptor.Descriptor, depth: int = 0) -> Any:
    """A message of `descriptor`'s type with each field present or not, each value well- or ill-typed."""
    message = message_factory.GetMessageClass(descriptor)()
    name = descriptor.full_name
    if name == "google.protobuf.Struct":
        keys = _mostly(st.sampled_from(STRUCT_KEYS), odd_text)
        for key, item in draw(st.dictionaries(keys, _mostly(plain_values, json_values), max_size=4)).items():
            _set_value(message.fields[key], item)
        return message
    if name == "google.protobuf.Value":
        _set_value(message, draw(json_values))
        return message
    if name in ("google.protobuf.Duration", "google.protobuf.Timestamp"):
        message.seconds = draw(st.one_of(st.integers(-5, 60), int64s))
        message.nanos = draw(st.one_of(st.just(0), int32s))
        return message
    if name.endswith(".SessionRef") and draw(st.sampled_from(PRESENCE[True])):
        message.tag = draw(_mostly(st.just("user"), odd_text))
        message.token = draw(_mostly(st.sampled_from(KNOWN.issued.get("token") or ["v1.x.y"]), odd_text))
        return message
    chosen = {oneof.name: draw(st.sampled_from(list(oneof.fields))).name for oneof in descriptor.oneofs}
    for fd in descriptor.fields:
        if fd.containing_oneof is not None and chosen[fd.containing_oneof.name] != fd.name:
            continue  # one member of a oneof: setting several would keep only the last
        wanted = fd.name in NAMED or fd.name in (*ISSUED, "input", "init", "message", "messages", "run", "job")
        if not draw(st.sampled_from(PRESENCE[wanted])):
            continue
        target = getattr(message, fd.name)
        if fd.type == FieldDescriptor.TYPE_MESSAGE and fd.message_type.GetOptions().map_entry:
            key_fd, value_fd = fd.message_type.fields_by_name["key"], fd.message_type.fields_by_name["value"]
            for key in draw(st.lists(_scalar(key_fd), max_size=3)):
                if value_fd.type == FieldDescriptor.TYPE_MESSAGE:
                    target[key].CopyFrom(draw(messages(value_fd.message_type, depth + 1)))
                else:
                    target[key] = draw(_scalar(value_fd))
        elif fd.type == FieldDescriptor.TYPE_MESSAGE:
            if depth > 3:
                continue
            if fd.is_repeated:
                for _ in range(draw(st.integers(0, 3))):
                    target.add().CopyFrom(draw(messages(fd.message_type, depth + 1)))
            else:
                target.CopyFrom(draw(messages(fd.message_type, depth + 1)))
        elif fd.is_repeated:
            target.extend(draw(st.lists(_scalar(fd), max_size=3)))
        else:
            setattr(message, fd.name, draw(_scalar(fd)))
    return message


def _payload(method: pb_descriptor.MethodDescriptor) -> st.SearchStrategy[bytes]:
    """Raw request bytes for `method`: mostly a generated message, sometimes with a Struct nested past protobuf's
    limit spliced in, sometimes bytes that are no protobuf at all."""

    @st.composite
    def payload(draw: st.DrawFn) -> bytes:
        shape = draw(st.sampled_from(["message"] * 8 + ["deep", "bytes"]))
        if shape == "bytes":
            return draw(st.binary(max_size=100))
        raw: bytes = draw(messages(method.input_type)).SerializeToString()
        paths = _struct_paths(method.input_type)
        if shape == "deep" and paths:
            raw += _wrap(draw(st.sampled_from(paths)), deep_struct(draw(st.integers(90, 400))))
        return raw

    return payload()


@st.composite
def upstream_runs(draw: st.DrawFn) -> bytes:
    """A Run that passes every check and reaches the upstream, so the upstream's answer is what is tested."""
    request = action_pb2.RunRequest(
        product="fz",
        env=draw(st.sampled_from(["dev", "prd", "development"])),
        app=draw(st.sampled_from(["api", "form", "multi", "xml"])),
        event=draw(st.sampled_from(["get", "post", "raw"])),
        cache=draw(st.sampled_from(["", "", "c"])),
        idempotency_key=draw(st.sampled_from(["", "", "k1", "k2"])),
    )
    request.input.params.update({"id": draw(_mostly(st.sampled_from(["1", "a b", "é"]), odd_text))})
    _set_value(request.input.body.fields["name"], draw(_mostly(st.just("n"), odd_text)))
    _set_value(request.input.body.fields["deep"], draw(json_values.filter(lambda v: isinstance(v, dict)) | st.just({})))
    if draw(st.booleans()):
        trace = draw(_mostly(st.just("t-1"), odd_text))
        request.input.headers.update({"X-Trace": trace})
    if draw(st.booleans()):
        request.session.tag, request.session.token = "user", KNOWN.issued["token"][0]
    return request.SerializeToString()


def requests() -> st.SearchStrategy[dict[str, list[bytes]]]:
    """One round: for every RPC, the raw requests to send (two for Run, up to three on a client stream)."""
    return st.fixed_dictionaries(
        {
            _path(method): st.lists(
                _payload(method), min_size=1, max_size=3 if method.client_streaming or method.name == "Run" else 1
            )
            for method in METHODS
        }
        | {
            f"/{action_pb2.DESCRIPTOR.services_by_name['ActionService'].full_name}/Run#upstream": st.lists(
                upstream_runs(), min_size=1, max_size=3
            )
        }
    )


# -- the property ------------------------------------------------------------------------------------------------------


def _call(channel: grpc.Channel, method: pb_descriptor.MethodDescriptor, payloads: list[bytes]) -> grpc.StatusCode:
    """Send raw bytes; the status code the server ends the call with (OK when it answered)."""
    path = _path(method)
    try:
        if method.client_streaming:

            def feed() -> Iterator[bytes]:
                yield from payloads

            for _ in channel.stream_stream(path)(feed(), timeout=SUBSCRIBE_WINDOW_S):
                pass
        elif method.server_streaming:
            for _ in channel.unary_stream(path)(payloads[0], timeout=SUBSCRIBE_WINDOW_S):
                pass
        else:
            channel.unary_unary(path)(payloads[0], timeout=CALL_TIMEOUT_S)
    except grpc.RpcError as error:
        code = error.code()
        if code in BAD_CODES:
            details = error.details() or ""
            said = [line for line in KNOWN.server_logs if details[-16:].encode() in line] if details else []
            raise AssertionError(f"{path} answered {code.name}: {details!r}; the server logged {said[-1:]!r}") from None
        streaming = method.client_streaming or method.server_streaming
        if code == grpc.StatusCode.DEADLINE_EXCEEDED and not streaming:
            raise AssertionError(f"{path} did not answer within {CALL_TIMEOUT_S}s") from None
        reason = _reason(path, error, streaming)
        STATS[(_name(method), f"{code.name} {reason}".rstrip())] += 1
        if os.environ.get("FUZZ_TRACE"):
            print("  ", code.name, (error.details() or "")[:150], flush=True)
        return code
    STATS[(_name(method), "OK")] += 1
    return grpc.StatusCode.OK


def _reason(path: str, error: grpc.RpcError, streaming: bool) -> str:
    """The error's reason, checked: one docs/api.md's table documents with the error's code. Only a stream's deadline
    (the test's window) carries none: no request is over the size limit, and an error's trailers over the size
    clients accept (an error quoting a huge value) reach the caller as a RESOURCE_EXHAUSTED without details."""
    code = error.code()  # type: ignore[attr-defined]
    details = dict(error.trailing_metadata() or ()).get("grpc-status-details-bin")  # type: ignore[attr-defined]
    status = status_pb2.Status.FromString(details) if details else None
    if streaming and code == grpc.StatusCode.DEADLINE_EXCEEDED and status is None:
        return ""  # the test's window on a stream that stays open
    assert status is not None, f"{path} answered {code.name} without details: {error.details()!r}"  # type: ignore[attr-defined]
    assert status.code == code.value[0], f"{path} answered {code.name} with the details of code {status.code}"
    infos: list[error_details_pb2.ErrorInfo] = []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            infos.append(error_details_pb2.ErrorInfo())
            detail.Unpack(infos[-1])
    assert len(infos) == 1, f"{path} answered {code.name} with {len(infos)} ErrorInfos"
    reason = infos[0].reason
    assert (code.name, reason) in DOCUMENTED, f"{path} answered {code.name} {reason}: not in docs/api.md's table"
    return reason


def _serving(channel: grpc.Channel) -> bool:
    answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT_S)
    return answer.status == health_pb2.HealthCheckResponse.SERVING


def _property(address: str, upstream: RawUpstream) -> Callable[[], None]:
    channel = grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)])

    @PROFILE
    @given(round_=requests(), answer=upstream_answers())
    def every_rpc_answers_with_a_defined_status(round_: dict[str, list[bytes]], answer: bytes) -> None:
        with upstream.lock:
            upstream.answer = answer
        for path, payloads in round_.items():
            method = BY_PATH[path.partition("#")[0]]
            if os.environ.get("FUZZ_TRACE"):
                print("->", method.name, [len(p) for p in payloads], flush=True)
            if method.client_streaming:
                _call(channel, method, payloads)
            else:
                for payload in payloads:
                    _call(channel, method, [payload])
        assert _serving(channel), "health is no longer SERVING"

    return every_rpc_answers_with_a_defined_status


@pytest.fixture
async def raw_upstream() -> AsyncIterator[RawUpstream]:
    upstream = RawUpstream()
    await upstream.start()
    yield upstream
    assert upstream.server is not None
    upstream.server.close()
    await upstream.server.wait_closed()


@dataclass
class ServerProcess:
    """The processor as its own process (`ductape-processor serve`), so that even a crash is seen as one."""

    process: asyncio.subprocess.Process
    address: str
    logs: list[bytes]
    reader: asyncio.Task[None]


async def _serve(tmp_path: Path) -> ServerProcess:
    env = {
        **os.environ,
        "PROCESSOR_DATA_DIR": str(tmp_path),
        "PROCESSOR_SESSION_KEYS": new_root_key("k1"),
        "PROCESSOR_MAX_UPSTREAM_RESPONSE_BYTES": str(256 * 1024),
        "PROCESSOR_EXECUTION_FLUSH_S": "0.05",
        "PROCESSOR_SECRET_FZ_HOOK": "whsec_" + base64.b64encode(b"the fuzz test's webhook secret!!").decode(),
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "ductape_processor.cli",
        "serve",
        "--address",
        "127.0.0.1:0",
        env=env,
        stderr=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.DEVNULL,
        cwd=ROOT,
    )
    assert process.stderr is not None
    logs: list[bytes] = []
    while True:
        line = await asyncio.wait_for(process.stderr.readline(), 60)
        assert line, f"the server exited early: {logs}"
        logs.append(line)
        entry = json.loads(line)
        if entry.get("message") == "serving":
            break

    async def drain() -> None:  # keep reading, so a chatty server never blocks on a full pipe
        assert process.stderr is not None
        while line := await process.stderr.readline():
            logs.append(line)
            del logs[:-200]

    reader = asyncio.get_running_loop().create_task(drain())
    return ServerProcess(process, f"127.0.0.1:{entry['port']}", logs, reader)


@pytest.fixture
async def server_process(tmp_path: Path) -> AsyncIterator[ServerProcess]:
    server = await _serve(tmp_path)
    yield server
    if server.process.returncode is None:
        server.process.terminate()
        await asyncio.wait_for(server.process.wait(), 30)
    await server.reader


async def _seed(address: str) -> dict[str, list[str]]:
    """Ids only the server gives out, so that requests name real records: the migrations applied, a feature run, a
    job, a webhook message and its delivery."""
    async with grpc.aio.insecure_channel(address) as channel:
        target = migration_pb2.MigrationTarget(product="fz", env="dev", database="db")
        await migration_pb2_grpc.MigrationServiceStub(channel).Run(
            migration_pb2.MigrationServiceRunRequest(target=target)
        )
        features = feature_pb2_grpc.FeatureServiceStub(channel)
        ran = await features.Run(
            feature_pb2.FeatureServiceRunRequest(product="fz", env="dev", feature="pub", wait=True), timeout=30
        )
        job = await job_pb2_grpc.JobServiceStub(channel).Schedule(
            job_pb2.JobServiceScheduleRequest(
                product="fz",
                env="dev",
                name="j1",
                target=job_pb2.JobTarget(kind=job_pb2.TARGET_KIND_PUBLISH, address="events:t"),
                repeat=job_pb2.Repeat(cron="0 0 1 1 *"),
            )
        )
        emitted = await webhook_pb2_grpc.WebhookServiceStub(channel).Emit(
            webhook_pb2.EmitRequest(product="fz", env="dev", event="wh:any", payload=struct_pb2.Value(number_value=1))
        )
    return {
        "process_id": [ran.run.process_id],
        "job_id": [job.job_id],
        "message_id": [emitted.message_id],
        "delivery_id": list(emitted.delivery_ids),
    }


@pytest.mark.timeout(600)
async def test_no_request_or_upstream_answer_gets_internal_or_unknown(
    server_process: ServerProcess, raw_upstream: RawUpstream
) -> None:
    KNOWN.base_url = f"http://127.0.0.1:{raw_upstream.port}"
    KNOWN.server_logs = server_process.logs
    async with Processor(server_process.address, timeout=30) as client:
        await client.product.apply(json.dumps(manifest(KNOWN.base_url)).encode())
        pair = await client.session.start(product="fz", env="dev", tag="user", data={"userId": "u-1"})
    KNOWN.issued = {"token": [pair.token], "refresh_token": [pair.refresh_token]}
    KNOWN.issued |= await _seed(server_process.address)
    try:
        await asyncio.to_thread(_property(server_process.address, raw_upstream))
    finally:
        print("\n".join(f"{method} {code}: {n}" for (method, code), n in sorted(STATS.items())))
    assert server_process.process.returncode is None, b"".join(server_process.logs[-20:]).decode(errors="replace")
    internal = [line for line in server_process.logs if b"unexpected error" in line]
    assert not internal, internal[:3]
