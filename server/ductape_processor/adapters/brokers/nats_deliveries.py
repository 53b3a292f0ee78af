"""What one processor did with each message of its NATS consumers: the delivery attempt it reports, and copies it
must not hand out again.

JetStream's `num_delivered` counts every delivery to a pull request, and nats-server before 2.10.16 counts one that
went nowhere: when it picks a redelivery (a nak'd or timed-out message) for a pull request that is gone by then
(expired on the server but not yet swept, or its inbox without a subscriber), it counts the delivery, sends it to
nobody, and the message comes back only after `ack_wait`, one attempt higher. Before 2.10.14 it also steps its
stream position back, so the newest message it had handed out goes out again with num_delivered 1, acked or not
(nats-server #5305; fixed in 2.10.14 and, for the count, 2.10.16). Any nak can meet such a request: pull requests
expire all the time (ours every `nats_pull.PULL_EXPIRES_MAX_S`), and under load the server sweeps them late. A
message written once to a frozen subscriber and nak'd at its deadline then reached a live one with attempt 3, and a
group with max_deliveries 2 dead-lettered it unprocessed, while the live one got another message twice.

So the adapter keeps its own record per message (consumer and stream sequence), from its first arrival here, for
the last `REMEMBERED` messages:
- the deliveries JetStream counted before the message first reached this processor;
- the deliveries to clients this processor made (handed to a stream and not given back unseen), and the returns of
  messages no client saw (the engine's releases, what reached a closing subscriber), which JetStream counts too;
- whether the message is out (handed out, not yet settled) or acked.
A copy of a message that is out here is not handed out again (the holder's ack or nack settles it: JetStream acks
by stream sequence), and a copy of one acked here is acked again and dropped.

The attempt reported is, on a server that loses redeliveries, the count the message had on arrival plus this
processor's own (its clients' deliveries, plus one), so a copy that sat unseen in a subscriber's buffer until
ack_wait costs nothing either; on a fixed server, JetStream's count minus the unseen returns. A message first seen
here, or forgotten, carries JetStream's count. With several processor replicas each counts its own clients'
deliveries, so on an affected server a message that moves between replicas can get up to max_deliveries attempts
through each before it is dead-lettered; within one processor none is dead-lettered for deliveries the server lost.
"""

from __future__ import annotations

import enum
from typing import Final

from nats.aio.client import ServerVersion

from ductape_processor.runtime.policies.caches import BoundedCache

REMEMBERED: Final = 100_000
"""Messages one adapter keeps a record of (the least recently touched go first)."""

FIXED_IN: Final = (2, 10, 16)
"""The first nats-server that neither loses nor repeats a redelivery it cannot send (see the module)."""

Key = tuple[str, int]  # consumer name, stream sequence


class Repeat(enum.Enum):
    """A copy of a message this processor has already: not handed out."""

    OUT = "out"  # handed out here and not settled yet: its holder settles it
    ACKED = "acked"  # acked here: ack the copy too


class _Record:
    __slots__ = ("acked", "before", "out", "seen", "unseen")

    def __init__(self, num_delivered: int) -> None:
        self.before = num_delivered - 1  # deliveries JetStream counted before the message first came here
        self.seen = 0  # deliveries to clients by this processor
        self.unseen = 0  # returns of messages no client saw (JetStream counted each as a delivery)
        self.out = False
        self.acked = False


def loses_redeliveries(version: ServerVersion) -> bool:
    """Whether a nats-server of this version can lose a redelivery (and count it); an unknown version may."""
    try:
        return (version.major, version.minor, version.patch) < FIXED_IN
    except (ValueError, TypeError):
        return True


class Deliveries:
    """One adapter's record of its consumers' messages (see the module)."""

    __slots__ = ("_records", "own_count")

    def __init__(self, size: int = REMEMBERED) -> None:
        self._records = BoundedCache[Key, _Record](size)
        self.own_count = True  # set on connecting, from the server's version (`loses_redeliveries`)

    def _record(self, key: Key, num_delivered: int = 1) -> _Record:
        record = self._records.get(key)
        if record is None:
            record = _Record(num_delivered)
            self._records.put(key, record)
        return record

    def arrived(self, key: Key, num_delivered: int) -> None:
        """A message reached one of this processor's subscribers (a new record keeps JetStream's count so far)."""
        if self._records.get(key) is None:
            self._records.put(key, _Record(num_delivered))

    def hand_out(self, key: Key, num_delivered: int) -> int | Repeat:
        """A message is handed to a stream: the delivery attempt to report, or the `Repeat` of a copy we have."""
        record = self._record(key, num_delivered)
        if record.acked:
            return Repeat.ACKED
        if record.out:
            return Repeat.OUT
        own = record.before + record.seen + 1
        attempt = own if self.own_count else max(num_delivered - record.unseen, 1)
        record.seen += 1
        record.out = True
        return attempt

    def returned_unseen(self, key: Key) -> None:
        """A message handed out went back before any client saw it (the engine's release)."""
        record = self._record(key)
        record.seen = max(record.seen - 1, 0)
        record.unseen += 1
        record.out = False

    def arrived_unseen(self, key: Key) -> None:
        """A message reached a subscriber that gave it back without handing it out (closing, or closed)."""
        self._record(key).unseen += 1

    def returned(self, key: Key) -> None:
        """A message handed out was nak'd: it is no longer out here."""
        record = self._records.get(key)
        if record is not None:
            record.out = False

    def acked(self, key: Key) -> None:
        """A message was acked (or dead-lettered): a copy that comes again is acked and dropped."""
        record = self._record(key)
        record.out = False
        record.acked = True
