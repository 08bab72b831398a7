"""Kinesis target: ``put_records`` in requests of at most 500 records / 5 MB.

:meth:`KinesisTarget.write` stages rows; :meth:`KinesisTarget.flush` encodes
them in ``payload_format`` (:class:`~sluice.formats.encode.PayloadEncoder`:
JSON by default, Arrow kernels; Avro / Protobuf / JSON Schema through a
schema registry with the stream name as the subject's topic name) and puts
them. A partial failure
(``FailedRecordCount`` > 0) retries only the failed records, with a backoff
(0.1 s doubling to 5 s), until every record has a sequence number; then the
flush returns (durable). After ``MAX_ATTEMPTS`` a flush raises
:class:`TransientError` and the engine writes the batch again (at least once).

The partition key is the value of ``partition_key_column``, else
``partition_key_prefix`` followed by a running row number (the rows spread
over the shards), else the running row number alone.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import pyarrow as pa
import pyarrow.compute as pac

from sluice.connectors.kinesis import client as kc
from sluice.connectors.kinesis.spec import KinesisTarget as KinesisTargetSpec
from sluice.connectors.registry import Context
from sluice.errors import ConnectorError, TransientError
from sluice.formats.encode import PayloadEncoder

log = logging.getLogger(__name__)

#: PutRecords limits: records per request, bytes per request (data + keys).
MAX_RECORDS = 500
MAX_BYTES = 5 * 1024 * 1024
#: One record's limit (data + key), bytes.
MAX_RECORD_BYTES = 1024 * 1024
#: Attempts of one request's failed records before the flush gives up.
MAX_ATTEMPTS = 12
BACKOFF_FIRST_S = 0.1
BACKOFF_MAX_S = 5.0


def chunks(records: list[tuple[bytes, str]]) -> list[list[tuple[bytes, str]]]:
    """``records`` cut into requests of at most 500 records and 5 MB."""
    out: list[list[tuple[bytes, str]]] = []
    current: list[tuple[bytes, str]] = []
    size = 0
    for data, key in records:
        n = len(data) + len(key.encode())
        if current and (len(current) == MAX_RECORDS or size + n > MAX_BYTES):
            out.append(current)
            current, size = [], 0
        current.append((data, key))
        size += n
    if current:
        out.append(current)
    return out


class KinesisTarget:
    """Puts rows to one stream; see the module docstring."""

    def __init__(self, spec: KinesisTargetSpec, ctx: Context, index: int) -> None:
        self.spec = spec
        self.id = f"kinesis:{spec.stream_name}"
        self.client: Any = None  # the boto3 client (tests hook botocore events on it)
        self._staged: list[pa.Table] = []
        self._row = 0  # running row number (partition keys without a column)
        self.retried = 0  # records put again after a partial failure (tests, logs)
        self._encoder = PayloadEncoder(spec, spec.stream_name, self.id)

    def open(self) -> None:
        """Connect and check that the stream exists."""
        self.client = kc.kinesis(self.spec)
        try:
            self.client.describe_stream_summary(StreamName=self.spec.stream_name)
        except kc.ClientError as exc:
            if kc.code(exc) == "ResourceNotFoundException":
                raise ConnectorError(
                    f"kinesis: stream {self.spec.stream_name} does not exist"
                ) from exc
            raise TransientError(f"kinesis: describing {self.spec.stream_name}: {exc}") from exc
        except kc.BotoCoreError as exc:
            raise TransientError(f"kinesis: describing {self.spec.stream_name}: {exc}") from exc

    def write(self, data: pa.Table) -> None:
        """Stage ``data``; nothing is put before :meth:`flush`."""
        if data.num_rows:
            self._staged.append(data)

    def flush(self) -> None:
        """Put every staged row; returns once each has a sequence number."""
        self._require()
        staged, self._staged = self._staged, []
        try:
            for data in staged:
                for request in chunks(self._records(data)):
                    self._put(request)
        except BaseException:
            self._staged = staged + self._staged
            raise

    def _records(self, data: pa.Table) -> list[tuple[bytes, str]]:
        messages = self._encoder.bodies(data)
        column = self.spec.partition_key_column
        if column is not None:
            if column not in data.column_names:
                raise ConnectorError(
                    f"kinesis target {self.spec.stream_name}: partition_key_column {column!r} "
                    f"is not a column of the output ({', '.join(data.column_names)})"
                )
            keys = [k or "-" for k in pac.cast(data[column], pa.string()).to_pylist()]
        else:
            prefix = self.spec.partition_key_prefix or ""
            keys = [f"{prefix}{i}" for i in range(self._row, self._row + len(messages))]
            self._row += len(messages)
        for data_bytes, key in zip(messages, keys, strict=True):
            if len(data_bytes) + len(key.encode()) > MAX_RECORD_BYTES:
                raise ConnectorError(
                    f"kinesis target {self.spec.stream_name}: a record of "
                    f"{len(data_bytes)} bytes passes Kinesis's 1 MiB limit"
                )
        return list(zip(messages, keys, strict=True))

    def _put(self, request: list[tuple[bytes, str]]) -> None:
        """Put one request; retry only the records that failed."""
        client = self._require()
        pending = request
        backoff = BACKOFF_FIRST_S
        for attempt in range(1, MAX_ATTEMPTS + 1):
            try:
                resp = client.put_records(
                    StreamName=self.spec.stream_name,
                    Records=[{"Data": d, "PartitionKey": k} for d, k in pending],
                )
            except kc.ClientError as exc:
                if kc.code(exc) not in kc.RETRYABLE:
                    raise ConnectorError(
                        f"kinesis: put_records to {self.spec.stream_name}: {exc}"
                    ) from exc
                failed = pending  # nothing of this request was taken
                why = kc.code(exc)
            except kc.BotoCoreError as exc:
                raise TransientError(
                    f"kinesis: put_records to {self.spec.stream_name}: {exc}"
                ) from exc
            else:
                if not resp.get("FailedRecordCount"):
                    return
                results = resp["Records"]
                failed = [r for r, res in zip(pending, results, strict=True) if "ErrorCode" in res]
                why = next(res["ErrorCode"] for res in results if "ErrorCode" in res)
            if attempt == MAX_ATTEMPTS:
                break
            self.retried += len(failed)
            log.info(
                "kinesis %s: %d of %d record(s) failed (%s); retrying them in %.1f s",
                self.spec.stream_name,
                len(failed),
                len(pending),
                why,
                backoff,
            )
            pending = failed
            time.sleep(backoff)  # bounded: MAX_ATTEMPTS doublings up to BACKOFF_MAX_S
            backoff = min(BACKOFF_MAX_S, backoff * 2)
        raise TransientError(
            f"kinesis: {len(pending)} record(s) still failing after {MAX_ATTEMPTS} attempts "
            f"to {self.spec.stream_name}"
        )

    def close(self) -> None:
        """Drop the staged rows and the client."""
        self._staged = []
        client, self.client = self.client, None
        if client is not None:
            try:
                client.close()
            except Exception as exc:
                log.debug("kinesis target %s: close: %s", self.spec.stream_name, exc)

    def _require(self) -> Any:
        if self.client is None:
            raise ConnectorError(f"kinesis target {self.spec.stream_name} is not open")
        return self.client


def build_target(spec: KinesisTargetSpec, ctx: Context, index: int) -> KinesisTarget:
    """Registry hook."""
    return KinesisTarget(spec, ctx, index)
