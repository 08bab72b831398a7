"""Pub/Sub source: synchronous pull, leases kept while a batch is in flight, ack last.

* Synchronous ``pull`` of up to 1000 messages per call, repeated until
  ``max_batch_rows``, the subscription has nothing more, or
  ``max_batch_wait_ms`` is over. Streaming pull was
  measured at ~780 msgs/s on the emulator, synchronous pull at ~42k msgs/s
  (``SERVICES.md``); streaming pull's own lease management is replaced by
  ours below.
* **Leases.** Every message pulled and not yet acknowledged is in flight. A
  timer thread extends the ack deadline of all of them every third of the
  deadline (``modify_ack_deadline``), so a target slower than the
  subscription's ack deadline causes no redelivery. The lease is the
  subscription's ack deadline unless ``lease_secs`` says otherwise.
* **Ack last.** :meth:`PubSubSource.commit` acknowledges the messages of the
  batch it is given and of every batch before it, only after the engine
  flushed every target; a crash before that lets the leases lapse and
  Pub/Sub delivers the messages again (at least once; a merge target makes
  it exactly once in effect). :meth:`PubSubSource.close` hands the
  messages still in flight back at once (deadline 0), except on an ordered
  subscription (below).
* **Ordering keys.** Messages keep the order the pulls returned them in, and
  batches are acknowledged in read order, so an ordered subscription's
  per-key order reaches the targets. On an ordered subscription ``close``
  lets the leases lapse instead of handing the messages back: the emulator
  was seen to deliver a key's later messages after a nack of its earlier
  ones (order lost), while after a lapse it redelivers them in order first.
  A redelivery on an ordered subscription brings back every later message
  of the key as well, acknowledged ones included (Pub/Sub's rule): a merge
  target absorbs them.
* ``_event_ts`` is the message's ``publish_time``.
* ``dead_letter_policy`` is set on a subscription that has none; one that has
  a different policy is an error (sluice does not overwrite it).
* The source is ack-only (no positions): what it acknowledged is gone.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from typing import Any

import numpy as np

from sluice.connectors.api import Batch, RawRecord
from sluice.connectors.pubsub import client as pc
from sluice.connectors.pubsub.spec import PubSubSource as PubSubSourceSpec
from sluice.connectors.registry import Context
from sluice.errors import ConnectorError, TransientError
from sluice.formats import decoder_for, event_table

log = logging.getLogger(__name__)

#: Most messages one pull asks for (the service's limit is 1000).
PULL_MAX = 1000
#: Most ack ids one acknowledge / modify_ack_deadline call carries (requests
#: are capped at 512 KiB; an ack id is at most ~200 bytes).
ACK_CHUNK = 1000
#: Pause between pulls that found nothing, seconds (the emulator answers an
#: empty pull at once instead of waiting).
EMPTY_PAUSE_S = 0.05
#: Shortest deadline given to a pull, seconds (one round trip on a busy machine).
MIN_PULL_S = 0.1
#: Longest a single RPC may take, seconds.
RPC_TIMEOUT_S = 30.0
_RETRYABLE = (
    pc.gexc.ServiceUnavailable,
    pc.gexc.DeadlineExceeded,
    pc.gexc.InternalServerError,
    pc.gexc.Aborted,
    pc.gexc.ResourceExhausted,
    pc.gexc.Unknown,
)


def path(kind: str, project: str, name: str) -> str:
    """``projects/<project>/<kind>/<name>`` unless ``name`` is a full path already."""
    return name if name.startswith("projects/") else f"projects/{project}/{kind}/{name}"


class PubSubSource:
    """Reads one subscription; see the module docstring."""

    def __init__(self, spec: PubSubSourceSpec, ctx: Context) -> None:
        self.spec = spec
        query = ctx.pipeline.query_of(spec)
        self.id = query
        self.subscription = path("subscriptions", spec.project_id, spec.subscription or query)
        cdc = ctx.pipeline.transform.cdc if ctx.pipeline.transform else None
        self._decoder = decoder_for(spec.payload_format, cdc, ctx.pipeline.pipeline_name)
        self._client: Any = None
        self._lease_s = 10
        self._ordered = False  # the subscription delivers by ordering key
        # Batch token -> ack ids of its messages, in read order; guarded by _lock
        # (the lease thread reads it).
        self._in_flight: OrderedDict[int, list[str]] = OrderedDict()
        self._lock = threading.Lock()
        self._token = 0
        self._stop = threading.Event()
        self._lease_thread: threading.Thread | None = None
        self.leases_extended = 0  # modify_ack_deadline calls that extended leases (tests)

    # -- lifecycle --------------------------------------------------------

    def open(self, resume: Any = None) -> None:
        """Connect, check the subscription (and its dead-letter policy), start the leases."""
        self._client = pc.subscriber(self.spec)
        try:
            sub = self._client.get_subscription(
                subscription=self.subscription, timeout=RPC_TIMEOUT_S
            )
        except pc.gexc.NotFound as exc:
            raise ConnectorError(
                f"pubsub: subscription {self.subscription} does not exist"
            ) from exc
        except _RETRYABLE as exc:
            raise TransientError(
                f"pubsub: reading subscription {self.subscription}: {exc}"
            ) from exc
        self._lease_s = self.spec.lease_secs or int(sub.ack_deadline_seconds) or 10
        self._ordered = bool(sub.enable_message_ordering)
        self._check_dead_letters(sub)
        self._stop.clear()
        self._lease_thread = threading.Thread(
            target=self._keep_leases, name=f"pubsub leases {self.id}", daemon=True
        )
        self._lease_thread.start()

    def _check_dead_letters(self, sub: Any) -> None:
        want = self.spec.dead_letter_policy
        if want is None:
            return
        topic = path("topics", self.spec.project_id, want.topic)
        have = sub.dead_letter_policy
        if not have.dead_letter_topic:
            policy = {
                "dead_letter_topic": topic,
                "max_delivery_attempts": want.max_delivery_attempts,
            }
            try:
                self._client.update_subscription(
                    request={
                        "subscription": {"name": self.subscription, "dead_letter_policy": policy},
                        "update_mask": {"paths": ["dead_letter_policy"]},
                    },
                    timeout=RPC_TIMEOUT_S,
                )
            except pc.gexc.GoogleAPICallError as exc:
                raise ConnectorError(
                    f"pubsub: setting the dead-letter policy of {self.subscription}: {exc}"
                ) from exc
            log.info("pubsub %s: dead-letter policy set (%s)", self.subscription, topic)
            return
        if (have.dead_letter_topic, have.max_delivery_attempts) != (
            topic,
            want.max_delivery_attempts,
        ):
            raise ConnectorError(
                f"pubsub: subscription {self.subscription} has dead_letter_policy "
                f"{{topic = {have.dead_letter_topic!r}, max_delivery_attempts = "
                f"{have.max_delivery_attempts}}}, the pipeline says {{topic = {topic!r}, "
                f"max_delivery_attempts = {want.max_delivery_attempts}}}; sluice does not "
                "overwrite it: change one of them"
            )

    def close(self) -> None:
        """Stop the leases and hand the messages in flight back for redelivery."""
        self._stop.set()
        thread, self._lease_thread = self._lease_thread, None
        if thread is not None:
            thread.join(timeout=RPC_TIMEOUT_S)
        client, self._client = self._client, None
        with self._lock:
            pending = [a for ids in self._in_flight.values() for a in ids]
            self._in_flight.clear()
        if client is None:
            return
        if self._ordered:
            pending = []  # see the module docstring: the leases lapse instead
        try:
            for chunk in _chunks(pending):
                client.modify_ack_deadline(
                    subscription=self.subscription,
                    ack_ids=chunk,
                    ack_deadline_seconds=0,
                    timeout=5.0,
                )
        except pc.gexc.GoogleAPICallError as exc:  # they come back when the lease lapses
            log.debug("pubsub %s: nack on close: %s", self.id, exc)
        try:
            client.close()
        except Exception as exc:  # closing a broken channel
            log.debug("pubsub %s: close: %s", self.id, exc)

    # -- leases -------------------------------------------------------------

    def _keep_leases(self) -> None:
        """Extend the ack deadline of every message in flight, every third of it."""
        interval = max(1.0, self._lease_s / 3)
        while not self._stop.wait(interval):
            with self._lock:
                ack_ids = [a for ids in self._in_flight.values() for a in ids]
            client = self._client
            if not ack_ids or client is None:
                continue
            try:
                for chunk in _chunks(ack_ids):
                    client.modify_ack_deadline(
                        subscription=self.subscription,
                        ack_ids=chunk,
                        ack_deadline_seconds=self._lease_s,
                        timeout=min(RPC_TIMEOUT_S, interval),
                    )
                self.leases_extended += 1
            except pc.gexc.GoogleAPICallError as exc:
                # The next tick tries again; a lease that lapses meanwhile means
                # a redelivery (at least once), never a loss.
                log.warning("pubsub %s: extending leases failed: %s", self.id, exc)

    # -- reading ------------------------------------------------------------

    def read(self, timeout_s: float) -> Batch | None:
        """Up to ``max_batch_rows`` messages, waiting at most ``timeout_s``
        (and ``max_batch_wait_ms``) for the first."""
        client = self._require()
        deadline = time.monotonic() + min(timeout_s, self.spec.max_batch_wait_ms / 1000)
        limit = self.spec.max_batch_rows
        got: list[Any] = []
        while len(got) < limit:
            want = min(PULL_MAX, limit - len(got))
            left = deadline - time.monotonic()
            try:
                resp = client.pull(
                    request={"subscription": self.subscription, "max_messages": want},
                    # A pull on an empty subscription is held open by the
                    # service (the emulator: ~4 s) up to this deadline.
                    timeout=max(MIN_PULL_S, min(left, RPC_TIMEOUT_S)),
                    retry=None,
                )
            except pc.gexc.DeadlineExceeded:
                break  # nothing within the wait
            except pc.gexc.NotFound as exc:
                raise ConnectorError(
                    f"pubsub: subscription {self.subscription} does not exist"
                ) from exc
            except _RETRYABLE as exc:
                if got:
                    break  # hand on what we have; the next read retries
                raise TransientError(f"pubsub pull from {self.subscription}: {exc}") from exc
            received = list(type(resp).pb(resp).received_messages)
            if received:
                # A pull returns what the service has at hand (the emulator: at
                # most 100), not what is there: pull again until the batch is
                # full or the wait is over.
                got.extend(received)
                if time.monotonic() >= deadline:
                    break
                continue
            if got or time.monotonic() + EMPTY_PAUSE_S > deadline:
                break
            time.sleep(EMPTY_PAUSE_S)  # bounded by the deadline above
        if not got:
            return None
        return self._to_batch(got)

    def _to_batch(self, got: list[Any]) -> Batch:
        ack_ids = [m.ack_id for m in got]
        with self._lock:
            self._token += 1
            token = self._token
            self._in_flight[token] = ack_ids
        msgs = [m.message for m in got]
        ts_us = np.fromiter(
            (t.seconds * 1_000_000 + t.nanos // 1000 for t in (m.publish_time for m in msgs)),
            dtype=np.int64,
            count=len(msgs),
        )
        decoded = self._decoder.decode([m.data for m in msgs], list(range(len(msgs))))
        table = event_table(decoded, ts_us)
        return Batch(
            self.id,
            table,
            token,
            raw_count=len(msgs),
            partitions=(self.subscription,),
            raw=_Records(self.subscription, msgs),
            bad=tuple(decoded.bad),
            rows=None if decoded.rows is None else tuple(decoded.rows),
        )

    # -- committing ------------------------------------------------------------

    def commit(self, token: int) -> None:
        """Acknowledge the messages of batch ``token`` and of every batch before it."""
        client = self._require()
        with self._lock:
            tokens = [t for t in self._in_flight if t <= token]
            ack_ids = [a for t in tokens for a in self._in_flight[t]]
        try:
            for chunk in _chunks(ack_ids):
                client.acknowledge(
                    subscription=self.subscription, ack_ids=chunk, timeout=RPC_TIMEOUT_S
                )
        except _RETRYABLE as exc:
            raise TransientError(f"pubsub acknowledge on {self.subscription}: {exc}") from exc
        except pc.gexc.GoogleAPICallError as exc:
            raise ConnectorError(f"pubsub acknowledge on {self.subscription}: {exc}") from exc
        with self._lock:
            for t in tokens:
                self._in_flight.pop(t, None)

    def _require(self) -> Any:
        if self._client is None:
            raise ConnectorError(f"pubsub source {self.id} is not open")
        return self._client


def _chunks(ids: list[str]) -> list[list[str]]:
    return [ids[i : i + ACK_CHUNK] for i in range(0, len(ids), ACK_CHUNK)]


class _Records:
    """The messages of one batch, kept for dead letters and error messages."""

    def __init__(self, subscription: str, msgs: list[Any]) -> None:
        self._sub = subscription
        self._msgs = msgs

    def __len__(self) -> int:
        return len(self._msgs)

    def record(self, index: int) -> RawRecord:
        m = self._msgs[index]
        ts = m.publish_time
        return RawRecord(
            self._sub,
            str(m.message_id),
            ts.seconds * 1000 + ts.nanos // 1_000_000,
            m.ordering_key.encode() if m.ordering_key else None,
            bytes(m.data),
        )

    def where(self, index: int) -> str:
        return f"subscription {self._sub} message id {self._msgs[index].message_id}"

    def span(self) -> str:
        first, last = self._msgs[0].message_id, self._msgs[-1].message_id
        return f"subscription {self._sub} message ids {first}..{last} ({len(self._msgs)})"


def build_source(spec: PubSubSourceSpec, ctx: Context) -> PubSubSource:
    """Registry hook."""
    return PubSubSource(spec, ctx)
