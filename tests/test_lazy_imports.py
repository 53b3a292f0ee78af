"""A processor loads only what its products use: the idle footprint (bench/README.md's idle RSS goal, 80 MB) depends
on heavy libraries staying out of the import of the server until a call needs them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

LAZY = {
    "cryptography": "sessions, credential auths' sealed tokens and signed storage URLs import it on first use",
    "opentelemetry.sdk": "setup_telemetry imports the SDK only when spans or metrics are exported",
    "opentelemetry.exporter": "the OTLP exporters load only when an endpoint is configured",
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
