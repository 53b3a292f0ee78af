"""Action calls with an idempotency key: of the calls sharing a key one runs, the others wait for its answer.

The key's limit, its record and the claim are the policy's (`runtime/policies/idempotency.py`); this module is the
action's side of it: the header that tells the upstream the key, the lease kept while the call runs, and the answer
recorded under the key together with the call's execution record.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from ductape_processor.adapters.http.encoding import canonical_json
from ductape_processor.errors import FailedPrecondition, InvalidArgument, ProcessorError, Unavailable
from ductape_processor.reasons import Reason
from ductape_processor.runtime.actions.call import ActionResult, CallState, outcome
from ductape_processor.runtime.logs.recorder import ExecutionRecorder
from ductape_processor.runtime.policies.deadline import Deadline
from ductape_processor.runtime.policies.idempotency import claim, idempotency_key_problem, key_reused, record_key
from ductape_processor.store.base import ExecutionRecord, IdempotencyRecord, Store

log = logging.getLogger(__name__)

IDEMPOTENCY_LEASE_S: Final = 5.0
"""How long an idempotency claim outlives its owner's last renewal: the longest a repeat waits after a replica died."""
_COMPLETE_FOR_S = 60.0
"""How long an answer whose recording failed is retried (the owner keeps its lease meanwhile)."""
_PRINTABLE_ASCII = re.compile(r"[\x20-\x7e]*")


