"""A processor loads only what its products use: the idle footprint (bench/README.md's idle RSS goal, 80 MB) depends
on heavy libraries staying out of the import of the server until a call needs them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import EXAMPLE

LAZY = {
    "cryptography": "sessions, credential auths' sealed tokens and signed storage URLs import it on first use",
    "opentelemetry": "setup_telemetry imports the API, SDK and exporters only when spans or metrics are exported; "
    "a call's traceparent loads the API's propagator (telemetry/context.py)",
    "aiohttp": "actions, webhooks and notifications send over adapters/http/connection.py and the webhook listener "
    "serves on the loop's transports; aiohttp loads with the storage HTTP listener or the cloud storage SDKs",
    "jinja2": "notification templates import it when a product's notifications are checked or rendered",
    "asyncpg": "the PostgreSQL store and databases import it when one is opened",
    "redis": "the Redis broker loads through the broker registry on first use",
    "nats": "the NATS broker loads through the broker registry on first use",
    "aio_pika": "the RabbitMQ broker loads through the broker registry on first use",
    "asyncmy": "MySQL databases load their driver on first use",
    "aiosmtplib": "the SMTP channel loads on first use",
    "aiobotocore": "S3 storage loads on first use",
    "filetype": "the first save whose content type is sniffed imports it (runtime/storage/files.py)",
    "multiprocessing": "the manifest loader's worker process starts with the first large manifest",
    "concurrent.futures.process": "the manifest loader's worker process starts with the first large manifest",
    "ductape.processor.client": "the server imports the generated stubs only, not the Python client's facade",
}


@pytest.mark.parametrize("module", sorted(LAZY))
def test_serving_does_not_import_what_no_call_needed_yet(module: str) -> None:
    code = (
        "import sys\n"
        "import ductape_processor.cli, ductape_processor.app\n"
        f"print({module!r} in sys.modules or any(m.startswith({module + '.'!r}) for m in sys.modules))\n"
    )
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert found == "False", f"{module} is imported with the server: {LAZY[module]}"


def test_a_started_server_loads_neither_aiohttp_nor_jinja2_until_a_product_needs_them(tmp_path: Path) -> None:
    """Started and serving (store open, manifest applied, the webhook listener serving a receive path), a processor
    whose product declares no notifications has loaded neither aiohttp nor Jinja2."""
    manifest = tmp_path / "product.json"
    manifest.write_text(
        json.dumps(
            {
                "product": "lean",
                "environments": [{"slug": "dev"}],
                "apps": [
                    {
                        "tag": "api",
                        "envs": {"dev": {"base_url": "http://127.0.0.1:9"}},
                        "actions": [{"tag": "get", "method": "GET", "path": "/x"}],
                    }
                ],
                "webhooks": [{"tag": "hook", "receive": {"dev": {"path": "/hook", "verify": "none"}}}],
            }
        )
    )
    code = (
        "import asyncio, sys\n"
        "from pathlib import Path\n"
        "from ductape_processor.app import ProcessorApp\n"
        "from ductape_processor.settings import Settings\n"
        "async def main():\n"
        f"    settings = Settings(address='127.0.0.1:0', data_dir=Path({str(tmp_path / 'data')!r}),\n"
        f"                        manifests=[Path({str(manifest)!r})], webhook_http_address='127.0.0.1:0')\n"
        "    app = ProcessorApp(settings)\n"
        "    await app.start()\n"
        "    assert app.components.webhook_http.port, 'the listener serves'\n"
        "    await asyncio.sleep(0.2)\n"
        "    loaded = [m for m in ('aiohttp', 'jinja2') if m in sys.modules]\n"
        "    await app.stop()\n"
        "    print(loaded)\n"
        "asyncio.run(main())\n"
    )
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert found.strip().splitlines()[-1] == "[]"


def test_the_example_product_served_loads_only_jinja2_of_what_is_lazy(tmp_path: Path) -> None:
    """Started as bench_foundation.py starts it (the example product, its webhook listener serving), a processor
    has loaded none of the libraries above but Jinja2, which checks the example's notification templates; and of
    the manifest's models, only `Manifest` and the few the code used by themselves have their own validators."""
    code = (
        "import asyncio, json, sys\n"
        "from pathlib import Path\n"
        "from ductape_processor.app import ProcessorApp\n"
        "from ductape_processor.settings import Settings\n"
        "from ductape_processor.runtime.registry.fields import ManifestModel\n"
        "def models(base):\n"
        "    for sub in base.__subclasses__():\n"
        "        yield sub\n"
        "        yield from models(sub)\n"
        "async def main():\n"
        f"    settings = Settings(address='127.0.0.1:0', data_dir=Path({str(tmp_path / 'data')!r}),\n"
        f"                        manifests=[Path({str(EXAMPLE.parent)!r})], webhook_http_address='127.0.0.1:0')\n"
        "    app = ProcessorApp(settings)\n"
        "    await app.start()\n"
        "    assert app.components.webhook_http.port, 'the listener serves'\n"
        "    await asyncio.sleep(0.5)\n"
        f"    loaded = sorted(l for l in {sorted(LAZY)!r}\n"
        "                    if any(m == l or m.startswith(l + '.') for m in sys.modules))\n"
        "    every = set(models(ManifestModel))\n"
        "    built = sorted(model.__name__ for model in every if model.__pydantic_complete__)\n"
        "    await app.stop()\n"
        "    print(json.dumps({'loaded': loaded, 'models': len(every), 'built': built}))\n"
        "asyncio.run(main())\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "PROCESSOR_"))}  # as the bench does
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    result = json.loads(found.strip().splitlines()[-1])
    assert result["loaded"] == ["jinja2"]
    assert result["models"] > 50
    assert "Manifest" in result["built"]
    assert len(result["built"]) <= 8, f"manifest models built with their classes: {result['built']}"


def test_the_client_package_names_its_facade_without_importing_it_with_the_stubs() -> None:
    """`ductape.processor` runs when the server imports the stubs under it: its facade and errors load when first
    named, and every exported name still resolves (`from ductape.processor import Processor`)."""
    code = (
        "import sys\n"
        "import ductape.processor.v1.action_pb2\n"
        "before = sorted(m for m in sys.modules if m.startswith('ductape.processor.') and '.v1' not in m)\n"
        "import ductape.processor as package\n"
        "from ductape.processor import Processor, NotFoundError\n"
        "names = [n for n in package.__all__ if getattr(package, n).__module__.startswith('ductape.processor.')]\n"
        "listed = set(package.__all__) <= set(dir(package))\n"
        "print(before, Processor.__name__, NotFoundError.__name__, names == package.__all__, listed)\n"
        "try:\n    package.Missing\nexcept AttributeError as exc:\n    print(exc)\n"
    )
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert found.splitlines() == [
        "[] Processor NotFoundError True True",
        "module 'ductape.processor' has no attribute 'Missing'",
    ]


def test_a_callers_trace_context_passes_on_and_is_logged_without_the_api_loaded_first() -> None:
    """Telemetry off: the OpenTelemetry API is not loaded; a call that brings a `traceparent` still has it (checked
    by the propagator, imported then) on what it sends on, and its log lines carry its trace id."""
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    code = (
        "import io, logging, sys\n"
        "from ductape_processor.telemetry.context import CallInfo, current_call, outgoing_trace_context\n"
        "from ductape_processor.telemetry.logging import configure_logging\n"
        "stream = io.StringIO()\n"
        "configure_logging('INFO', 'json', stream)\n"
        f"current_call.set(CallInfo('/m', 'r-1', {traceparent!r}))\n"
        "logging.getLogger('t').info('hello')\n"
        "print('opentelemetry' in sys.modules, 'b7ad6b7169203331' in stream.getvalue())\n"
        "print(outgoing_trace_context())\n"
        "current_call.set(CallInfo('/m', 'r-2', '00-bad'))\n"
        "print(outgoing_trace_context(), 'opentelemetry.trace' in sys.modules)\n"
    )
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert found.splitlines() == ["False True", str({"traceparent": traceparent}), "{} True"]
