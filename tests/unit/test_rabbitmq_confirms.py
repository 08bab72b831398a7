"""Publisher-confirm accounting of the RabbitMQ target: every order the broker
may confirm in settles each message once. No broker needed."""

from __future__ import annotations

from types import SimpleNamespace

from pika.spec import Basic

from sluice.connectors.rabbitmq.target import _Confirms


def confirms(published: int) -> _Confirms:
    c = _Confirms()
    c.published = c.target = published
    return c


def ack(tag: int, multiple: bool = False) -> SimpleNamespace:
    return SimpleNamespace(method=Basic.Ack(delivery_tag=tag, multiple=multiple))


def nack(tag: int, multiple: bool = False) -> SimpleNamespace:
    return SimpleNamespace(method=Basic.Nack(delivery_tag=tag, multiple=multiple))


def test_one_multiple_ack_settles_all() -> None:
    c = confirms(5)
    c.on_confirm(ack(3, multiple=True))
    assert not c.settled()
    c.on_confirm(ack(5, multiple=True))
    assert c.settled() and c.nacked == 0


def test_nacks_before_a_multiple_ack_below_them() -> None:
    # What RabbitMQ sends when a reject-publish queue is full after 2 messages.
    c = confirms(5)
    for tag in (3, 4, 5):
        c.on_confirm(nack(tag))
    assert not c.settled()
    c.on_confirm(ack(2, multiple=True))
    assert c.settled() and c.nacked == 3


def test_single_acks_out_of_order() -> None:
    c = confirms(4)
    for tag in (2, 4, 1):
        c.on_confirm(ack(tag))
    assert not c.settled()
    c.on_confirm(ack(3))
    assert c.settled()


def test_multiple_nack_over_single_acks_counts_only_the_unsettled() -> None:
    c = confirms(4)
    c.on_confirm(ack(2))
    c.on_confirm(nack(4, multiple=True))
    assert c.settled() and c.nacked == 3


def test_a_second_flush_waits_for_its_own_tags() -> None:
    c = confirms(2)
    c.on_confirm(ack(2, multiple=True))
    assert c.settled()
    c.published = c.target = 5
    assert not c.settled()
    c.on_confirm(ack(5, multiple=True))
    assert c.settled()
