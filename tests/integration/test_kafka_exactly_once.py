"""Exactly-once Kafka → Kafka (``delivery = "exactly_once"``) through real
``flow consume`` processes, against the test broker (tansu).

tansu writes commit and abort markers and fences a transactional.id's older
producer, but it does not hide aborted records from ``read_committed``
consumers (its fetch responses list no aborted transactions; measured on
tansu 0.6.0, the newest there is here). So "what a read_committed consumer
sees" is computed from the output log itself (:mod:`tests.integration.kafka_log`:
every record with the marker that ended its transaction), and a plain
``read_uncommitted`` consumer shows what the markers hide: the aborted
duplicates, which proves the check can fail.
"""

from __future__ import annotations

import collections
import random
import signal
import time
from collections.abc import Callable
from typing import Any

import msgspec
import pyarrow as pa
import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition
from tests import endpoints
from tests.integration.conftest import (
    Flow,
    events,
    produce,
    unique,
    wait_until,
)
from tests.integration.kafka_log import ABORT, COMMIT, Record, read_log

from sluice.config import load_text
from sluice.connectors import registry
from sluice.connectors.kafka.transactions import TransactionAborted, TransactionalKafkaTarget

pytestmark = pytest.mark.integration

SEED = 15
KILLS = 10  # the acceptance: SIGKILL at 10 random points
FROZEN_CHECKS = 8  # per run: SIGSTOP at a random moment, check, SIGCONT


def config(source: str, out: str, pipeline: str, batch_rows: int) -> str:
    return f"""
pipeline_name = "{pipeline}"
source_query = "{source}"
idle_pause_ms = 100
delivery = "exactly_once"

[source]
kind = "kafka"
bootstrap_servers = "{endpoints.KAFKA_BOOTSTRAP}"
session_timeout_ms = 2000
max_batch_rows = {batch_rows}

[target]
kind = "kafka"
bootstrap_servers = "{endpoints.KAFKA_BOOTSTRAP}"
topic = "{out}"
message_key_column = "id"
"""


def group_offsets(group: str, topic: str, partitions: int) -> dict[int, int]:
    """The group's committed (stable) offsets per partition; 0 where none."""
    c = Consumer(
        {
            "bootstrap.servers": endpoints.KAFKA_BOOTSTRAP,
            "group.id": group,
            "isolation.level": "read_committed",
        }
    )
    try:
        tps = c.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)
    finally:
        c.close()
    assert all(tp.error is None for tp in tps), tps
    return {tp.partition: max(tp.offset, 0) for tp in tps}


def ids(records: list[Record]) -> list[int]:
    return [int(msgspec.json.decode(r.value or b"null")["id"]) for r in records]


def committed_view(out: str) -> tuple[list[int], list[Record]]:
    """The ids a read_committed consumer sees (records of committed
    transactions, in log order), and every record of the output."""
    records, _markers = read_log(endpoints.KAFKA_BOOTSTRAP, out)
    assert all(r.transactional for r in records), "a record written outside a transaction"
    return ids([r for r in records if r.outcome == COMMIT]), records


class Output:
    """The output log read incrementally: records before the last marker are
    settled (their transactions ended) and kept; the rest is read again."""

    def __init__(self, topic: str) -> None:
        self.topic = topic
        self.start = 0
        self.settled: list[Record] = []
        self.committed: list[int] = []

    def refresh(self) -> tuple[list[int], list[Record]]:
        """The ids a read_committed consumer sees, and every record."""
        records, markers = read_log(endpoints.KAFKA_BOOTSTRAP, self.topic, start=self.start)
        assert all(r.transactional for r in records), "a record written outside a transaction"
        tail = records
        if markers:
            last = max(m.offset for m in markers)
            done = [r for r in records if r.offset < last]
            self.settled += done
            self.committed += ids([r for r in done if r.outcome == COMMIT])
            self.start = last + 1
            tail = [r for r in records if r.offset > last]
        return self.committed + ids([r for r in tail if r.outcome == COMMIT]), self.settled + tail


