"""Manifest parsing and validation: every problem is reported with its path and reason."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from datetime import timedelta

import pytest

from ductape_processor.errors import InvalidManifest, ManifestTooLarge
from ductape_processor.runtime.registry.loader import (
    MAX_MANIFEST_BYTES,
    MAX_VALUES,
    ManifestFormat,
    load_manifest,
    parse_document,
)
from ductape_processor.runtime.registry.manifest import CredentialAuth, RedisBrokerEnv
from tests.conftest import EXAMPLE, ROOT

BASE = {
    "product": "shop",
    "environments": [{"slug": "dev"}, {"slug": "prd", "name": "production"}],
}


def problems(document: object, fmt: ManifestFormat = ManifestFormat.UNSPECIFIED) -> dict[str, str]:
    source = document if isinstance(document, bytes) else json.dumps(document).encode()
    with pytest.raises(InvalidManifest) as caught:
        load_manifest(source, fmt)
    return {v.field: v.description for v in caught.value.problems}


def with_(**parts: object) -> dict[str, object]:
    return {**BASE, **parts}


def app(**overrides: object) -> dict[str, object]:
    base: dict[str, object] = {
        "tag": "mailer",
        "envs": {"dev": {"base_url": "http://127.0.0.1:8025"}, "prd": {"base_url": "https://mail.example"}},
    }
    return {**base, **overrides}


def test_the_example_manifest_is_valid() -> None:
    loaded = load_manifest(EXAMPLE.read_bytes())
    model = loaded.model
    assert model.product == "shop"
    assert [e.slug for e in model.environments] == ["dev", "prd"]
    mailer = model.apps[0]
    assert mailer.retry.max == 3 and mailer.retry.initial == timedelta(milliseconds=200)
    assert mailer.retry.on == ["429", "500-599", "network"], "YAML `on:` is a key, not the boolean true"
    assert mailer.actions[0].path_parameters() == ["template"]
    assert model.sessions[0].identifier_field == "userId"
    assert model.caches[0].ttl == timedelta(seconds=60)
    assert isinstance(model.brokers[0].envs["prd"], type(model.brokers[0].envs["prd"]))


def test_yaml_and_json_of_the_same_content_share_a_checksum() -> None:
    document = parse_document(EXAMPLE.read_bytes(), ManifestFormat.YAML)
    from_yaml = load_manifest(EXAMPLE.read_bytes())
    from_json = load_manifest(json.dumps(document, indent=4).encode(), ManifestFormat.JSON)
    assert from_json.format == ManifestFormat.JSON and from_yaml.format == ManifestFormat.YAML
    assert from_yaml.checksum == from_json.checksum


def test_environment_lookup_by_slug_or_name() -> None:
    model = load_manifest(json.dumps(BASE).encode()).model
    prd = model.find_environment("prd")
    assert prd is not None and model.find_environment("production") == prd
    assert model.find_environment("staging") is None


def test_unknown_resource_kind_and_unknown_field_are_refused() -> None:
    found = problems(with_(gadgets=[], apps=[app(colour="blue")]))
    assert "unknown field" in found["gadgets"]
    assert "unknown field" in found["apps[0].colour"]


def test_every_problem_is_listed_with_its_path() -> None:
    found = problems(
        with_(
            apps=[
                app(
                    envs={"dev": {"base_url": "ftp://x"}, "qa": {"base_url": "http://x"}},
                    actions=[{"tag": "send", "method": "POST", "path": "no-slash"}],
                )
            ],
            caches=[{"tag": "short", "ttl": "soon"}],
        )
    )
    assert "http:// or https://" in found["apps[0].envs.dev.base_url"]
    assert "starts with a single '/'" in found["apps[0].actions[0].path"]
    assert "not a duration" in found["caches[0].ttl"]


@pytest.mark.parametrize("ttl", ["36526d", "3000000d", "99999999999999d", "9" * 400 + "s", 3_155_760_000_001])
def test_a_duration_longer_than_100_years_is_a_problem_at_its_path(ttl: object) -> None:
    # 99999999999999d overflowed Python's timedelta (a traceback, not a problem); 3000000d overflowed the calendar
    # once added to a moment (a job's `every`).
    found = problems(with_(caches=[{"tag": "c", "ttl": ttl}]))
    assert "longer than 100 years (36525d)" in found["caches[0].ttl"]
    job = {"tag": "j", "target": {"kind": "publish", "event": "b:t"}, "repeat": {"every": ttl}}
    assert "longer than 100 years" in problems(with_(jobs=[job]))["jobs[0].repeat.every"]


def test_a_duration_of_100_years_is_accepted() -> None:
    manifest = load_manifest(json.dumps(with_(caches=[{"tag": "c", "ttl": "36525d"}])).encode())
    assert manifest.compiled.model.caches[0].ttl == timedelta(days=36_525)


def test_cross_references_are_checked() -> None:
    found = problems(
        with_(
            environments=[{"slug": "dev"}, {"slug": "prd"}, {"slug": "dev"}],
            apps=[
                app(
                    envs={"dev": {"base_url": "http://a"}, "qa": {"base_url": "http://b"}},
                    variables={"stage": {"x": 1}},
                    auths=[{"tag": "login", "type": "credential", "action": "missing", "expiry": "1h"}],
                    actions=[
                        {"tag": "get", "method": "get", "path": "/users/:id", "input": {"params": {"other": {}}}},
                        {"tag": "get", "method": "GET", "path": "/x"},
                    ],
                )
            ],
            brokers=[{"tag": "events", "envs": {"dev": {"type": "memory"}}, "topics": []}],
        )
    )
    assert "already used by environments[0]" in found["environments[2].slug"]
    assert "'qa' is not an environment" in found["apps[0].envs.qa"]
    assert "no configuration for environment 'prd'" in found["apps[0].envs"]
    assert "'stage' is not an environment" in found["apps[0].variables.stage"]
    assert "has no action 'missing'" in found["apps[0].auths[0].action"]
    assert ":id is not declared" in found["apps[0].actions[0].path"]
    assert "no parameter :other" in found["apps[0].actions[0].input.params.other"]
    assert "already used" in found["apps[0].actions[1].tag"]
    assert "no configuration for environment 'prd'" in found["brokers[0].envs"]


def test_broker_types_and_auth_kinds_are_discriminated() -> None:
    found = problems(
        with_(
            apps=[app(auths=[{"tag": "k", "type": "oauth"}])],
            brokers=[
                {"tag": "b", "envs": {"dev": {"type": "kafka"}, "prd": {"type": "redis", "url": "http://r"}}},
            ],
        )
    )
    assert found["apps[0].auths[0].type"] == "must be one of token, credential, not 'oauth'"
    assert found["brokers[0].envs.dev.type"] == "must be one of memory, redis, rabbitmq, nats, not 'kafka'"
    assert "redis://" in found["brokers[0].envs.prd.url"]
    model = load_manifest(
        json.dumps(
            with_(
                apps=[
                    app(
                        auths=[{"tag": "login", "type": "credential", "action": "token", "expiry": "2h"}],
                        actions=[{"tag": "token", "method": "POST", "path": "/oauth/token"}],
                    )
                ],
                brokers=[
                    {
                        "tag": "b",
                        "envs": {"dev": {"type": "memory"}, "prd": {"type": "redis", "url": "$Secret{REDIS_URL}"}},
                    }
                ],
            )
        ).encode()
    ).model
    assert isinstance(model.apps[0].auths[0], CredentialAuth)
    assert isinstance(model.brokers[0].envs["prd"], RedisBrokerEnv)


@pytest.mark.parametrize(
    ("kind", "accepted", "refused"),
    [
        ("redis", ("redis://r", "rediss://r"), "amqp://r"),
        ("rabbitmq", ("amqp://r", "amqps://r"), "redis://r"),
        ("nats", ("nats://r", "tls://r"), "http://r"),
    ],
)
def test_each_broker_url_takes_its_own_schemes_or_a_secret(kind: str, accepted: tuple[str, str], refused: str) -> None:
    envs = {"dev": {"type": kind, "url": refused}, "prd": {"type": kind, "url": "$Secret{BROKER_URL}"}}
    found = problems(with_(brokers=[{"tag": "b", "envs": envs}]))
    expected = ", ".join(url.split("//")[0] + "//" for url in accepted)
    assert f"is not a URL of this broker (expected {expected}, or $Secret{{NAME}})" in found["brokers[0].envs.dev.url"]
    assert "brokers[0].envs.prd.url" not in found
    for url in accepted:
        envs = {"dev": {"type": kind, "url": url}, "prd": {"type": kind, "url": url}}
        load_manifest(json.dumps(with_(brokers=[{"tag": "b", "envs": envs}])).encode())


def test_sessions_need_a_selector_naming_a_schema_field() -> None:
    found = problems(
        with_(
            sessions=[
                {"tag": "user", "schema": {"userId": {"type": "string"}}, "selector": "$Session{id}"},
                {"tag": "admin", "schema": {"id": {}}, "selector": "id", "expiry": "1d", "refresh_expiry": "1h"},
            ]
        )
    )
    assert "not a field of the schema" in found["sessions[0]"]
    assert "must be $Session{field}" in found["sessions[1]"]


def test_field_specs_are_consistent() -> None:
    schema = {
        "a": {"type": "integer", "min_length": 1},
        "b": {"type": "string", "min_length": 5, "max_length": 2},
        "c": {"type": "number", "decorator": {"text": "x"}},
        "d": {"type": "money"},
    }
    found = problems(with_(sessions=[{"tag": "s", "schema": schema, "selector": "$Session{a}"}]))
    assert "apply to strings and arrays" in found["sessions[0].schema.a"]
    assert "greater than max_length" in found["sessions[0].schema.b"]
    assert "decorator applies to strings" in found["sessions[0].schema.c"]
    assert "sessions[0].schema.d.type" in found


def test_malformed_secret_references_are_refused() -> None:
    found = problems(with_(apps=[app(constants={"key": "$Secret{1BAD}"})]))
    assert "secret name" in found["apps[0].constants.key"]


@pytest.mark.parametrize(
    ("source", "why"),
    [
        (b"product: shop\nproduct: blog\nenvironments: [{slug: dev}]\n", "duplicate key 'product'"),
        (b'{"product": "a", "product": "b", "environments": []}', "duplicate key 'product'"),
        (b"- just\n- a list\n", "a manifest is a mapping"),
        (b"product: [unclosed\n", "YAML syntax error"),
        (b'{"product": ', "JSON syntax error"),
        (b"\xff\xfe not utf-8", "not UTF-8"),
        (b'{"product": "a", "environments": [{"slug": "dev"}], "name": NaN}', "NaN"),
    ],
)
def test_unreadable_documents_are_refused_with_a_reason(source: bytes, why: str) -> None:
    found = problems(source)
    assert why in found[""]


def test_alias_expansion_bombs_are_refused() -> None:
    lines = ["product: shop", "environments: [{slug: dev}]", "a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    for level in range(1, 9):
        previous = f"*a{level - 1}"
        lines.append(f"a{level}: &a{level} [{', '.join([previous] * 10)}]")
    with pytest.raises(ManifestTooLarge) as caught:
        load_manifest("\n".join(lines).encode())
    assert caught.value.limit == "values"
    assert caught.value.violations[0].field == "manifest"


def test_size_limits_are_refused_with_the_limit_named() -> None:
    with pytest.raises(ManifestTooLarge) as caught:
        load_manifest(b"product: [" + b" " * MAX_MANIFEST_BYTES)
    assert caught.value.reason == "MANIFEST_TOO_LARGE" and caught.value.limit == "bytes"
    assert caught.value.violations[0].description == (
        f"is {MAX_MANIFEST_BYTES + 10} bytes, more than the {MAX_MANIFEST_BYTES} bytes allowed "
        "(PROCESSOR_MANIFEST_MAX_BYTES)"
    )
    assert caught.value.metadata == {"limit": "bytes", "maximum": str(MAX_MANIFEST_BYTES)}
    with pytest.raises(ManifestTooLarge, match="1000 bytes allowed"):
        load_manifest(EXAMPLE.read_bytes(), max_bytes=1000)
    many = json.dumps({**BASE, "constants": [0] * MAX_VALUES}).encode()
    deep = json.dumps({**BASE, "constants": json.loads("[" * 65 + "]" * 65)}).encode()
    very_deep = b'{"product": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    yaml_deep = b"product: shop\nx:\n" + b"".join(b" " * i + b"- \n" for i in range(1, 1100))
    for source, limit in [(many, "values"), (deep, "depth"), (very_deep, "depth"), (yaml_deep, "depth")]:
        with pytest.raises(ManifestTooLarge) as caught:
            load_manifest(source)
        assert caught.value.limit == limit, source[:40]
    load_manifest(json.dumps({**BASE, "description": "x", "name": None}).encode())


# Phrases of the validation library that must never reach a caller.
LIBRARY_WORDS = (
    "Input should",
    "Field required",
    "Extra inputs",
    "String should",
    "List should",
    "Value error",
    "Assertion failed",
    "dictionary",
    "Unable to extract tag",
    "expected tags",
    "valid JSON value",
    "is not a valid value here",  # our fallback: an error kind left unmapped
)


def test_problems_read_in_the_processors_words() -> None:
    schema = {"": {"type": "string"}, "ok": {"type": "string", "required": "yes", "min_length": -1}}
    found = problems(
        {
            "product": 5,
            "environments": [{"slug": "1dev", "name": "n" * 101}],
            "apps": [
                app(
                    auths=[{"tag": "k"}, {"tag": "j", "type": "oauth"}],
                    retry={"max": 50, "backoff": "linear"},
                    actions=[{"tag": "a", "method": "FETCH", "path": "/", "input": {"body": schema}, "retry": 3}],
                )
            ],
            "brokers": {},
            "caches": [{"tag": "c", "ttl": "1m", "backend": "memcached"}],
            "colour": "red",
        }
    )
    assert found == {
        "product": "must be text",
        "environments[0].slug": "must be a tag: letters, digits, '_' and '-', starting with a letter, at most 64 "
        "characters",
        "environments[0].name": "must have at most 100 characters",
        "apps[0].auths[0].type": "required field is missing: it says which kind of entry this is",
        "apps[0].auths[1].type": "must be one of token, credential, not 'oauth'",
        "apps[0].retry.max": "must be at most 20",
        "apps[0].retry.backoff": "must be one of constant, exponential, not 'linear'",
        "apps[0].actions[0].method": "must be one of GET, POST, PUT, PATCH, DELETE, HEAD, OPTIONS, not 'FETCH'",
        "apps[0].actions[0].input.body.": "the key must not be empty",
        "apps[0].actions[0].input.body.ok.required": "must be true or false",
        "apps[0].actions[0].input.body.ok.min_length": "must be at least 0",
        "apps[0].actions[0].retry": "must be a mapping (key: value pairs)",
        "brokers": "must be a list",
        "caches[0].backend": "must be one of store, redis, not 'memcached'",
        "colour": "unknown field: not part of the manifest schema (see docs/manifest.md)",
    }
    assert problems(with_(environments=[]))["environments"] == "must not be empty"
    assert problems({"product": "shop"})["environments"] == "required field is missing"


def _paths(node: object, path: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    found = [path]
    if isinstance(node, dict):
        for key, value in node.items():
            found += _paths(value, (*path, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += _paths(value, (*path, index))
    return found


def test_no_problem_is_worded_by_the_validation_library() -> None:
    """Every value of the example replaced by values of every other kind: each problem is in our words."""
    example = parse_document(EXAMPLE.read_bytes(), ManifestFormat.YAML)
    replacements: list[object] = [7, -1, 1.5, "text", "", "x" * 3000, True, None, [], [1], {}, {"extra": 1}]
    reasons: set[str] = set()
    for path in _paths(example)[1:]:
        for replacement in replacements:
            document = copy.deepcopy(example)
            parent = document
            for part in path[:-1]:
                parent = parent[part]
            parent[path[-1]] = replacement
            try:
                load_manifest(json.dumps(document).encode())
            except InvalidManifest as exc:
                reasons.update(problem.description for problem in exc.problems)
    assert len(reasons) > 40
    worded_by_the_library = sorted(r for r in reasons if any(words in r for words in LIBRARY_WORDS))
    assert worded_by_the_library == []
    assert all(len(reason) <= 300 for reason in reasons)


def test_yaml_keeps_words_and_dates_as_strings() -> None:
    source = (
        b"product: shop\nenvironments: [{slug: dev}]\n"
        b"apps:\n- tag: a\n  envs: {dev: {base_url: 'http://a'}}\n  constants: {answer: no, day: 2024-01-01}\n"
    )
    constants = load_manifest(source).model.apps[0].constants
    assert constants == {"answer": "no", "day": "2024-01-01"}


def test_the_published_json_schema_is_up_to_date() -> None:
    generated = subprocess.run(
        [sys.executable, "-m", "ductape_processor.cli", "schema"], capture_output=True, text=True, check=True
    ).stdout
    published = (ROOT / "docs" / "manifest.schema.json").read_text()
    assert json.loads(generated) == json.loads(published), "run `make gen` and commit docs/manifest.schema.json"
