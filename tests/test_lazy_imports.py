"""A processor loads only what its products use: the idle footprint (bench/README.md's idle RSS goal, 80 MB) depends
on heavy libraries staying out of the import of the server until a call needs them."""

from __future__ import annotations

import subprocess
import sys

import pytest

LAZY = {
    "cryptography": "sessions, credential auths' sealed tokens and signed storage URLs import it on first use",
    "opentelemetry.sdk": "setup_telemetry imports the SDK only when spans or metrics are exported",
    "opentelemetry.exporter": "the OTLP exporters load only when an endpoint is configured",
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