def read_uncommitted(topic: str, timeout_s: float = 30) -> list[int]:
    """Every id of ``topic`` (one partition) as a read_uncommitted consumer sees it."""
    c = Consumer(
        {
            "bootstrap.servers": endpoints.KAFKA_BOOTSTRAP,
            "group.id": unique("uncommitted"),
            "isolation.level": "read_uncommitted",
            "enable.partition.eof": True,
        }
    )
    out: list[int] = []
    try:
        c.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            msg = c.poll(0.5)
            if msg is None:
                continue
            if msg.error() is not None:
                assert msg.error().code() == KafkaError._PARTITION_EOF, msg.error()
                return out
            out.append(int(msgspec.json.decode(msg.value())["id"]))
    finally:
        c.close()
    raise AssertionError(f"reading {topic} took over {timeout_s} s")


def settled(check: Callable[[], str | None], timeout_s: float = 10) -> None:
    """``check`` returns None once it holds (a problem otherwise); a commit
    the killed process sent just before its death may land a moment later."""
    deadline = time.monotonic() + timeout_s
    while (problem := check()) is not None:
        assert time.monotonic() < deadline, problem
        time.sleep(0.1)


def has_read(f: Flow, rows: int) -> None:
    """Wait until ``f`` has read ``rows`` rows (fails when it exits first)."""
    wait_until(
        lambda: f.proc.poll() is not None or f.metric("sluice_rows_consumed_total") >= rows,
        60,
        f"the process to read {rows} rows",
        0.02,
    )
    assert f.proc.poll() is None, f.output()


def freeze(f: Flow, output: Output, rng: random.Random, *, inside: bool) -> int:
    """SIGSTOP ``f`` at moments drawn from ``rng`` until it is frozen inside a
    transaction whose records already reached the log (``inside``), or
    between transactions (no record without a marker); the number of records
    left open. The process stays stopped: SIGKILL it next."""
    for _ in range(300):
        f.proc.send_signal(signal.SIGSTOP)
        _, records = output.refresh()
        left_open = sum(r.outcome is None for r in records)
        if bool(left_open) == inside:
            return left_open
        f.proc.send_signal(signal.SIGCONT)
        time.sleep(rng.uniform(0.0, 0.02))
    raise AssertionError(
        f"never caught the process {'inside' if inside else 'between'} transactions"
    )