class IdempotentCalls:
    """Runs action calls that carry an idempotency key. One instance per executor; safe for concurrent calls."""

    def __init__(self, store: Store, recorder: ExecutionRecorder, retention: timedelta) -> None:
        self._store = store
        self._recorder = recorder
        self._retention = retention
        self._inflight: dict[str, asyncio.Future[None]] = {}
        self._completing: set[asyncio.Task[None]] = set()
        self._owner = os.urandom(8).hex()

    async def run(
        self, state: CallState, checked: dict[str, Any], send: Callable[[], Awaitable[ActionResult]]
    ) -> ActionResult:
        """The answer to the call: `send()`'s when this call claims the key, else the recorded answer of the call
        that did (waiting for it while it runs). The execution record is written with the answer."""
        call = state.call
        problem = idempotency_key_problem(call.idempotency_key)
        if problem is not None:
            raise InvalidArgument.field("idempotency_key", problem)
        header = state.plan.app.idempotency_header
        if header:
            if not _PRINTABLE_ASCII.fullmatch(call.idempotency_key):
                raise InvalidArgument.field(
                    "idempotency_key", f"must be printable ASCII: it is sent to the upstream in the {header} header"
                )
            # The IETF draft's Idempotency-Key is a structured-field string: quoted, with \ and " escaped.
            quoted = call.idempotency_key.replace("\\", "\\\\").replace('"', '\\"')
            state.upstream_headers = {header: f'"{quoted}"'}
        key = record_key((call.product, state.resolved.env.slug), call.idempotency_key)
        session = state.session if state.plan.uses_session else None
        request_hash = hashlib.sha256(canonical_json([call.app, call.event, checked, session]).encode()).hexdigest()
        owner = f"{self._owner}:{self._recorder.new_id()}"
        lease = timedelta(seconds=IDEMPOTENCY_LEASE_S)

        async def wait(record: IdempotencyRecord) -> None:
            if record.state == "sent" and record.lease_until <= datetime.now(UTC):
                raise Unavailable(
                    "the call holding this idempotency key ended without recording the upstream's answer (its "
                    "replica stopped or the store failed); the request may have reached the upstream, so it is not "
                    "sent again. Retry later to get the answer if it is recorded, or check with the upstream",
                    reason=Reason.IDEMPOTENCY_OUTCOME_UNKNOWN,
                    metadata={"idempotency_key": call.idempotency_key},
                )
            await self._wait_for(key, state.deadline)

        while True:
            answer = await claim(
                self._store,
                key,
                request_hash,
                owner,
                lease=lease,
                retention=self._retention,
                reused=lambda: key_reused("request", call.idempotency_key),
                wait=wait,
            )
            if answer is not None:
                return ActionResult.decode(answer)
            try:
                if await self._store.idempotency_mark_sent(key, owner, datetime.now(UTC) + lease):
                    break
            except ProcessorError:
                await self._release(key, owner)
                raise
            # the claim was taken over between the two statements: look again
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._inflight[key] = done
        renewing = asyncio.get_running_loop().create_task(self._renew(key, owner), name="idempotency-lease")
        try:
            result = await send()
        except BaseException:
            renewing.cancel()
            await self._release(key, owner)
            raise
        finally:
            self._inflight.pop(key, None)
            done.set_result(None)
        status, reason = outcome(result)
        execution = state.execution(state.process_id, state.started, status, reason, cached=False)
        await self._complete(key, owner, result, execution, renewing)
        state.recorded = True
        return result

    async def _renew(self, key: str, owner: str) -> None:
        """Keep the claim's lease ahead while the call runs, so a dead replica's claim ends within one lease."""
        pause = IDEMPOTENCY_LEASE_S / 3
        while True:
            await asyncio.sleep(pause)
            try:
                held = await self._store.idempotency_renew(
                    key, owner, datetime.now(UTC) + timedelta(seconds=IDEMPOTENCY_LEASE_S)
                )
            except ProcessorError as exc:
                log.warning("idempotency: renewing the lease of a key failed (%s); trying again", exc.message)
                pause = 0.2  # the lease is running out: try again soon
                continue
            if not held:
                return
            pause = IDEMPOTENCY_LEASE_S / 3

    async def _release(self, key: str, owner: str) -> None:
        """Give the claim up; if the store fails, its lease ends it (a sent claim then answers OUTCOME_UNKNOWN)."""
        try:
            await self._store.idempotency_release(key, owner)
        except ProcessorError as exc:
            log.warning("idempotency: releasing a key failed (%s); its lease will end it", exc.message)

    async def _complete(
        self, key: str, owner: str, result: ActionResult, record: ExecutionRecord, renewing: asyncio.Task[None]
    ) -> None:
        """Record the answer under the key, with the execution record in the same transaction, before the caller
        gets it (so a kill -9 cannot lose the record of an answered idempotent call). The caller gets the answer also
        when the store fails now: the record is queued, and the answer is recorded in the background for up to
        `_COMPLETE_FOR_S` while the lease is kept, so repeats wait for it and then get it; only if it never lands do
        repeats answer IDEMPOTENCY_OUTCOME_UNKNOWN."""
        try:
            await self._store.idempotency_complete(key, owner, result.encode(), record)
        except ProcessorError as exc:
            log.warning("idempotency: recording an answer failed (%s); retrying in the background", exc.message)
            self._recorder.record(record)
            task = asyncio.get_running_loop().create_task(
                self._complete_later(key, owner, result.encode(), record, renewing), name="idempotency-complete"
            )
            self._completing.add(task)
            task.add_done_callback(self._completing.discard)
        else:
            renewing.cancel()

    async def _complete_later(
        self, key: str, owner: str, response: bytes, record: ExecutionRecord, renewing: asyncio.Task[None]
    ) -> None:
        try:
            give_up = time.monotonic() + _COMPLETE_FOR_S
            delay = 0.05
            while time.monotonic() < give_up:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
                try:
                    await self._store.idempotency_complete(key, owner, response, record)
                except ProcessorError:
                    continue
                log.info("idempotency: a delayed answer was recorded")
                return
            log.error(
                "idempotency: an answer could not be recorded; repeats of its key answer IDEMPOTENCY_OUTCOME_UNKNOWN"
            )
        finally:
            renewing.cancel()

    async def _wait_for(self, key: str, deadline: Deadline) -> None:
        """Wait while another call holds the key: on this replica by its future, elsewhere by polling."""
        inflight = self._inflight.get(key)
        left = deadline.remaining()
        in_use = FailedPrecondition(
            "a call with this idempotency key is still running", reason=Reason.IDEMPOTENCY_KEY_IN_USE
        )
        if left is not None and left <= 0:
            raise in_use
        if inflight is not None:
            try:
                await asyncio.wait_for(asyncio.shield(inflight), left)
            except TimeoutError:
                raise in_use from None
        else:
            await asyncio.sleep(min(0.05, left) if left is not None else 0.05)
