"""Kinesis put_records requests: at most 500 records and 5 MB (data + keys) each."""

from __future__ import annotations

from sluice.connectors.kinesis.target import MAX_BYTES, MAX_RECORDS, chunks


def test_500_records_a_request_in_order() -> None:
    records = [(b"x", str(i)) for i in range(1201)]
    got = chunks(records)
    assert [len(c) for c in got] == [500, 500, 201]
    assert [r for c in got for r in c] == records


def test_5_mb_a_request_counting_keys() -> None:
    big = b"a" * (1024 * 1024 - 10)  # one record just under 1 MiB with its key
    records = [(big, f"key{i:06d}") for i in range(12)]
    got = chunks(records)
    assert [len(c) for c in got] == [5, 5, 2]
    for c in got:
        assert sum(len(d) + len(k) for d, k in c) <= MAX_BYTES
    assert [r for c in got for r in c] == records


def test_limits_are_the_services() -> None:
    assert (MAX_RECORDS, MAX_BYTES) == (500, 5 * 1024 * 1024)


def test_no_records_no_request() -> None:
    assert chunks([]) == []
