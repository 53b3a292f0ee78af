"""The NATS adapter's record of its messages (`nats_deliveries.Deliveries`): the attempt it reports and the copies it
does not hand out again, on a server that loses redeliveries (before 2.10.16) and on a fixed one. The server fault
itself is replayed against the real server in test_broker_nats.py."""

from __future__ import annotations

from nats.aio.client import ServerVersion

from ductape_processor.adapters.brokers.nats_deliveries import Deliveries, Repeat, loses_redeliveries

KEY = ("workers__orders_1a2b", 7)


def test_servers_before_2_10_16_or_of_unknown_version_count_on_the_processor() -> None:
    assert loses_redeliveries(ServerVersion("2.9.10"))
    assert loses_redeliveries(ServerVersion("2.10.15"))
    assert loses_redeliveries(ServerVersion("0.0.0-unknown"))
    assert loses_redeliveries(ServerVersion("not a version"))
    assert not loses_redeliveries(ServerVersion("2.10.16"))
    assert not loses_redeliveries(ServerVersion("2.11.0"))


def test_a_delivery_the_server_lost_is_not_an_attempt() -> None:
    deliveries = Deliveries()
    deliveries.arrived(KEY, 1)
    assert deliveries.hand_out(KEY, 1) == 1
    deliveries.returned(KEY)  # the client's deadline passed: nak'd
    # the server counted a redelivery it sent nowhere; after ack_wait the message comes as num_delivered 3
    deliveries.arrived(KEY, 3)
    assert deliveries.hand_out(KEY, 3) == 2


def test_a_copy_that_sat_unseen_in_a_subscriber_buffer_is_not_an_attempt() -> None:
    deliveries = Deliveries()
    deliveries.arrived(KEY, 1)  # reached a held subscriber, never handed out; back after ack_wait
    deliveries.arrived(KEY, 2)
    assert deliveries.hand_out(KEY, 2) == 1


def test_a_message_first_seen_here_carries_the_servers_count() -> None:
    deliveries = Deliveries()
    deliveries.arrived(KEY, 3)  # another processor's clients had it twice
    assert deliveries.hand_out(KEY, 3) == 3
    deliveries.returned(KEY)
    assert deliveries.hand_out(KEY, 4) == 4


def test_unseen_returns_are_not_attempts_and_released_copies_come_out_again() -> None:
    deliveries = Deliveries()
    deliveries.arrived(KEY, 1)
    assert deliveries.hand_out(KEY, 1) == 1
    deliveries.returned_unseen(KEY)  # the engine released it before writing it
    assert deliveries.hand_out(KEY, 2) == 1


def test_copies_of_a_message_held_or_acked_here_are_not_handed_out() -> None:
    deliveries = Deliveries()
    deliveries.arrived(KEY, 1)
    assert deliveries.hand_out(KEY, 1) == 1
    assert deliveries.hand_out(KEY, 1) is Repeat.OUT  # the server handed it out again while a client holds it
    deliveries.acked(KEY)
    assert deliveries.hand_out(KEY, 1) is Repeat.ACKED


def test_a_fixed_server_keeps_its_count_less_the_unseen_returns() -> None:
    deliveries = Deliveries()
    deliveries.own_count = False
    deliveries.arrived(KEY, 1)
    assert deliveries.hand_out(KEY, 1) == 1
    deliveries.returned_unseen(KEY)
    assert deliveries.hand_out(KEY, 2) == 1
    deliveries.returned(KEY)
    assert deliveries.hand_out(KEY, 4) == 3  # another consumer had it once in between
