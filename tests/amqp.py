"""RabbitMQ helpers for tests: publish, read back, count, and close connections
from the broker's side through the management HTTP API."""

from __future__ import annotations

import base64
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from typing import Any

import pika

from tests import endpoints


def connect() -> pika.BlockingConnection:
    """A blocking connection of the test's own (not the code under test's)."""
    return pika.BlockingConnection(pika.URLParameters(endpoints.RABBITMQ_URL))


def declare(queue: str, args: dict[str, Any] | None = None) -> None:
    """Declare ``queue`` durable, with ``args``."""
    with connect() as conn:
        conn.channel().queue_declare(queue, durable=True, arguments=args)


def bind_exchange(exchange: str, queue: str) -> None:
    """Declare a fanout ``exchange`` and a durable ``queue`` bound to it."""
    with connect() as conn:
        ch = conn.channel()
        ch.exchange_declare(exchange, "fanout", durable=True)
        ch.queue_declare(queue, durable=True)
        ch.queue_bind(queue, exchange)


def delete_exchange(exchange: str) -> None:
    """Delete ``exchange``."""
    with connect() as conn:
        conn.channel().exchange_delete(exchange)


def delete(queue: str) -> None:
    """Delete ``queue`` (whatever it holds)."""
    with connect() as conn:
        conn.channel().queue_delete(queue)


def publish(
    queue: str,
    bodies: Sequence[bytes],
    timestamps_s: Sequence[int] | None = None,
) -> None:
    """Publish ``bodies`` to ``queue`` (default exchange), persistent, with the
    AMQP ``timestamp`` property when given."""
    with connect() as conn:
        ch = conn.channel()
        # Unconfirmed (one confirm at a time runs at a few hundred messages a
        # second here); the broker handles a channel's commands in order, so
        # once the synchronous declare below is answered every publish before
        # it reached its queue. The broker is not restarted under the tests.
        for i, body in enumerate(bodies):
            ts = None if timestamps_s is None else timestamps_s[i]
            props = pika.BasicProperties(delivery_mode=2, timestamp=ts)
            ch.basic_publish("", queue, body, props)
        ch.queue_declare(queue, passive=True)


def drain(queue: str) -> list[tuple[bytes, dict[str, Any]]]:
    """Every message ready in ``queue`` with its headers, taken (acknowledged)."""
    out: list[tuple[bytes, dict[str, Any]]] = []
    with connect() as conn:
        ch = conn.channel()
        while True:
            method, props, body = ch.basic_get(queue, auto_ack=True)
            if method is None:
                break
            out.append((body, dict(props.headers or {})))
    return out


def peek(queue: str) -> list[bytes] | None:
    """Every message ready in ``queue``, left there (taken unacknowledged, then
    requeued by closing the channel); ``None`` when the queue does not exist."""
    with connect() as conn:
        ch = conn.channel()
        try:
            ch.queue_declare(queue, passive=True)
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code == 404:
                return None
            raise
        out: list[bytes] = []
        while True:
            method, _props, body = ch.basic_get(queue, auto_ack=False)
            if method is None:
                break
            out.append(body)
        ch.close()  # requeues everything taken
    return out


# -- management HTTP API ---------------------------------------------------------


def _api(path: str, method: str = "GET") -> Any:
    url = f"{endpoints.RABBITMQ_HTTP}/api/{path}"
    req = urllib.request.Request(url, method=method)
    req.add_header("Authorization", "Basic " + base64.b64encode(b"guest:guest").decode())
    with urllib.request.urlopen(req, timeout=10) as resp:
        data = resp.read()
    return json.loads(data) if data else None


def connections(name: str) -> list[str]:
    """The broker's names of the open connections whose client's connection
    name contains ``name``."""
    out = []
    for conn in _api("connections?columns=name,client_properties") or []:
        props = conn.get("client_properties") or {}
        if name in str(props.get("connection_name", "")):
            out.append(str(conn["name"]))
    return out


def close_connections(name: str, wait_s: float = 20.0) -> int:
    """Close, from the broker, every connection whose client's connection name
    contains ``name``; how many were closed.

    The API lists a new connection only after its first statistics (about 5 s
    on a default broker): waits up to ``wait_s`` for at least one.
    """
    deadline = time.monotonic() + wait_s
    names = connections(name)
    while not names and time.monotonic() < deadline:
        time.sleep(0.25)
        names = connections(name)
    for conn in names:
        try:
            _api(f"connections/{urllib.parse.quote(conn, safe='')}", method="DELETE")
        except urllib.error.HTTPError as exc:
            if exc.code != 404:  # gone meanwhile
                raise
    return len(names)


def counts(queue: str) -> tuple[int, int]:
    """(ready, unacknowledged) messages of ``queue`` as the management API
    reports them (its statistics are refreshed every few seconds: poll)."""
    q = _api(f"queues/%2F/{urllib.parse.quote(queue, safe='')}")
    return int(q.get("messages_ready", -1)), int(q.get("messages_unacknowledged", -1))
