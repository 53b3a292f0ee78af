"""Fixtures of the fault tests."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from tests.faults.replicas import Replica


@pytest.fixture
async def replicas() -> AsyncIterator[list[Replica]]:
    """The replicas a test starts (append them); killed and reaped afterwards."""
    started: list[Replica] = []
    yield started
    for replica in started:
        await replica.client.close()
        if replica.process.returncode is None:
            replica.process.kill()
        await replica.process.wait()
        replica.drain.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await replica.drain