def test_kafka_to_kafka_killed_mid_stream_commits_every_record_once(
    flow: Callable[..., Flow], kafka_topic: Callable[..., str]
) -> None:
    """SIGKILL at random points (fixed seed), restart each time: a third of
    the kills at a random moment, a third while the process is (frozen)
    inside a transaction whose records are in the log, a third while it is
    (frozen) between transactions; before each kill, eight random freezes
    check the offsets against the output too. After every kill the group's
    committed offsets cover exactly the input records the committed
    transactions hold, each once. After the last run every input record is in
    the committed output exactly once; the transactions the kills left open
    were each aborted on restart (an abort marker, written when the new
    producer's init_transactions fenced the old one); and a read_uncommitted
    consumer sees those aborted duplicates (the check can fail)."""
    n = 200_000  # ten runs each read thousands: room to spare on a fast machine
    source, out = kafka_topic(partitions=2, prefix="eos_src"), kafka_topic(1, prefix="eos_out")
    keys = [str(i).encode() for i in range(n)]
    where = [(p, o) for p, o, _ in produce(source, events(n), keys).records]
    pipeline = unique("eos")
    text = config(source, out, pipeline, 500)
    rng = random.Random(SEED)

    output = Output(out)

    def offsets_match_output() -> str | None:
        offsets = group_offsets(pipeline, source, 2)
        got, _ = output.refresh()
        covered = [i for i, (p, o) in enumerate(where) if o < offsets[p]]
        if sorted(got) != covered:
            extra = collections.Counter(got) - collections.Counter(covered)
            missing = collections.Counter(covered) - collections.Counter(got)
            return (
                f"group offsets {offsets} cover {len(covered)} records, the committed "
                f"transactions hold {len(got)} ({len(extra)} not covered or twice, e.g. "
                f"{sorted(extra)[:5]}; {len(missing)} missing, e.g. {sorted(missing)[:5]})"
            )
        return None

    def frozen_checks(f: Flow, times: int) -> None:
        """Freeze ``f`` at random moments; each time (once what it sent has
        landed) the group's offsets must cover exactly the committed output."""
        for _ in range(times):
            time.sleep(rng.uniform(0.0, 0.03))
            f.proc.send_signal(signal.SIGSTOP)
            try:
                settled(offsets_match_output, 5)
            finally:
                f.proc.send_signal(signal.SIGCONT)

    left_open = 0  # records of transactions a kill left open
    for k in range(KILLS):
        f = flow(text, name=f"run{k}")
        rows = rng.randint(1, 2000)
        has_read(f, rows)
        frozen_checks(f, FROZEN_CHECKS)
        if k % 3 == 0:  # anywhere
            time.sleep(rng.uniform(0.0, 0.1))
            assert f.proc.poll() is None, f.output()
        else:  # inside a transaction with records in the log, or between two
            left_open += freeze(f, output, rng, inside=k % 3 == 1)
        f.kill()
        settled(offsets_match_output)
        assert sum(group_offsets(pipeline, source, 2).values()) < n, "the input ran out"

    last = flow(text, "--stop-after-idle-ms", "1500", name="last")
    assert last.proc.wait(timeout=60) == 0, last.output()
    assert sum(group_offsets(pipeline, source, 2).values()) == n
    settled(offsets_match_output)

    got, records = output.refresh()
    assert sorted(got) == list(range(n)), "the committed output is not every input record once"
    assert all(r.outcome is not None for r in records), "a transaction was never ended"
    aborted = [r for r in records if r.outcome == ABORT]
    assert len(aborted) >= left_open > 0, f"{len(aborted)} aborted, {left_open} left open"
    seen = read_uncommitted(out)
    assert len(seen) == len(records) == n + len(aborted)
    assert len(set(seen)) == n, "read_uncommitted does not see the aborted duplicates"


def test_a_second_process_with_the_same_transactional_id_stops_the_first(
    flow: Callable[..., Flow], kafka_topic: Callable[..., str]
) -> None:
    """A second process whose target has the same transactional.id fences
    the first: the first's next transaction is refused, and it exits non-zero
    with a clear message and no traceback (no in-process restart either).

    The second reads another (empty) topic in another group: on tansu a
    member leaving a group while another joins leaves the joiner without
    partitions (measured with plain confluent-kafka consumers), so the two
    processes do not share a group here; the fence is the transactional.id's.
    """
    source, other = kafka_topic(2, prefix="eos_src"), kafka_topic(1, prefix="eos_other")
    out = kafka_topic(1, prefix="eos_out")
    pipeline, txn = unique("eos"), unique("txn")
    own = f'librdkafka = {{ "transactional.id" = "{txn}" }}'
    first_text = config(source, out, pipeline, 100) + own
    second_text = config(other, out, unique("eos"), 100) + own
    for p in (0, 1):
        produce(source, events(500, start=p * 500), partition=p)
    first = flow(first_text, "--restart-on-error", name="first")
    settled(lambda: None if sum(group_offsets(pipeline, source, 2).values()) == 1000 else "", 30)
    second = flow(second_text, name="second")
    # Its init_transactions fences the first's producer; the first is idle, so
    # nothing tells it until its next transaction.
    wait_until(lambda: "ready (delivery = exactly_once)" in second.output(), 30, "init")
    produce(source, events(10, start=1000))
    assert first.proc.wait(timeout=30) != 0, first.output()
    said = first.output()
    assert f"another process with transactional.id '{txn}' took over" in said, said
    assert "Traceback" not in said and "restart 1" not in said, said
    assert second.proc.poll() is None, second.output()
    assert second.stop() == 0, second.output()
    assert sum(group_offsets(pipeline, source, 2).values()) == 1000  # the refused round: not
    got, _ = committed_view(out)
    assert sorted(got) == list(range(1000))


