"""Fault: a subscriber process frozen with SIGSTOP (its connection stays open) next to a live one in the same group.

Each broker type: the live subscriber must get every message, none may reach the dead-letter topic unprocessed, and
no delivery attempt may be counted beyond the one the frozen client really got. Prints the figures per broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from ductape.processor.brokers import Message

from tests.conftest import Running
from tests.test_brokers import (  # noqa: F401 - `broker` and `_forget_pending_reads` are fixtures
    _forget_pending_reads,
    broker,
    opened,
    publish,
    subscribe,
    take,
)

pytestmark = pytest.mark.faults

SENT = 20
OPTIONS = {"max_batch": 5, "ack_deadline": 1.0, "max_deliveries": 2, "dead_letter_event": "events:dead"}
FROZEN_CLIENT = """
import asyncio, os, signal, sys
from ductape.processor import Processor

async def main() -> None:
    client = Processor(sys.argv[1], timeout=10)
    sub = client.message_broker.subscribe(
        product="shop", env="dev", event="events:orders", group="workers",
        max_batch=5, ack_deadline=1.0, max_deliveries=2, dead_letter_event="events:dead",
    )
    reading = asyncio.ensure_future(anext(sub.__aiter__()))
    while sub._call is None:
        await asyncio.sleep(0.01)
    print("ready", flush=True)
    os.kill(os.getpid(), signal.SIGSTOP)  # frozen from here on, connection open, nothing read or acked
    await reading

asyncio.run(main())
"""


def _stopped(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0] == "T"


async def _collect(iterator: AsyncIterator[Message], into: list[Message]) -> None:
    while True:
        [message] = await take(iterator, 1, timeout=3600)
        into.append(message)
        await message.ack()


async def test_a_frozen_subscriber_does_not_keep_or_burn_the_groups_messages(
    broker: Running,  # noqa: F811
) -> None:
    kind: str = broker.kind  # type: ignore[attr-defined]
    dead = subscribe(broker, "dl", event="events:dead")
    dead_messages = await opened(dead)
    frozen = await asyncio.create_subprocess_exec(
        sys.executable, "-c", FROZEN_CLIENT, broker.address, stdout=asyncio.subprocess.PIPE
    )
    assert frozen.stdout is not None
    try:
        assert (await asyncio.wait_for(frozen.stdout.readline(), 20)).strip() == b"ready"
        for _ in range(200):
            if _stopped(frozen.pid):
                break
            await asyncio.sleep(0.01)
        assert _stopped(frozen.pid)
        live = subscribe(broker, "workers", **OPTIONS)
        live_messages = await opened(live)
        received: list[Message] = []
        buried: list[Message] = []
        workers = [
            asyncio.ensure_future(_collect(live_messages, received)),
            asyncio.ensure_future(_collect(dead_messages, buried)),
        ]
        started = time.monotonic()
        await publish(broker, *[f"m{n}" for n in range(SENT)])
        recovered = None
        try:
            async with asyncio.timeout(20):
                while len({m.id for m in received}) < SENT:
                    await asyncio.sleep(0.02)
                recovered = time.monotonic() - started
            await asyncio.sleep(2.5)  # past two more ack deadlines: nothing may move on to the dead-letter topic
        except TimeoutError:
            pass
        finally:
            for worker in workers:
                worker.cancel()
        distinct = {m.id for m in received}
        attempts = sorted({m.delivery_attempt for m in received})
        print(
            f"\nfrozen subscriber [{kind}]: sent {SENT}, received {len(distinct)}, "
            f"duplicates {len(received) - len(distinct)}, lost {SENT - len(distinct) - len(buried)}, "
            f"dead-lettered {len(buried)}, recovery time "
            + (f"{recovered:.2f} s" if recovered is not None else "none")
            + f", attempts seen {attempts}"
        )
        assert buried == [], "dead-lettered without a live consumer having had them"
        assert len(distinct) == SENT, "the live subscriber must get every message"
        assert attempts and max(attempts) <= 2, "one attempt for the frozen client at most, one for the live one"
        await live.close()
        await dead.close()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(frozen.pid, signal.SIGKILL)
        await frozen.wait()
