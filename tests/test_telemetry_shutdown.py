"""Stopping the processor is bounded when its OTLP collector is down or silent."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator

import pytest

from ductape_processor.telemetry.setup import TELEMETRY_FLUSH_TIMEOUT_S, setup_telemetry
from tests.conftest import EXAMPLE, Running, ServerFactory


@contextlib.asynccontextmanager
async def collector(kind: str) -> AsyncIterator[str]:
    """An OTLP endpoint that never answers: `silent` accepts connections and says nothing, `down` refuses them."""
    if kind == "down":
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        yield f"http://127.0.0.1:{port}"
        return
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        for writer in held:
            writer.close()
        server.close()


async def test_stop_is_bounded_when_the_collector_is_silent_or_down(
    start_server: ServerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with collector("silent") as silent, collector("down") as down:
        servers = []
        for endpoint in (silent, down):
            monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
            telemetry = setup_telemetry()
            assert telemetry.enabled
            running = await start_server(telemetry=telemetry, manifests=[EXAMPLE])
            for _ in range(3):  # spans and histogram points waiting to be exported
                await running.client.product.get("shop")
            await running.client.close()
            servers.append(running)

        async def stop(running: Running) -> float:
            started = time.monotonic()
            await running.app.stop(grace=0)
            return time.monotonic() - started

        # Both stops run at once so that the test costs one flush bound, not two.
        silent_s, down_s = await asyncio.gather(*(stop(running) for running in servers))
    bound = TELEMETRY_FLUSH_TIMEOUT_S + 1.0
    assert silent_s < bound, f"stop took {silent_s:.1f}s with a silent collector"
    assert down_s < bound, f"stop took {down_s:.1f}s with a collector that is down"
