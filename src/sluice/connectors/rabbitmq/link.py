"""One AMQP connection and one channel, served by an I/O thread of their own.

Why a thread of its own: pika's ``BlockingConnection`` answers heartbeats
only while its caller is inside a pika call, so a pipeline whose target
writes for longer than two heartbeat intervals would have its connection
closed by the broker. A :class:`Link` runs a pika ``SelectConnection`` and
its I/O loop on a dedicated daemon thread from :meth:`Link.open` to
:meth:`Link.close`: heartbeats, deliveries, publisher confirms and returns
are served whatever the engine's threads are doing. Other threads reach the
channel only through the loop (``add_callback_threadsafe``): :meth:`Link.call`
runs a function there and waits for its answer, :meth:`Link.post` runs one
without waiting.

A link is used once: after the connection or the channel closed (broker gone,
connection closed by an operator, a channel error) it stays dead, and its
owner opens a new one. Delivery tags belong to one channel, so an owner
never acknowledges a tag of a dead link on a new one.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from sluice.errors import ConnectorError, TransientError

try:
    import pika
    import pika.exceptions as pex
except ModuleNotFoundError as exc:  # pragma: no cover - exercised without the extra
    raise ModuleNotFoundError("pika", name="pika") from exc

log = logging.getLogger(__name__)
# pika narrates every connection and channel at INFO; sluice's logs stay quiet
# in normal operation, and what goes wrong is logged here at WARNING.
logging.getLogger("pika").setLevel(logging.WARNING)

#: Longest wait for the connection and channel to open, seconds.
OPEN_TIMEOUT_S = 15.0
#: Longest wait for one answer of the broker (declare, qos, consume), seconds.
CALL_TIMEOUT_S = 30.0
#: Longest wait for the I/O thread to end after a close, seconds.
CLOSE_TIMEOUT_S = 5.0

# Channel and connection close codes that no retry can mend: the
# configuration or the broker's setup is wrong (AMQP 0-9-1 reply codes).
_ACCESS_REFUSED = 403
_NOT_FOUND = 404
_RESOURCE_LOCKED = 405
_PRECONDITION_FAILED = 406
_NOT_ALLOWED = 530
_FATAL_CODES = {_ACCESS_REFUSED, _NOT_FOUND, _RESOURCE_LOCKED, _PRECONDITION_FAILED, _NOT_ALLOWED}


def where(url: str) -> str:
    """``host:port/vhost`` of an AMQP URL, without credentials (for messages)."""
    parts = urlsplit(url)
    host = parts.hostname or "localhost"
    port = parts.port or (5671 if parts.scheme == "amqps" else 5672)
    return f"{host}:{port}{parts.path or '/'}"


def describe(exc: BaseException) -> str:
    """A short text for a pika exception (they often carry only a tuple)."""
    if isinstance(exc, pex.ChannelClosed | pex.ConnectionClosed):
        return f"{exc.reply_code} {exc.reply_text}"
    text = str(exc) or repr(exc)
    return f"{type(exc).__name__}: {text}" if type(exc).__name__ not in text else text


def classify(exc: BaseException, what: str) -> ConnectorError:
    """A pika failure as sluice's error: :class:`TransientError` when a retry
    may mend it (connection refused or lost, forced close), else
    :class:`ConnectorError` (bad credentials, a queue declared with other
    arguments, a missing virtual host)."""
    if isinstance(exc, ConnectorError):
        return exc
    text = f"{what}: {describe(exc)}"
    if isinstance(exc, pex.ProbableAuthenticationError | pex.AuthenticationError):
        return ConnectorError(f"{text} (check the user and password of amqp_url)")
    if isinstance(exc, pex.ProbableAccessDeniedError):
        return ConnectorError(f"{text} (check the virtual host of amqp_url and its permissions)")
    if isinstance(exc, pex.ChannelClosed | pex.ConnectionClosed) and (
        exc.reply_code in _FATAL_CODES
    ):
        return ConnectorError(text)
    return TransientError(text)


class _Call:
    """One function run on the I/O thread, and its answer."""

    __slots__ = ("done", "error", "value")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: Any = None
        self.error: BaseException | None = None

    def resolve(self, value: Any = None) -> None:
        self.value = value
        self.done.set()

    def fail(self, exc: BaseException) -> None:
        if not self.done.is_set():
            self.error = exc
            self.done.set()


#: A function the I/O thread runs with the open channel and a ``resolve`` to call with its answer.
Start = Callable[[Any, Callable[[Any], None]], None]


class Link:
    """An AMQP connection and its one channel on their own I/O thread.

    ``name`` is the connection name the broker shows (management UI,
    ``rabbitmqctl list_connections client_properties``). ``confirms``
    puts the channel in publisher-confirm mode, ``on_confirm(method_frame)``
    receiving each ``Basic.Ack`` / ``Basic.Nack`` and ``on_return(method,
    properties, body)`` each returned (unroutable) message, both on the I/O
    thread.
    """

    def __init__(
        self,
        url: str,
        name: str,
        *,
        confirms: bool = False,
        on_confirm: Callable[[Any], None] | None = None,
        on_return: Callable[[Any, Any, bytes], None] | None = None,
    ) -> None:
        try:
            params = pika.URLParameters(url)
        except ValueError as exc:  # a bad query parameter (heartbeat=x)
            raise ConnectorError(f"amqp_url: {exc}") from exc
        params.client_properties = {"connection_name": name, "product": "sluice"}
        self._params = params
        self.name = name
        self.where = where(url)
        self._confirms = confirms
        self._on_confirm = on_confirm
        self._on_return = on_return
        self._conn: Any = None
        self._channel: Any = None
        self._thread: threading.Thread | None = None
        self._settled = threading.Event()  # open succeeded or failed
        self._ready = False
        self._failure: BaseException | None = None
        self._lock = threading.Lock()
        self._pending: set[_Call] = set()
        self._closing = False

    # -- state --------------------------------------------------------------

    @property
    def alive(self) -> bool:
        """Open, and neither the connection nor the channel closed since."""
        return self._ready and self._failure is None

    @property
    def failure(self) -> BaseException | None:
        """Why the link died (``None`` while alive or before open)."""
        return self._failure

    # -- lifecycle ----------------------------------------------------------

    def open(self, timeout_s: float = OPEN_TIMEOUT_S) -> None:
        """Connect and open the channel; raises :func:`classify`'s error on failure."""
        self._thread = threading.Thread(target=self._run, name=f"amqp {self.name}", daemon=True)
        self._thread.start()
        if not self._settled.wait(timeout_s):
            self._fail(TimeoutError(f"no connection within {timeout_s:.0f} s"))
        if self._failure is not None:
            failure = self._failure
            self.close()
            raise classify(failure, f"connecting to {self.where}")

    def _run(self) -> None:
        try:
            self._conn = pika.SelectConnection(
                self._params,
                on_open_callback=self._on_open,
                on_open_error_callback=self._on_open_error,
                on_close_callback=self._on_closed,
            )
        except Exception as exc:  # a bad parameter: report it to open()
            self._fail(exc)
            return
        try:
            self._conn.ioloop.start()  # returns once _on_closed / close() stopped it
        finally:
            try:
                self._conn.ioloop.close()
            except Exception as exc:  # the loop's own cleanup; nothing left to do
                log.debug("closing the I/O loop of %s: %s", self.name, exc)

    def _on_open(self, conn: Any) -> None:
        conn.channel(on_open_callback=self._on_channel)

    def _on_channel(self, channel: Any) -> None:
        self._channel = channel
        channel.add_on_close_callback(self._on_channel_closed)
        if self._on_return is not None:
            on_return = self._on_return
            channel.add_on_return_callback(
                lambda _ch, method, props, body: on_return(method, props, body)
            )
        if self._confirms:
            on_confirm = self._on_confirm or (lambda _frame: None)
            channel.confirm_delivery(on_confirm, callback=lambda _frame: self._opened())
        else:
            self._opened()

    def _opened(self) -> None:
        self._ready = True
        self._settled.set()

    def _on_open_error(self, conn: Any, exc: BaseException) -> None:
        self._fail(exc)
        conn.ioloop.stop()

    def _on_closed(self, conn: Any, reason: BaseException) -> None:
        self._fail(reason)
        conn.ioloop.stop()

    def _on_channel_closed(self, channel: Any, reason: BaseException) -> None:
        self._fail(reason)
        conn = self._conn
        if conn is not None and conn.is_open:
            conn.close()  # one channel per link: the link is done; _on_closed stops the loop

    def _fail(self, exc: BaseException) -> None:
        with self._lock:
            if self._failure is None:
                self._failure = exc
                if self._ready and not self._closing:
                    log.warning("rabbitmq connection %s lost: %s", self.name, describe(exc))
            pending, self._pending = self._pending, set()
        for call in pending:
            call.fail(exc)
        self._settled.set()

    def close(self, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        """Close the connection (the broker requeues what was not acknowledged)
        and end the I/O thread. Idempotent."""
        self._closing = True
        conn, thread = self._conn, self._thread
        if thread is None or not thread.is_alive():
            return

        def shut() -> None:
            try:
                if conn.is_open:
                    conn.close()
                    return
                if not (conn.is_closing or conn.is_closed):
                    conn.close()  # still opening: pika aborts the handshake
                    return
            except pex.ConnectionWrongStateError:
                pass
            conn.ioloop.stop()

        if conn is not None:
            try:
                conn.ioloop.add_callback_threadsafe(shut)
            except Exception as exc:  # the loop is already gone
                log.debug("closing %s: %s", self.name, exc)
        thread.join(timeout_s)
        if thread.is_alive() and conn is not None:  # the broker did not answer the close
            try:
                conn.ioloop.add_callback_threadsafe(conn.ioloop.stop)
            except Exception as exc:
                log.debug("stopping the I/O loop of %s: %s", self.name, exc)
            thread.join(timeout_s)

    # -- talking to the channel ---------------------------------------------

    def call(self, start: Start, what: str, timeout_s: float = CALL_TIMEOUT_S) -> Any:
        """Run ``start(channel, resolve)`` on the I/O thread and wait until it
        calls ``resolve(value)``; returns ``value``.

        Raises :func:`classify`'s error when the link dies meanwhile (the
        channel closed by the broker: a queue declared with other arguments,
        a missing queue) or the answer takes longer than ``timeout_s``.
        """
        call = _Call()
        with self._lock:
            failure = self._failure
            if failure is None:
                self._pending.add(call)
        if failure is not None:
            raise classify(failure, what)

        def run() -> None:
            if self._failure is not None:
                call.fail(self._failure)
                return
            try:
                start(self._channel, call.resolve)
            except Exception as exc:  # pika refused the call (closing channel, bad argument)
                call.fail(exc)

        try:
            self._conn.ioloop.add_callback_threadsafe(run)
        except Exception as exc:  # the loop is gone
            call.fail(exc)
        finished = call.done.wait(timeout_s)
        with self._lock:
            self._pending.discard(call)
        if not finished:
            raise TransientError(f"{what}: no answer from {self.where} within {timeout_s:.0f} s")
        if call.error is not None:
            raise classify(call.error, what)
        return call.value

    def post(self, action: Callable[[Any], None]) -> None:
        """Run ``action(channel)`` on the I/O thread, without waiting. Dropped
        when the link is dead."""
        if self._failure is not None or self._conn is None:
            return

        def run() -> None:
            if self._failure is None:
                action(self._channel)

        try:
            self._conn.ioloop.add_callback_threadsafe(run)
        except Exception as exc:  # the loop is gone: the link is dead
            log.debug("posting to %s: %s", self.name, exc)
