"""The TypeScript client (clients/typescript) against real processors: its own `node --test` suite, run here.

Two processors start on free ports (one open, one that requires an API key and a TLS client certificate) with a
product whose apps call a real local HTTP upstream; the node tests get their addresses in PROCESSOR_* variables.
The package is built (tsc) first. Without node or the package's node_modules (`make test` runs `npm ci` for it)
this skips; under CI=true it fails.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from aiohttp import web
from ductape.processor import Processor

from ductape_processor.api.auth import hash_key
from tests import test_example
from tests.conftest import EXAMPLE, ROOT, ServerFactory, _missing
from tests.pki import make_pki
from tests.upstream import Upstream, json_answer

PACKAGE = ROOT / "clients" / "typescript"
mailer_stub = test_example.mailer_stub  # the example's mailer API, for the README's calls
API_KEY = "ts-client-key"


def typescript_toolchain() -> str:
    """The path of `node` when the package can be built and tested here; else skip (fail under CI=true)."""
    node = shutil.which("node")
    if node is None:
        _missing("node is not installed: the TypeScript client's tests need Node.js 20+")
    if not (PACKAGE / "node_modules" / ".bin" / "tsc").exists():
        _missing(f"{PACKAGE / 'node_modules'} is missing: run `npm ci --prefix clients/typescript` (make test does)")
    assert node is not None
    return node


def manifest(upstream_url: str) -> bytes:
    """The product the node tests use: an app on the upstream, one that is down, a memory broker, a session type."""
    body_contract = {"email": {"type": "email", "required": True}, "profile": {"type": "object"}}
    document: dict[str, Any] = {
        "product": "tsclient",
        "environments": [{"slug": "dev", "name": "development", "allow_private_endpoints": True}],
        "apps": [
            {
                "tag": "echo",
                "envs": {"dev": {"base_url": upstream_url}},
                "retry": {"max": 0},
                "actions": [
                    {
                        "tag": "echo",
                        "method": "POST",
                        "path": "/echo",
                        "body": "$Input{body}",
                        "input": {"body": body_contract},
                    },
                    {"tag": "slow", "method": "GET", "path": "/slow", "timeout": "5s"},
                ],
            },
            {
                "tag": "down",
                "envs": {"dev": {"base_url": "http://127.0.0.1:9"}},
                "retry": {"max": 0},
                "circuit_breaker": {"failures": 2, "cooldown": "30s"},
                "actions": [{"tag": "ping", "method": "GET", "path": "/ping"}],
            },
        ],
        "brokers": [
            {
                "tag": "events",
                "envs": {"dev": {"type": "memory"}},
                "topics": [{"tag": name, "name": name} for name in ("acked", "nacked", "dropped", "jobs", "received")],
            }
        ],
        "storage": [{"tag": "files", "envs": {"dev": {"provider": "fs"}}}],
        "webhooks": [
            {
                "tag": "orders",
                "schedule": [0, "1s"],
                "timeout": "2s",
                "events": [{"tag": "paid", "schema": {"orderId": {"type": "string", "required": True}}}],
                "endpoints": {"dev": [{"url": f"{upstream_url}/hook", "secret": "$Secret{HOOK}", "events": ["paid"]}]},
            },
            {
                "tag": "incoming",
                "receive": {"dev": {"path": "/incoming", "verify": "none", "dispatch": {"publish": "events:received"}}},
            },
        ],
        "databases": [
            {
                "tag": "main",
                "envs": {"dev": {"type": "sqlite", "path": "tsclient.db"}},
                "migrations": [
                    {
                        "tag": "create_users",
                        "up": [
                            "CREATE TABLE users (id VARCHAR(64) PRIMARY KEY, email VARCHAR(254) NOT NULL UNIQUE,"
                            " name VARCHAR(200))"
                        ],
                        "down": ["DROP TABLE users"],
                    }
                ],
                "actions": [
                    {
                        "tag": "add_user",
                        "type": "create",
                        "query": "INSERT INTO users (id, email, name) VALUES (:id, :email, :name)",
                        "params": {
                            "id": "$Input{data}{id}",
                            "email": "$Input{data}{email}",
                            "name": "$Input{data}{name}",
                        },
                        "input": {
                            "data": {
                                "id": {"type": "string", "required": True},
                                "email": {"type": "email", "required": True},
                                "name": {"type": "string", "default": ""},
                            }
                        },
                    },
                    {
                        "tag": "find_user",
                        "type": "read",
                        "query": "SELECT id, email, name FROM users WHERE email = {{email}}",
                        "input": {"filter": {"email": {"type": "email", "required": True}}},
                    },
                ],
            }
        ],
        "notifications": [
            {
                "tag": "users",
                "envs": {"dev": {"email": {"provider": "log"}, "sms": {"provider": "log"}}},
                "messages": [
                    {
                        "tag": "welcome",
                        "email": {"subject": "Welcome, {{name}}", "text": "Hello {{name}}."},
                        "sms": {"body": "Hello {{name}}!"},
                    }
                ],
            }
        ],
        "features": [
            {
                "tag": "greet",
                "input": {"email": {"type": "email", "required": True}, "slow": {"type": "boolean", "default": False}},
                "sequence": [
                    {
                        "tag": "echo",
                        "events": [
                            {
                                "tag": "echo",
                                "type": "action",
                                "event": "echo:echo",
                                "input": {"body": {"email": "$Input{email}"}},
                            }
                        ],
                    },
                    {
                        "tag": "slow",
                        "parents": ["echo"],
                        "events": [
                            {
                                "tag": "wait",
                                "type": "action",
                                "event": "echo:slow",
                                "condition": {"left": "$Input{slow}"},
                            }
                        ],
                    },
                ],
                "output": {"echoed": "$Sequence{echo}{echo}"},
            }
        ],
        "sessions": [
            {
                "tag": "user",
                "schema": {"userId": {"type": "string", "required": True}, "email": {"type": "email"}},
                "selector": "$Session{userId}",
                "expiry": "15m",
                "refresh_expiry": "1d",
            }
        ],
    }
    return json.dumps(document).encode()


async def echo(request: web.Request) -> web.Response:
    return json_answer({"received": await request.json()})


async def slow(request: web.Request) -> web.Response:
    await asyncio.sleep(3)
    return json_answer({"late": True})


async def run_node(node: str, args: list[str], env: dict[str, str], timeout: float = 240) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        node,
        *args,
        cwd=PACKAGE,
        env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        output, _ = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        process.kill()
        output, _ = await process.communicate()
    return process.returncode or 0, output.decode(errors="replace")


_built: list[str] = []


async def built_package() -> str:
    """Build the package (tsc, once per run); the path of `node`."""
    node = typescript_toolchain()
    if not _built:
        tsc = str(PACKAGE / "node_modules" / "typescript" / "bin" / "tsc")
        code, output = await run_node(node, [tsc, "-p", "."], {})
        assert code == 0, f"tsc failed:\n{output}"
        _built.append(node)
    return node


async def test_the_typescript_client_suite(start_server: ServerFactory, upstream: Upstream, tmp_path: Path) -> None:
    node = await built_package()
    upstream.on("POST /echo", echo)
    upstream.on("GET /slow", slow)
    secrets = tmp_path / "secrets.env"
    secrets.write_text(f"HOOK=whsec_{base64.b64encode(b'a test secret of 32 bytes, ok?!!').decode()}\n")
    server = await start_server(execution_flush_s=0.05, secrets_file=secrets)
    await server.client.product.apply(manifest(upstream.url))
    webhooks = server.app.components.webhook_http
    assert webhooks is not None
    await webhooks.ensure()  # the receive listener, as the periodic check opens it
    pki = make_pki(tmp_path)
    keyed = await start_server(
        secrets_file=secrets,
        api_key_hashes=[hash_key(API_KEY)],
        tls_cert=pki["server_cert"],
        tls_key=pki["server_key"],
        tls_client_ca=pki["ca"],
    )
    await keyed.client.close()  # plaintext: this one speaks TLS with client certificates
    keyed_address = f"localhost:{keyed.port}"
    async with Processor(
        keyed_address,
        api_key=API_KEY,
        root_certificates=pki["ca"].read_bytes(),
        certificate_chain=pki["client_cert"].read_bytes(),
        private_key=pki["client_key"].read_bytes(),
    ) as with_cert:
        await with_cert.product.apply(manifest(upstream.url))
    env = {
        "PROCESSOR_ADDRESS": server.address,
        "PROCESSOR_WEBHOOKS_URL": f"http://127.0.0.1:{webhooks.port}/webhooks/tsclient/dev",
        "PROCESSOR_KEYED_ADDRESS": keyed_address,
        "PROCESSOR_API_KEY": API_KEY,
        "PROCESSOR_TLS_CA": str(pki["ca"]),
        "PROCESSOR_TLS_CLIENT_CERT": str(pki["client_cert"]),
        "PROCESSOR_TLS_CLIENT_KEY": str(pki["client_key"]),
    }
    tests = sorted(str(path.relative_to(PACKAGE)) for path in (PACKAGE / "test").glob("*.test.mjs"))
    code, output = await run_node(node, ["--test", "--test-reporter=spec", *tests], env)
    print(output)
    assert code == 0, f"node --test failed:\n{output}"


async def test_the_readme_first_typescript_calls_work(
    start_server: ServerFactory, mailer_stub: None, tmp_path: Path
) -> None:
    node = await built_package()
    readme = (ROOT / "README.md").read_text()
    code = readme.split("```ts\n", 1)[1].split("```", 1)[0]
    running = await start_server(manifests=[EXAMPLE], secrets_file=ROOT / "examples" / "secrets.env")
    script = tmp_path / "first_calls.mjs"  # the snippet is plain JavaScript too
    script.write_text(code.replace("127.0.0.1:50051", running.address))
    (tmp_path / "node_modules" / "@ductape").mkdir(parents=True)
    (tmp_path / "node_modules" / "@ductape" / "processor").symlink_to(PACKAGE)
    code_, output = await run_node(node, [str(script)], {})
    assert code_ == 0, output
    lines = output.splitlines()
    assert re.fullmatch(r"202 msg-1 \S+", lines[0]), lines
    assert lines[1:] == ["{ userId: 'u-1' } 1", "PRODUCT_NOT_FOUND { product: 'blog' }"], lines


async def test_npm_pack_builds_a_package_with_types_and_no_tests() -> None:
    await built_package()
    npm = shutil.which("npm")
    assert npm is not None, "node is installed without npm"
    process = await asyncio.create_subprocess_exec(
        npm, "pack", "--dry-run", "--json", cwd=PACKAGE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    output, errors = await process.communicate()
    assert process.returncode == 0, errors.decode()
    [packed] = json.loads(output)
    files = {entry["path"] for entry in packed["files"]}
    assert {"package.json", "README.md", "dist/index.js", "dist/index.d.ts", "dist/gen/google/rpc/status.js"} <= files
    assert not [name for name in files if name.startswith(("test/", "bench/", "node_modules/"))], sorted(files)
    assert packed["name"] == "@ductape/processor"