class _Purging(TransactionalKafkaTarget):
    """Drops a round's messages from the producer's queue when told to: their
    delivery reports fail, as when the broker cannot take them."""

    purge = False

    def _produce(self, producer: Any, table: pa.Table, delivered: Any) -> None:
        super()._produce(producer, table, delivered)
        if self.purge:
            producer.purge(in_queue=True, in_flight=False)


class _Refusing(TransactionalKafkaTarget):
    """Fails the round after its messages were produced, with an error that
    requires an abort (injected where the offsets are sent)."""

    refuse = False

    def _offsets(self) -> dict[str, list[Any]]:
        if self.refuse:
            raise KafkaException(
                KafkaError(
                    KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER, "injected", txn_requires_abort=True
                )
            )
        return super()._offsets()


def _round(target: TransactionalKafkaTarget, source: str, ids: list[int], to: int) -> None:
    target.stage_positions({source: {f"{source}:0": to}})
    target.write(pa.table({"id": ids}))
    target.flush()


def test_an_aborted_transaction_moves_no_offset_and_the_replay_commits(
    kafka_topic: Callable[..., str],
) -> None:
    """A round failing with an abortable error aborts its transaction and
    raises TransactionAborted (the run loop then reads again): the group's
    offsets stay where the last commit put them, the round's records carry
    an abort marker, and the replay commits."""
    source, out = kafka_topic(1, prefix="eos_src"), kafka_topic(1, prefix="eos_out")
    spec = load_text(config(source, out, unique("eos"), 100), "p.toml")
    target = _Refusing(spec.all_targets[0], registry.Context(spec), 0)  # type: ignore[arg-type]
    target.open()
    try:
        assert target.held_positions() == {}
        _round(target, source, [0, 1, 2], 3)
        assert target.held_positions() == {source: {f"{source}:0": 3}}
        target.refuse = True
        with pytest.raises(TransactionAborted, match="reading again from the committed offsets"):
            _round(target, source, [3, 4, 5], 6)
        target.refuse = False
        assert target.held_positions() == {source: {f"{source}:0": 3}}
        _round(target, source, [3, 4, 5], 6)  # the run loop's replay
        assert target.held_positions() == {source: {f"{source}:0": 6}}
    finally:
        target.close()
    got, records = committed_view(out)
    assert sorted(got) == [0, 1, 2, 3, 4, 5]
    assert sorted(ids([r for r in records if r.outcome == ABORT])) == [3, 4, 5]


@pytest.mark.slow  # the failed abort waits out its 10 s timeout
def test_an_abort_that_fails_is_settled_by_a_new_producer(
    kafka_topic: Callable[..., str],
) -> None:
    """Messages purged from the producer's queue leave a gap in its sequence
    numbers: the round aborts, and the next transaction fails on the broker
    (OUT_OF_ORDER_SEQUENCE_NUMBER) with an abort that times out on tansu. The
    next read of the positions makes a new producer (init_transactions
    settles the transaction), and the replay commits."""
    source, out = kafka_topic(1, prefix="eos_src"), kafka_topic(1, prefix="eos_out")
    spec = load_text(config(source, out, unique("eos"), 100), "p.toml")
    target = _Purging(spec.all_targets[0], registry.Context(spec), 0)  # type: ignore[arg-type]
    target.open()
    try:
        _round(target, source, [0, 1, 2], 3)
        target.purge = True
        with pytest.raises(TransactionAborted):
            _round(target, source, [3, 4, 5], 6)
        target.purge = False
        for _ in range(3):  # as the run loop: read the positions again, replay
            assert target.held_positions() == {source: {f"{source}:0": 3}}
            try:
                _round(target, source, [3, 4, 5], 6)
                break
            except TransactionAborted:
                continue
        assert target.held_positions() == {source: {f"{source}:0": 6}}
    finally:
        target.close()
    got, _ = committed_view(out)
    assert sorted(got) == [0, 1, 2, 3, 4, 5]
