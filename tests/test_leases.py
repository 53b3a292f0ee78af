"""The claiming of due work that jobs and webhook deliveries share (runtime/policies/leases.py): rounds that sleep
until the next due moment and wake only for work due sooner, and heartbeats of the leases of work going."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta

from ductape_processor.runtime.policies.leases import ClaimedWork, ClaimLimits, ClaimRounds, EndBatches, LeaseRenewer
from ductape_processor.store.job_records import new_job_payload
from tests.jobs_harness import START, FakeClock, until


async def test_claim_rounds_wait_for_the_next_moment_and_wake_only_for_work_due_before_it() -> None:
    clock = FakeClock()
    claims: list[datetime] = []
    due = [START + timedelta(seconds=60)]

    async def claim() -> bool:
        claims.append(clock.now())
        if due[0] <= clock.now():
            due[0] += timedelta(days=1)  # claimed: the next piece of work is due tomorrow
        return False

    async def next_moment() -> datetime:
        return due[0]

    rounds = ClaimRounds("test rounds", claim, next_moment, clock, poll_s=300)
    rounds.start()
    try:
        await until(lambda: len(claims) == 1, "the first round")
        await asyncio.sleep(0.05)  # the round reads the next moment and waits for it
        rounds.wake_by(START + timedelta(seconds=90))  # due after the rounds look anyway
        await asyncio.sleep(0.05)
        assert len(claims) == 1
        rounds._heard(new_job_payload("shop", START + timedelta(seconds=120)))  # another replica's, due later too
        await asyncio.sleep(0.05)
        assert len(claims) == 1
        rounds.wake_by(START + timedelta(seconds=30))
        await until(lambda: len(claims) == 2, "a round for work due before the next moment")
        rounds._heard("shop")  # a change that names no due moment
        await until(lambda: len(claims) == 3, "a round for another replica's change")
        clock.advance(timedelta(seconds=60))
        await until(lambda: len(claims) == 4, "the round at the next moment")
        await asyncio.sleep(0.05)
        assert len(claims) == 4
    finally:
        await rounds.stop()


async def test_claim_rounds_claim_again_at_once_while_claims_come_back_full() -> None:
    clock = FakeClock()
    left = [3]

    async def claim() -> bool:
        left[0] -= 1
        return left[0] > 0

    async def next_moment() -> None:
        return None

    rounds = ClaimRounds("test rounds", claim, next_moment, clock, poll_s=300)
    rounds.start()
    try:
        await until(lambda: left[0] == 0, "three rounds without the clock moving")
    finally:
        await rounds.stop()


async def test_a_lease_renewer_beats_every_third_of_a_lease_and_drops_work_taken_over() -> None:
    clock = FakeClock()
    calls: list[tuple[list[str], datetime]] = []

    async def renew(keys: list[str], until_: datetime) -> set[str]:
        calls.append((sorted(keys), until_))
        return {key for key in keys if key != "lost"}

    renewer = LeaseRenewer("test leases", renew, clock, timedelta(seconds=30))
    renewer.hold("a")
    renewer.hold("lost")
    renewer.hold("done")
    renewer.release("done")
    renewer.start()
    try:
        await asyncio.sleep(0.05)
        assert calls == []  # nothing before a third of the lease
        clock.advance(timedelta(seconds=10))
        await until(lambda: len(calls) == 1, "the first heartbeat")
        assert calls[0] == (["a", "lost"], START + timedelta(seconds=40))
        clock.advance(timedelta(seconds=10))
        await until(lambda: len(calls) == 2, "the second heartbeat")
        assert calls[1] == (["a"], START + timedelta(seconds=50))  # "lost" is another replica's now
    finally:
        await renewer.stop()


async def test_claimed_work_claims_only_the_room_left_by_running_and_reserved_pieces() -> None:
    clock = FakeClock()
    asked: list[int] = []
    gate = asyncio.Event()

    async def piece() -> None:
        await gate.wait()

    async def claim(free: int) -> int:
        asked.append(free)
        for _ in range(free):
            work.run(piece())
        return free

    async def next_moment() -> datetime | None:
        return None

    work = ClaimedWork("test work", claim, next_moment, clock, ClaimLimits(poll_s=300, claim_batch=4, concurrency=6))
    assert work.reserve(4) == 4  # an emit's deliveries, held for this replica
    assert work.reserve(5) == 2  # only the room left
    assert work.reserve(1) == 0
    work.run(piece(), reserved=True)  # one was stored leased; the other five were not
    work.release(5)
    work.rounds.start()
    try:
        # 6 - 1 running leaves 5: a batch of 4, and the claim came back full, so at once the last 1.
        await until(lambda: asked == [4, 1], "claims of the room left")
        work.wake()
        await asyncio.sleep(0.05)
        assert asked == [4, 1]  # full: no claim until a piece ends
        gate.set()
        await until(lambda: len(asked) >= 3, "a claim once pieces ended")
    finally:
        await work.stop(1.0)


async def test_end_batches_write_what_came_in_meanwhile_together_and_a_linger_gathers_more() -> None:
    written: list[list[int]] = []
    entered = asyncio.Event()
    release = asyncio.Event()

    async def write(batch: list[int]) -> None:
        written.append(list(batch))
        entered.set()
        await release.wait()

    ends = EndBatches("test ends", write, batch=100)
    ends.add(1)
    await asyncio.wait_for(entered.wait(), 5)
    ends.add(2)
    ends.add(3)  # while the first write is on its way
    release.set()
    await until(lambda: len(written) == 2, "the second write")
    assert written == [[1], [2, 3]]
    await ends.close()

    lingering: list[list[int]] = []

    async def keep(batch: list[int]) -> None:
        lingering.append(list(batch))

    slow = EndBatches("test lingering ends", keep, batch=100, linger_s=0.2)
    slow.add(1)
    await asyncio.sleep(0.05)
    slow.add(2)
    await until(lambda: bool(lingering), "the lingering write")
    assert lingering == [[1, 2]]
    await slow.close()
